"""KVSculpt: optimize a smaller set of unconstrained KV pairs per layer and KV head.

Starting from a selection with least-squares values (by default the replay's: one
top-k over all layers of the attention the model pays while it repeats the document,
weighted by input x gradient attribution, ``init=replay, grad=1``; ``init=select_fit`` is
select_fit's attention mass over the reference queries blended with the compactor's score
and the surprisal prior, the default before the held-out split, docs/experiments/heldout.md),
every head's
``m`` compact keys (and, with ``beta``, an additive attention bias per key;
keys are off by default) are optimized with L-BFGS so that the reference queries
(:mod:`kvforge.methods.fit`) see the same attention output and the same
attention mass (log-sum-exp) as over the full cache; values are re-solved in
closed form by least squares every ``refit_every`` L-BFGS iterations
(alternating). The mass term matters once the question's own tokens join the
softmax: a prefix that lost mass is under-weighted against them, and beta is
what lets a few compact keys carry the mass of many evicted ones.

Loss per bucket of a layer's KV heads, averaged over them (ragged counts padded and masked):
``|O' - O|^2 / |O|^2 + mass_weight * mean((lse' - lse)^2)``.

Vectorized over the heads of a layer, in buckets of similar counts;
grouped-query attention is handled by the reference (a KV head's queries are
those of all its query heads); deterministic for a seed (the reference sample;
L-BFGS itself has no randomness).
Positions of the compact entries are those of the selected slots they started
from (informative: the runtime does not use them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..prefill import KV
from ..ragged import CompressedKV
from .base import Budget, CompressionContext, Compressor, Prepared, get_method, register
from .fit import Reference, attend, fit_values, hf_model, reference
from .select_fit import SelectFit, refit_values


@register
@dataclass
class Sculpt(Compressor):
    """KVSculpt: compact keys optimized by L-BFGS, values by least squares, an attention bias per key."""

    name = "sculpt"
    needs_queries = True
    produces_beta = True

    # the selection it starts from: "replay" (KVzip's context reconstruction, one top-k over all layers), "select_fit"
    # (its ranking, blended) or "compactor". The replay with grad=1 was chosen on the tuning split (keep 0.1: 10/18
    # needles, QA KL 0.066, against 9/18 and 0.084 without grad=1) and holds held out (19/36 needles at keep 0.1 and
    # 0.25, where the select_fit start with the pilot found 4/36 at 0.1): docs/experiments/heldout.md
    init: str = "replay"
    blend: float = 1.0  # with init "select_fit": weight of the compactor's score in its ranking
    surprisal: float = 1.0  # with init "select_fit": weight of the surprisal prior in its ranking (0: none)
    steps: int = 10  # L-BFGS iterations per layer
    refit_every: int = 5  # values re-solved after every this many iterations
    keys: bool = False  # also optimize the keys (measured to overfit the reference queries: BENCHMARKS.md)
    beta: bool = True
    mass_weight: float = 1.0
    samples: int = 512  # reference query positions per layer (times the query heads of a KV head)
    position: str = "end"
    ridge: float = 0.1
    grad: int = 1  # with init "replay": weight the replay's attention by input x gradient attribution (0: plain replay)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.refit_every < 1 or self.blend < 0 or self.surprisal < 0:
            raise ValueError("steps must be >= 0, refit_every >= 1, blend and surprisal >= 0")
        if self.init not in ("compactor", "select_fit", "replay"):
            raise ValueError(f"init must be compactor, select_fit or replay, got {self.init!r}")
        if self.grad not in (0, 1):
            raise ValueError("grad must be 0 or 1")

    @property
    def keeps_originals(self) -> bool:
        return False

    @property
    def needs_pre_rope_keys(self) -> bool:  # the compactor's score, in the selection it starts from
        return self.selector().needs_pre_rope_keys

    @property
    def needs_surprisal(self) -> bool:  # the surprisal prior, in the selection it starts from
        return self.selector().needs_surprisal

    @property
    def needs_model(self) -> bool:  # the replay, in the selection it starts from
        return self.selector().needs_model

    def selector(self, refit: bool = False) -> Compressor:
        """The selection sculpt starts from (``refit``: with select_fit's value refit, the pilot's choice)."""
        if self.init == "compactor":
            return get_method("compactor")
        if self.init == "replay":  # one top-k over all layers by the replay's attention (ragged per-layer shares)
            return get_method("replay", grad=self.grad)
        return SelectFit(refit=refit, position=self.position, blend=self.blend, surprisal=self.surprisal,
                         samples=self.samples, ridge=self.ridge)

    def prepare(self, kv: KV, ctx: CompressionContext) -> Prepared:
        select_at = self.selector().prepare(kv, ctx)
        ref = getattr(select_at, "reference", None)  # select_fit's: the same samples, position and seed
        if ref is None:
            ref = reference(kv, hf_model(ctx), self.samples, self.position, ctx.seed)

        def start_at(budget: Budget) -> CompressedKV:  # the selection, values refitted by least squares
            return refit_values(kv, select_at(budget), ref, self.ridge)

        def compress_at(budget: Budget) -> CompressedKV:
            return self.optimize(kv, start_at(budget), ref, ctx.seed)

        # the pilot (budget.allocate) is the selection sculpt starts from: select_fit's or the replay's with
        # the value refit (this start), or the compactor's as it is
        return Prepared(compress_at, pilot=select_at if self.init == "compactor" else start_at, reference=ref)

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
        """Optimize one layer's heads; returns flat (N_l, D) keys, values and (N_l,) beta.

        Heads are optimized together in buckets of similar counts (padded to the bucket's
        largest and masked): a pilot allocation gives heads very different counts, and one
        padded batch would cost the largest head's count for every head.
        """
        target, lse = ref.targets(kv, layer)  # (H, M, D), (H, M)
        offsets = start.layer_offsets(layer)
        H = len(offsets) - 1
        flat_k, flat_v = start.keys[layer].float(), start.values[layer].float()
        heads = [(flat_k[offsets[h]:offsets[h + 1]], flat_v[offsets[h]:offsets[h + 1]]) for h in range(H)]
        if flat_k.shape[0] == 0 or self.steps == 0 or not (self.keys or self.beta):
            return flat_k, flat_v, torch.zeros(flat_k.shape[0])
        result = [(k, v, torch.zeros(len(k))) for k, v in heads]  # heads with nothing kept stay empty
        for bucket in buckets([len(k) for k, _ in heads]):
            idx = torch.tensor(bucket)
            got = self._heads(ref.queries[layer][idx], target[idx], lse[idx], ref.scale, [heads[h] for h in bucket])
            for h, r in zip(bucket, got):
                result[h] = r
        return tuple(torch.cat([r[i] for r in result]) for i in range(3))

    def _heads(self, q: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, scale: float,
               heads: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        """Optimize a batch of heads. q, target: (B, M, D); lse: (B, M); heads: B (keys, values) of (n_b, D).

        Returns per head (keys, values, beta) of (n_b, D), (n_b, D), (n_b,).
        """
        B = len(heads)
        counts = [len(k) for k, _ in heads]
        n, D = max(counts), q.shape[-1]
        K = torch.zeros(B, n, D)
        V = torch.zeros(B, n, D)
        valid = torch.zeros(B, n, dtype=torch.bool)
        for b, (k, v) in enumerate(heads):
            K[b, :len(k)], V[b, :len(k)], valid[b, :len(k)] = k, v, True
        key_scale = float(torch.cat([k for k, _ in heads]).abs().mean().clamp_min(1e-3))
        K_param = (K / key_scale).clone().requires_grad_(self.keys)  # optimize in a unit scale
        beta = torch.zeros(B, n, requires_grad=self.beta)
        norm = (target ** 2).sum(dim=(1, 2)).clamp_min(1e-12)  # (B,)
        params = ([K_param] if self.keys else []) + ([beta] if self.beta else [])

        def loss_fn(V_fixed):
            out, s = attend(q, K_param * key_scale, V_fixed, scale, beta if self.beta else None, valid)
            err = ((out - target) ** 2).sum(dim=(1, 2)) / norm
            mass = ((s - lse) ** 2).mean(dim=1)
            return (err + self.mass_weight * mass).mean()

        def refit(V_cur):
            with torch.no_grad():
                logits = torch.einsum("hmd,hnd->hmn", q, K_param * key_scale) * scale
                if self.beta:
                    logits = logits + beta[:, None, :]
                new = V_cur.clone()
                for b, c in enumerate(counts):
                    probs = torch.softmax(logits[b, :, :c], dim=-1)
                    new[b, :c] = fit_values(probs, target[b], V_cur[b, :c], self.ridge)
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
        return [(K_best[b, :c] if self.keys else heads[b][0], V_best[b, :c], beta_best[b, :c])
                for b, c in enumerate(counts)]


def buckets(counts: list[int], spread: float = 1.5) -> list[list[int]]:
    """Head indices grouped so that within a group the largest count is at most ``spread`` x the
    smallest (heads with nothing kept are left out: they have nothing to optimize)."""
    order = sorted((c, h) for h, c in enumerate(counts) if c > 0)
    out: list[list[int]] = []
    low = 0
    for c, h in order:
        if out and c <= spread * low:
            out[-1].append(h)
        else:
            out.append([h])
            low = c
    return out


__all__ = ["Sculpt", "buckets"]
