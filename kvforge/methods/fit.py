"""Shared machinery of the fitting methods (select_fit, sculpt) and of pilot allocation.

**Reference queries** stand in for the questions nobody knows at build time: the
post-RoPE queries the model itself produced while prefilling the document, a
seeded sample of positions per layer, every query head of a KV head's group.
A query captured at position ``t`` is rotated by RoPE to the document's end
(``q' = R(T - t) q``, as if the same query came with the question): questions
arrive after the document, so every document key is in their past, and a
reference that attends to "future" keys at negative distances would ask the fit
for the wrong thing. ``position="own"`` keeps the captured rotation (the
measurement that decided this is in BENCHMARKS.md).

**Targets** are what the full cache gives those queries, per layer and KV head:
the attention output ``O = softmax(Q K^T s) V`` and the log-mass
``lse = logsumexp(Q K^T s)``; the mass decides how a prefix weighs against the
question's own tokens once those are appended.

Shapes: per layer, queries ``(H, M, D)`` with ``M = group * samples``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..prefill import KV, attention_scale


@dataclass
class Reference:
    """Reference queries of one document: per layer (H, M, D) float32, and the attention scale."""

    queries: list[torch.Tensor]
    scale: float
    _targets: dict = field(default_factory=dict, repr=False, compare=False)  # layer -> (keys, out, lse)

    def targets(self, kv: KV, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-cache output (H, M, D) and log-mass (H, M) of the reference queries at ``layer``.

        Computed once per layer for a given cache: a build asks for them in every value refit and
        optimization of the same document (the pilot's and the final one's). Treat as read-only.
        """
        hit = self._targets.get(layer)
        if hit is None or hit[0] is not kv.keys:
            out, lse = attend(self.queries[layer], kv.keys[layer].float(), kv.values[layer].float(), self.scale)
            hit = self._targets[layer] = (kv.keys, out, lse)
        return hit[1], hit[2]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, beta: torch.Tensor | None = None,
           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of q (H, M, D) over k, v (H, n, D) with optional beta / valid (H, n).

    Returns the output (H, M, D) and the log-mass (H, M) of the logits. Without autograd the
    (H, M, n) logits are turned into weights in place (half the memory traffic of the
    differentiable path, which sculpt's optimization uses).
    """
    logits = torch.einsum("hmd,hnd->hmn", q, k) * scale
    if beta is not None:
        logits = logits + beta[:, None, :]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], -1e30)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta))
    if not grads:
        peak = logits.amax(dim=-1, keepdim=True)  # (H, M, 1)
        weights = logits.sub_(peak).exp_()
        mass = weights.sum(dim=-1, keepdim=True)
        return torch.bmm(weights, v).div_(mass), (mass.log() + peak)[..., 0]
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("hmn,hnd->hmd", torch.exp(logits - lse[..., None]), v)
    return out, lse


def hf_model(ctx):
    """The transformers model of a CompressionContext (None without a model: tests on random tensors)."""
    return getattr(ctx.model, "model", None) if ctx.model is not None else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def reference(kv: KV, model=None, samples: int = 256, position: str = "end", seed: int = 0) -> Reference:
    """Sample reference queries from the prefill's captured queries.

    kv.queries: (L, Hq, T, D) post-RoPE. ``model`` (the HF model) provides the rotary
    embedding for ``position="end"``; without it the captured rotation is kept.
    """
    if kv.queries is None:
        raise ValueError("reference queries need the prefill's queries (needs_queries = True)")
    T = kv.queries.shape[2]
    return sample_reference(kv.queries, torch.arange(T), T, kv.shape[1], model, samples, position, seed)


@torch.no_grad()
def sample_reference(queries: torch.Tensor, positions: torch.Tensor, T: int, kv_heads: int, model=None,
                     samples: int = 256, position: str = "end", seed: int = 0) -> Reference:
    """:func:`reference` over any bank of captured queries: (L, Hq, P, D) post-RoPE, each at its
    ``positions`` (P,), for a document of ``T`` tokens with ``kv_heads`` KV heads.

    A seeded sample of ``samples`` of the P columns, each rotated from its position to ``T``.
    """
    L, Hq, P, D = queries.shape
    group = Hq // kv_heads
    g = torch.Generator().manual_seed(seed)
    n = min(samples, P)
    idx = torch.sort(torch.randperm(P, generator=g)[:n]).values  # (n,)
    q = queries[:, :, idx].float()  # (L, Hq, n, D)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None) if model is not None else None
    if position == "end" and rotary is not None:
        shift = (T - positions[idx]).unsqueeze(0)  # (1, n): rotate each query from its position to T
        dev = next(model.parameters()).device
        cos, sin = (t.float().cpu() for t in rotary(q[0, :1].to(dev), shift.to(dev)))  # (1, n, R), R <= D
        r = cos.shape[-1]  # partial rotary (Phi-3): only the first R dims rotate
        q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
    elif position not in ("end", "own"):
        raise ValueError(f"position must be 'end' or 'own', got {position!r}")
    # (L, Hq, n, D) -> per layer (H, group * n, D): a KV head's reference is its query heads' queries
    per_layer = [q[l].reshape(kv_heads, group * n, D).contiguous() for l in range(L)]
    return Reference(queries=per_layer, scale=attention_scale(model, D) if model is not None else D ** -0.5)


def fit_values(probs: torch.Tensor, target: torch.Tensor, v0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares values: argmin ||probs V - target||^2 + lam ||V - v0||^2.

    probs (M, k), target (M, D), v0 (k, D) -> (k, D). ``lam = ridge * mean(diag(probs^T probs))``
    pulls under-determined entries (few queries, near-duplicate keys) toward their original values.
    Solved for the correction ``V - v0`` through the smaller of the two equivalent systems, with
    ``r = target - A v0``: the (k, k) normal equations ``(A^T A + lam I) dV = A^T r``, or, when
    there are more kept entries than queries, the (M, M) dual ``dV = A^T (A A^T + lam I)^-1 r``
    (the same solution, at M^2 k instead of k^2 M + k^3). Gram products are formed in float32
    (probabilities: no cancellation). The system is solved in float32 when the ridge bounds its
    condition number by 1e5 (trace / lam; the default ridge 0.1 gives 10 k for k entries): the
    error then lands on the correction, not on the values (dual form on real heads at keep 0.7:
    at most 4e-4 of the correction against float64, far inside the float16 the values are stored
    in). Otherwise, or if the float32 Cholesky fails, in float64, with a least-squares fallback
    for a singular system.
    """
    a = probs.float()
    M, k = a.shape
    trace = float((a * a).sum())  # of A^T A and of A A^T, without forming either
    lam = max(ridge * trace / max(k, 1), 1e-12 * ridge)  # ridge * mean(diag(A^T A))
    dual = k > M
    resid = target.float() - a @ v0.float()  # (M, D)
    gram = a @ a.T if dual else a.T @ a
    lhs = gram + lam * torch.eye(gram.shape[0])
    rhs = resid if dual else a.T @ resid
    if trace > 1e5 * lam:  # trace / lam bounds the condition number: a loose ridge needs float64
        lhs, rhs = lhs.double(), rhs.double()
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0 and lhs.dtype != torch.float64:
        lhs, rhs = lhs.double(), rhs.double()
        chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs, chol)
    else:
        sol = torch.linalg.lstsq(lhs, rhs).solution
    out = v0.float() + (a.T @ sol.float() if dual else sol.float())
    return torch.where(torch.isfinite(out), out, v0.float())


@torch.no_grad()
def match_mass(logits: torch.Tensor, lse: torch.Tensor, ridge: float = 1e-3, floor: float = 1e-4) -> torch.Tensor:
    """Per-entry beta (n,) with which one head's kept entries carry the full cache's attention mass.

    logits (M, n): the reference queries' scaled logits over the head's kept keys; lse (M,): the full
    cache's log-mass for the same queries. The weights ``w = exp(beta)`` are the least-squares solution of
    ``A w = 1`` with ``A = exp(logits - lse)`` (M, n), each kept entry's share of a query's full mass, by
    :func:`fit_values` (ridge toward w = 1), clipped to ``floor``: a kept entry takes on the mass of the
    dropped entries the same queries attended to, where one mass beta per head
    (:func:`kvforge.train.student.mass_beta`) lifts all of a head's entries alike. The mass is fitted this
    way in Zweiger et al. 2025 ("Fast KV compaction via attention matching", with non-negative least
    squares; the clipped solution costs one solve, as the value refit).
    """
    A = torch.exp(logits.float() - lse.float()[:, None])  # (M, n)
    ones = torch.ones(A.shape[0], 1)
    return fit_values(A, ones, torch.ones(A.shape[1], 1), ridge)[:, 0].clamp_min(floor).log()


def head_errors(kv: KV, compressed, ref: Reference) -> torch.Tensor:
    """Per (layer, KV head) difficulty of a compressed cache: relative output error + log-mass error.

    (L, H) float32; ``compressed`` is a CompressedKV (beta applied when present).
    """
    L, H = compressed.lengths.shape
    errors = torch.zeros(L, H)
    for layer in range(L):
        out, lse = ref.targets(kv, layer)
        offsets = compressed.layer_offsets(layer)
        for h in range(H):
            a, b = offsets[h], offsets[h + 1]
            if b == a:
                errors[layer, h] = 2.0  # nothing kept: the whole output and mass are lost
                continue
            beta = compressed.beta[layer][a:b][None] if compressed.beta is not None else None
            o, s = attend(ref.queries[layer][h:h + 1], compressed.keys[layer][a:b][None].float(),
                          compressed.values[layer][a:b][None].float(), ref.scale, beta)
            rel = ((o[0] - out[h]) ** 2).sum() / (out[h] ** 2).sum().clamp_min(1e-12)
            errors[layer, h] = float(rel) + float(((s[0] - lse[h]) ** 2).mean())
    return errors
