"""Select+Fit (the KVSculpt paper's baseline): evict by attention mass, then refit values by least squares.

1. Score every (layer, KV head, token) by the attention the reference queries
   (:mod:`kvforge.methods.fit`) give it under a softmax over the whole document;
   keep the top entries per layer (or per head, with a pilot allocation), plus
   sink and recent tokens. With ``blend > 0`` the ranking is the z-scored log
   attention mass plus ``blend`` times the compactor's (z-scored) score: the two
   selections fail on different documents (docs/experiments/fitting-and-presses.md, section 9). With
   ``surprisal > 0`` it also adds that weight times a token prior, the same for
   every layer and head: each token's surprisal under the model (-log p of the
   token given the ones before it), averaged over a window of
   ``surprisal_window`` tokens and z-scored. What a document states that its
   context does not predict (a number, a name, a code) is what a later question
   asks for and what no query inside the document attends to (section 9).
   With ``replay > 0`` it adds that weight times the z-scored log of the
   replay signal (:mod:`kvforge.methods.replay`: the attention an entry gets
   while the model repeats the document), per layer and head.
2. Per head, replace the kept values by the least-squares solution that makes
   the attention output over the kept keys match the full cache's output for
   the reference queries (ridge toward the original values).

Keys stay original (post-RoPE, as cached); no beta, so the prefix's attention
mass shrinks with what was evicted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..prefill import KV
from ..ragged import CompressedKV
from .base import Budget, CompressionContext, Prepared, ScoredCompressor, gather, register
from .fit import Reference, fit_values, hf_model, match_mass, reference


@register
@dataclass
class SelectFit(ScoredCompressor):
    """Select+Fit: keep the entries reference queries attend to most, then refit their values by least squares."""

    name = "select_fit"
    needs_queries = True

    sink: int = 4
    recent: int = 8
    score_samples: int = 4096  # query positions that score the keys (all of a document up to this)
    samples: int = 256  # reference query positions per layer for the value fit (times the group's heads)
    position: str = "end"  # rotate reference queries to the document's end ("own": keep their position)
    ridge: float = 0.1
    refit: bool = True  # False: selection only (the eviction half, for comparisons)
    blend: float = 0.0  # weight of the compactor's score in the ranking (0: attention mass alone)
    query_block: int = 1024  # reference queries scored at a time (bounds the (H, block, T) logits)
    score_dtype: str = "bfloat16"  # scoring's logits, softmax and block sums: "bfloat16" or "float32"
    surprisal: float = 0.0  # weight of the surprisal prior in the ranking (0: none)
    surprisal_window: int = 5  # tokens the surprisal is averaged over (the rest of a number, of a name)
    replay: float = 0.0  # weight of the replay (context reconstruction) signal in the ranking (0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_block < 1 or self.blend < 0 or self.samples < 1 or self.score_samples < 1:
            raise ValueError("query_block, samples and score_samples must be >= 1 and blend >= 0")
        if self.surprisal < 0 or self.surprisal_window < 1 or self.replay < 0:
            raise ValueError("surprisal and replay must be >= 0 and surprisal_window >= 1")
        if self.score_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"score_dtype must be 'bfloat16' or 'float32', got {self.score_dtype!r}")

    @property
    def keeps_originals(self) -> bool:
        return not self.refit

    def reference(self, kv: KV, ctx: CompressionContext, samples: int | None = None) -> Reference:
        return reference(kv, hf_model(ctx), samples or self.samples, self.position, ctx.seed)

    @property
    def needs_pre_rope_keys(self) -> bool:  # the compactor's leverage, when blended
        return self.blend > 0

    @property
    def needs_surprisal(self) -> bool:
        return self.surprisal > 0

    @property
    def needs_model(self) -> bool:  # the replay runs the model over the document again
        return self.replay > 0

    def score(self, kv: KV, ctx: CompressionContext) -> torch.Tensor:
        """Mean attention each entry receives from the reference queries: (L, H, T).

        The logits, the softmax and each block's sum over queries run in ``score_dtype`` (the blocks
        accumulate in float32). bfloat16 scores a 2048-token document 2.4x faster on this CPU and
        changes 0.1-0.3% of the kept entries at keeps 0.7-0.1, near-ties (docs/experiments/fitting-and-presses.md, section 9
        cost table); on a CPU without bfloat16 instructions ``float32`` may be the faster choice.
        """
        ref = self.reference(kv, ctx, self.score_samples)
        L, H, T, _ = kv.shape
        dtype = getattr(torch, self.score_dtype)
        scores = torch.zeros(L, H, T)
        for layer in range(L):
            q = (ref.queries[layer] * ref.scale).to(dtype)  # (H, M, D), scaled once
            k = kv.keys[layer].to(dtype).transpose(1, 2)  # (H, D, T)
            for a in range(0, q.shape[1], self.query_block):  # blocks keep the logits in cache
                probs = torch.softmax(torch.bmm(q[:, a:a + self.query_block], k), dim=-1)  # (H, block, T)
                scores[layer] += probs.sum(dim=1).float()  # a block's sum rounds once to score_dtype
            scores[layer] /= q.shape[1]
        return scores

    def scorer(self, kv: KV, ctx: CompressionContext) -> Callable[[float], torch.Tensor]:
        mass = self.score(kv, ctx)
        if self.blend <= 0 and self.surprisal <= 0 and self.replay <= 0:
            return lambda keep: mass
        from .compactor import Compactor, _zscore_per_layer

        base = _zscore_per_layer(mass.clamp_min(1e-30).log())
        if self.replay > 0:
            from .replay import replay_signal

            base = base + self.replay * _zscore_per_layer(replay_signal(kv, ctx).clamp_min(1e-30).log())
        if self.surprisal > 0:
            base = base + self.surprisal * surprisal_prior(kv, self.surprisal_window)  # (T,) broadcast
        if self.blend <= 0:
            return lambda keep: base
        compactor = Compactor().scorer(kv, ctx)  # z-scored blend per keep; protected tokens +inf
        return lambda keep: base + self.blend * compactor(keep)

    def prepare(self, kv: KV, ctx: CompressionContext) -> Prepared:
        ref = self.reference(kv, ctx)
        scorer = self.scorer(kv, ctx)

        def compress_at(budget: Budget) -> CompressedKV:
            out = gather(kv, self.select(scorer(budget.keep), budget))
            return refit_values(kv, out, ref, self.ridge) if self.refit else out

        return Prepared(compress_at, reference=ref)  # the pilot is this method: it calls compress_at


def surprisal_prior(kv: KV, window: int) -> torch.Tensor:
    """(T,): the prefill's per-token surprisal averaged over ``window`` neighbours, z-scored over the document.

    The first token has no prediction (surprisal 0): it takes its neighbour's value, so that it
    pulls neither the mean nor its window down (it is a protected sink anyway).
    """
    if kv.surprisal is None:
        raise ValueError("the surprisal prior needs the prefill's token surprisal (prefill(..., surprisal=True))")
    from .compactor import _zscore_per_layer, smooth_tokens

    x = kv.surprisal.float().clone()
    T = x.shape[0]
    if T < 2:  # nothing to compare a lone token with
        return torch.zeros(T)
    x[0] = x[1]
    return _zscore_per_layer(smooth_tokens(x, window).view(1, 1, T)).view(T)


def refit_values(kv: KV, out: CompressedKV, ref: Reference, ridge: float) -> CompressedKV:
    """Least-squares values for the kept keys of every head (keys and positions unchanged), under ``out.beta``
    where it is set (the values then fit the attention the kept entries get with their bias)."""
    values = []
    for layer in range(len(out.keys)):
        target, _ = ref.targets(kv, layer)  # (H, M, D)
        offsets = out.layer_offsets(layer)
        new = out.values[layer].float().clone()
        for h in range(len(offsets) - 1):
            a, b = offsets[h], offsets[h + 1]
            if b == a:
                continue
            k = out.keys[layer][a:b].float()[None]
            logits = torch.einsum("hmd,hnd->hmn", ref.queries[layer][h:h + 1], k) * ref.scale
            if out.beta is not None:
                logits = logits + out.beta[layer][a:b].float()
            probs = torch.softmax(logits, dim=-1)[0]  # (M, n)
            new[a:b] = fit_values(probs, target[h], new[a:b], ridge)
        values.append(new.to(out.values[layer].dtype))
    return dataclasses.replace(out, values=values)


def matched_beta(kv: KV, out: CompressedKV, ref: Reference) -> list[torch.Tensor]:
    """Per layer (N_l,) float32: every kept entry's beta from :func:`kvforge.methods.fit.match_mass`."""
    betas = []
    for layer in range(len(out.keys)):
        _, lse = ref.targets(kv, layer)  # (H, M)
        offsets = out.layer_offsets(layer)
        heads = []
        for h in range(len(offsets) - 1):
            k = out.keys[layer][offsets[h]:offsets[h + 1]].float()  # (n, D)
            heads.append(match_mass(ref.queries[layer][h] @ k.T * ref.scale, lse[h]) if len(k) else torch.zeros(0))
        betas.append(torch.cat(heads))
    return betas


__all__ = ["SelectFit", "matched_beta", "refit_values", "surprisal_prior"]
