"""``compactor``: approximate leverage scores blended with chunked non-causal attention.

Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache
Compression with Approximate Leverage Scores" (arXiv 2507.08143).

Two question-independent signals per (layer, KV head, token):

* **Leverage** of the token's key among the keys of its chunk (by default the
  whole document, up to 8192 tokens): with X the chunk's keys, centered and
  right-multiplied by a Gaussian sketch Φ (head_dim x sketch, scaled
  1/sqrt(sketch)), the score is ``x_i^T (X^T X + λI)^-1 x_i``, the diagonal
  of the hat matrix, λ = ridge x the mean diagonal of X^T X. A key that
  points where no other key points scores high; a duplicated key shares its
  direction with its twin and scores lower.
* **Non-causal attention** inside chunks: every query of a chunk attends to
  every key of the chunk (both directions); a key's score is the attention it
  receives summed over the queries, averaged over the query heads of its
  group, times its value norm, averaged over a window of ``smooth`` (7)
  neighbours, so that the tokens around an important one (the rest of a
  number, of a name) are kept with it.

Both are z-scored per layer over all its heads, blended as
``blend * leverage + attention`` (``blend=None``: the fraction removed,
``1 - keep``), and one top-k per layer (or over all layers) picks the entries:
heads get different budgets. The protected sink and tail tokens are left out
of both scores.

Defaults were measured, not guessed (docs/experiments/compactor.md):
on 2048-token needle tasks with the embedded model, against 512-token
leverage chunks with ridge 1e-2 and 256-token attention chunks, the
whole-document leverage with ridge 1e-4, 512-token attention chunks and a
7-token smoothing window cut the question + answer KL at keep 0.25 from
0.34 to 0.12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..prefill import KV
from .base import CompressionContext, ScoredCompressor, register


def _zscore_per_layer(x: torch.Tensor) -> torch.Tensor:
    """(L, H, T) -> z-scored over each layer's (H, T)."""
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def smooth_tokens(x: torch.Tensor, window: int) -> torch.Tensor:
    """(..., T) -> (..., T): each token's mean over the ``window`` tokens centred on it (fewer at the edges)."""
    if window <= 1:
        return x
    T = x.shape[-1]
    out = F.avg_pool1d(x.reshape(-1, 1, T), kernel_size=window, stride=1, padding=window // 2,
                       count_include_pad=False)[..., :T]  # an even window gives T + 1 means: drop the last
    return out.reshape(x.shape)


def _chunks(T: int, size: int) -> list[tuple[int, int]]:
    """[start, end) chunks of ``size``; a last chunk under half a chunk joins the previous one."""
    bounds = list(range(0, T, size)) + [T]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < size // 2:
        bounds.pop(-2)
    return list(zip(bounds[:-1], bounds[1:]))


def leverage_scores(keys: torch.Tensor, sketch: int, chunk: int, ridge: float, seed: int) -> torch.Tensor:
    """Approximate leverage of every key within its chunk.

    keys: (L, H, T, D) -> scores (L, H, T), each in [0, 1].
    """
    L, H, T, D = keys.shape
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(D, sketch, generator=g, dtype=torch.float32) / math.sqrt(sketch)  # (D, k)
    out = torch.empty(L, H, T)
    eye = torch.eye(sketch)
    for a, b in _chunks(T, chunk):
        x = keys[:, :, a:b].float()
        x = (x - x.mean(dim=2, keepdim=True)) @ phi  # (L, H, c, k)
        gram = x.transpose(-1, -2) @ x  # (L, H, k, k)
        lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (L, H)
        gram = gram + lam[..., None, None] * eye
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):  # not positive definite even with the ridge: fall back to a pseudo-inverse
            sol = torch.linalg.pinv(gram) @ x.transpose(-1, -2)
        else:
            sol = torch.cholesky_solve(x.transpose(-1, -2), chol)  # (L, H, k, c) = G^-1 X^T
        out[:, :, a:b] = (x * sol.transpose(-1, -2)).sum(-1).clamp_min(0)
    return out


def chunked_attention_scores(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             chunk: int, smooth: int) -> torch.Tensor:
    """Attention received by each key from the queries of its chunk, non-causally.

    queries: (L, Hq, T, D) post-RoPE; keys, values: (L, H, T, D) -> scores (L, H, T).
    """
    L, Hq, T, D = queries.shape
    H = keys.shape[1]
    group = Hq // H
    scale = D ** -0.5
    out = torch.empty(L, H, T)
    # one layer and chunk at a time: the (H, G, c, c) probabilities stay small enough for the caches
    for layer in range(L):
        for a, b in _chunks(T, chunk):
            q = queries[layer, :, a:b].float().reshape(H, group * (b - a), D) * scale  # (H, G*c, D)
            k = keys[layer, :, a:b].float()  # (H, c, D)
            attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (H, G*c, c)
            # column sums over the chunk's queries, averaged over the query heads of the group
            out[layer, :, a:b] = attn.view(H, group, b - a, b - a).sum(dim=2).mean(dim=1)
    out = out * values.float().norm(dim=-1)
    return smooth_tokens(out, smooth)


@register
@dataclass
class Compactor(ScoredCompressor):
    """Approximate leverage scores of keys blended with chunked non-causal attention (Compactor)."""

    name = "compactor"
    needs_queries = True
    needs_pre_rope_keys = True

    sink: int = 8
    recent: int = 4
    sketch: int = 48
    leverage_chunk: int = 8192
    attention_chunk: int = 512
    blend: float | None = None
    ridge: float = 1e-4
    pre_rope: bool = True
    smooth: int = 7
    exclude_protected: bool = True

    def score(self, kv: KV, ctx: CompressionContext) -> torch.Tensor:
        return self.scorer(kv, ctx)(ctx.keep)

    def scorer(self, kv: KV, ctx: CompressionContext):
        """Leverage and attention computed once; the blend weight depends on the keep."""
        if kv.queries is None or (self.pre_rope and kv.keys_pre_rope is None):
            raise ValueError("compactor needs the prefill's queries and pre-RoPE keys (KV.queries / keys_pre_rope)")
        L, H, T, _ = kv.shape
        # The protected sink and tail tokens are kept anyway; scoring them would only
        # distort the others: the attention sink takes most of the softmax mass of
        # its chunk, and its outlier key takes a direction of the leverage Gram.
        a, b = (min(self.sink, T), max(min(self.sink, T), T - self.recent)) if self.exclude_protected else (0, T)
        if b - a < 2:
            return lambda keep: torch.full((L, H, T), torch.inf)
        keys = kv.keys_pre_rope if self.pre_rope else kv.keys
        lev = _zscore_per_layer(leverage_scores(keys[:, :, a:b], self.sketch, self.leverage_chunk, self.ridge,
                                                ctx.seed))  # (L, H, b - a)
        att = _zscore_per_layer(chunked_attention_scores(kv.queries[:, :, a:b], kv.keys[:, :, a:b],
                                                         kv.values[:, :, a:b], self.attention_chunk, self.smooth))

        def at(keep: float) -> torch.Tensor:
            blend = self.blend if self.blend is not None else 1.0 - keep
            scores = torch.full((L, H, T), torch.inf)
            scores[:, :, a:b] = blend * lev + att
            return scores

        return at
