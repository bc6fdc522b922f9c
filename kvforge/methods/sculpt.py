"""KVSculpt: optimize a smaller set of unconstrained KV pairs per layer and KV head.

Starting from the best selection (the compactor's, by default) with least-squares
values, every head's ``m`` compact keys (and, with ``beta``, an additive
attention bias per key) are optimized with L-BFGS so that the reference queries
(:mod:`kvforge.methods.fit`) see the same attention output and the same
attention mass (log-sum-exp) as over the full cache; values are re-solved in
closed form by least squares every ``refit_every`` L-BFGS iterations
(alternating). The mass term matters once the question's own tokens join the
softmax: a prefix that lost mass is under-weighted against them, and beta is
what lets a few compact keys carry the mass of many evicted ones.

Loss per layer, averaged over its KV heads (ragged budgets padded and masked):
``|O' - O|^2 / |O|^2 + mass_weight * mean((lse' - lse)^2)``.

Vectorized over the heads of a layer; grouped-query attention is handled by the
reference (a KV head's queries are those of all its query heads); deterministic
for a seed (the reference sample; L-BFGS itself has no randomness).
Positions of the compact entries are those of the selected slots they started
from (informative: the runtime does not use them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..prefill import KV
from ..ragged import CompressedKV
from .base import Budget, CompressionContext, Compressor, get_method, register
from .fit import Reference, attend, fit_values, hf_model, reference
from .select_fit import SelectFit, refit_values


@register
@dataclass
class Sculpt(Compressor):
    """KVSculpt: compact keys optimized by L-BFGS, values by least squares, an attention bias per key."""

    name = "sculpt"
    needs_queries = True
    needs_pre_rope_keys = True  # for the compactor's selection it starts from
    produces_beta = True

    init: str = "compactor"  # the selection it starts from: "compactor" or "select_fit"
    steps: int = 10  # L-BFGS iterations per layer
    refit_every: int = 5  # values re-solved after every this many iterations
    keys: bool = False  # also optimize the keys (measured to overfit the reference queries: BENCHMARKS.md)
    beta: bool = True
    mass_weight: float = 1.0
    samples: int = 512  # reference query positions per layer (times the query heads of a KV head)
    position: str = "end"
    ridge: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 0 or self.refit_every < 1:
            raise ValueError("steps must be >= 0 and refit_every >= 1")
        if self.init not in ("compactor", "select_fit"):
            raise ValueError(f"init must be compactor or select_fit, got {self.init!r}")

    @property
    def keeps_originals(self) -> bool:
        return False

    def prepare(self, kv: KV, ctx: CompressionContext) -> Callable[[Budget], CompressedKV]:
        selector = get_method(self.init) if self.init == "compactor" else SelectFit(refit=False,
                                                                                      position=self.position)
        select_at = selector.prepare(kv, ctx)
        ref = reference(kv, hf_model(ctx), self.samples, self.position, ctx.seed)

        def compress_at(budget: Budget) -> CompressedKV:
            start = refit_values(kv, select_at(budget), ref, self.ridge)
            return self.optimize(kv, start, ref, ctx.seed)

        return compress_at

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        return self.prepare(kv, dataclasses.replace(ctx, keep=budget.keep))(budget)

    def optimize(self, kv: KV, start: CompressedKV, ref: Reference, seed: int = 0) -> CompressedKV:
        torch.manual_seed(seed)
        keys, values, betas = [], [], []
        for layer in range(len(start.keys)):
            k, v, b = self._layer(kv, start, ref, layer)
            keys.append(k.to(start.keys[layer].dtype))
            values.append(v.to(start.values[layer].dtype))
            betas.append(b)
        return dataclasses.replace(start, keys=keys, values=values, beta=betas if self.beta else None)

    def _layer(self, kv: KV, start: CompressedKV, ref: Reference, layer: int):
        """Optimize one layer's heads together; returns flat (N_l, D) keys, values and (N_l,) beta."""
        target, lse = ref.targets(kv, layer)  # (H, M, D), (H, M)
        q = ref.queries[layer]  # (H, M, D)
        offsets = start.layer_offsets(layer)
        H = len(offsets) - 1
        counts = [offsets[h + 1] - offsets[h] for h in range(H)]
        n = max(counts) if counts else 0
        D = start.keys[layer].shape[1]
        flat_k, flat_v = start.keys[layer].float(), start.values[layer].float()
        if n == 0 or self.steps == 0:
            return flat_k, flat_v, torch.zeros(flat_k.shape[0])
        K = torch.zeros(H, n, D)
        V = torch.zeros(H, n, D)
        valid = torch.zeros(H, n, dtype=torch.bool)
        for h in range(H):
            a, b = offsets[h], offsets[h + 1]
            K[h, : b - a], V[h, : b - a], valid[h, : b - a] = flat_k[a:b], flat_v[a:b], True
        key_scale = float(flat_k.abs().mean().clamp_min(1e-3))
        K_param = (K / key_scale).clone().requires_grad_(self.keys)  # optimize in a unit scale
        beta = torch.zeros(H, n, requires_grad=self.beta)
        norm = (target ** 2).sum(dim=(1, 2)).clamp_min(1e-12)  # (H,)
        params = ([K_param] if self.keys else []) + ([beta] if self.beta else [])
        if not params:
            return flat_k, flat_v, torch.zeros(flat_k.shape[0])

        def loss_fn(V_fixed):
            out, s = attend(q, K_param * key_scale, V_fixed, ref.scale, beta if self.beta else None, valid)
            err = ((out - target) ** 2).sum(dim=(1, 2)) / norm
            mass = ((s - lse) ** 2).mean(dim=1)
            return (err + self.mass_weight * mass).mean()

        def refit(V_cur):
            with torch.no_grad():
                logits = torch.einsum("hmd,hnd->hmn", q, K_param * key_scale) * ref.scale
                if self.beta:
                    logits = logits + beta[:, None, :]
                new = V_cur.clone()
                for h in range(H):
                    c = counts[h]
                    if c:
                        probs = torch.softmax(logits[h, :, :c], dim=-1)
                        new[h, :c] = fit_values(probs, target[h], V_cur[h, :c], self.ridge)
                return new

        best = (float(loss_fn(V).detach()), K_param.detach().clone(), beta.detach().clone(), V.clone())
        done = 0
        while done < self.steps:
            iters = min(self.refit_every, self.steps - done)
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=10,
                                    line_search_fn="strong_wolfe")
            V_fixed = V

            def closure():
                opt.zero_grad()
                loss = loss_fn(V_fixed)
                loss.backward()
                return loss

            opt.step(closure)
            done += iters
            V = refit(V)
            with torch.no_grad():
                current = float(loss_fn(V))
            if torch.isfinite(torch.tensor(current)) and current < best[0]:
                best = (current, K_param.detach().clone(), beta.detach().clone(), V.clone())
        _, K_best, beta_best, V_best = best
        K_best = K_best * key_scale
        out_k = torch.cat([K_best[h, : counts[h]] for h in range(H)]) if self.keys else flat_k
        out_v = torch.cat([V_best[h, : counts[h]] for h in range(H)])
        out_b = torch.cat([beta_best[h, : counts[h]] for h in range(H)])
        return out_k, out_v, out_b


__all__ = ["Sculpt"]
