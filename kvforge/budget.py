"""Per-(layer, KV head) budgets allocated from a pilot run.

A cheap pilot compresses the document at a uniform count per head and measures
every head's difficulty: how far its compressed attention (output and mass)
drifts from the full cache's for the reference queries
(:func:`kvforge.methods.fit.head_errors`). The same total is then redistributed:
if a head's error falls as ``c / k`` with its count ``k``, the pilot gives
``c = error * k0``, and minimizing ``sum c / k`` under ``sum k = K`` gives
``k ∝ sqrt(c)`` — hard heads get more, easy ones less — clipped to
``[floor, tokens]`` by water-filling so that the total stays exact.

The pilot method is the method itself when it is cheap (selection methods) and,
for sculpt, the selection it starts from (the compactor, or select_fit's
selection with its value refit) instead of an optimization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .methods import Budget, CompressionContext, Compressor
from .methods.fit import head_errors, hf_model, reference
from .prefill import KV
from .ragged import CompressedKV


@dataclass
class Allocation:
    """What pilot allocation decided; stored in the artifact's ``compression.extra.allocation``."""

    rule: str
    pilot: str
    difficulty: list[list[float]]
    head_totals: list[list[int]]
    uniform: int

    def to_dict(self) -> dict:
        return {"rule": self.rule, "pilot": self.pilot, "uniform_per_head": self.uniform,
                "difficulty": [[round(x, 6) for x in row] for row in self.difficulty],
                "head_totals": self.head_totals}


def redistribute(difficulty: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """Integer counts (L, H) summing to ``total``, proportional to sqrt(difficulty), within [floor, cap]."""
    weight = difficulty.double().clamp_min(1e-12).sqrt().flatten()
    n = weight.numel()
    total = int(min(max(total, floor * n), cap * n))
    counts = torch.full((n,), float(floor), dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    remaining = total - floor * n
    for _ in range(n + 1):  # water-filling: heads that hit the cap drop out, the rest share what is left
        share = weight * free
        if share.sum() <= 0 or remaining <= 0:
            break
        add = remaining * share / share.sum()
        over = free & (counts + add > cap)
        if not bool(over.any()):
            counts = counts + add
            break
        counts[over] = cap
        free &= ~over
        remaining = total - float(counts.sum())
    out = counts.floor().long()
    short = total - int(out.sum())  # hand the rounding remainder to the largest fractional parts
    if short > 0:
        frac = (counts - out.double()).masked_fill(out >= cap, -1.0)
        out[torch.topk(frac, k=short).indices] += 1
    return out.view(difficulty.shape)


def allocate(kv: KV, method: Compressor, keep: float, ctx: CompressionContext, floor: int | None = None,
             compress_at: Callable[[Budget], CompressedKV] | None = None) -> tuple[Budget, Allocation]:
    """A budget with per-head counts from a pilot run at ``keep``; the same total as uniform.

    compress_at: ``method.prepare(kv, ctx)`` when the caller has it; the pilot then reuses what it
    shares (a :class:`~kvforge.methods.base.Prepared`'s pilot and reference queries, or the method's
    own scores when the pilot is the method) instead of scoring the document again.
    """
    L, H, T, _ = kv.shape
    pilot = method.selector(refit=True) if hasattr(method, "selector") else method
    uniform = Budget.uniform_heads(keep, L, H, T)
    shared_pilot = getattr(compress_at, "pilot", None)
    if shared_pilot is not None:
        compressed = shared_pilot(uniform)
    elif pilot is method and compress_at is not None:
        compressed = compress_at(uniform)
    else:
        compressed = pilot.compress(kv, uniform, ctx)
    ref = getattr(compress_at, "reference", None)
    if ref is None:  # the same sample the fitting methods draw: samples, position and seed
        ref = reference(kv, hf_model(ctx), getattr(method, "samples", 256),
                        getattr(method, "position", "end"), ctx.seed)
    difficulty = head_errors(kv, compressed, ref)
    k0 = int(uniform.head_totals[0][0])
    protected = getattr(pilot, "sink", 0) + getattr(pilot, "recent", 0)  # sculpt: its selection's
    floor = max(1, protected, k0 // 4) if floor is None else floor
    counts = redistribute(difficulty * k0, k0 * L * H, min(floor, T), T)
    budget = Budget(keep=keep, head_totals=counts.tolist())
    return budget, Allocation(rule="sqrt", pilot=pilot.name, difficulty=difficulty.tolist(),
                              head_totals=counts.tolist(), uniform=k0)
