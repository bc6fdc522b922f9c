"""KV-CAT's train-time KV sparsification: which prefix slots the positions after a split may attend to.

One training sequence is a window of ``T`` document tokens split at ``s``, followed by a copy of its
suffix (the ``n = T - s`` tokens after the split, at their own positions ``s..T-1``):

    [ x_0 ... x_{s-1}  x_s ... x_{T-1} | x_s ... x_{T-1} ]
      prefix           suffix            suffix copy (n rows)

- the window's rows attend causally to the window: the dense pass, whose next-token loss keeps the
  model's uncompressed behaviour;
- the copy's rows attend to the prefix slots the policy keeps, per layer and KV head (a ragged set: each
  head its own tokens, ``k`` of them, or with scope ``layer`` ``k * Hkv`` over the layer's heads, so that
  heads keep different counts as a ScoredCompressor's default selection gives them), and causally to the
  copy: the compressed pass, distilled towards the frozen base model's dense predictions of the same tokens.

So one forward over ``T + n`` tokens gives both passes. The policies (``k`` slots per head, the first
``sink`` always among them):

random     a uniform draw per (layer, head), from the seed and the step
attention  the slots the base model's suffix rows attend to most (summed over the head's query group)
router     a learned linear score over each slot's value vector per (layer, head); the kept slots'
           logits get ``log sigmoid(score)``, the bias through which the router learns (as KV-Distill's
           scorer; kvforge's artifacts carry the same per-entry ``beta``)
compactor  the slots kvforge's compactor would keep of the prefix, scored on the student's own queries
           and keys of the dense pass (its leverage and chunked attention, with its defaults): training
           against the post-hoc method itself, as the model will be compressed after training

With ``select_temp`` > 0 (compactor only) the selection also gets a gradient, straight through: the copy's
rows weigh each prefix slot's exp(logit) by ``w = hard + soft - soft.detach()``, where ``hard`` is the
kept mask (1 / 0) and ``soft = sigmoid((score - threshold) / (select_temp * std))`` (per selection, the
layer's or the head's as the scope says: the threshold midway between its last kept and first dropped score,
std that of its scores). The forward is the hard selection's, exactly; the backward tells each slot near
the threshold whether keeping it would have lowered the loss, through the compactor's scores into the
keys, queries and values that make them. ``select_grad`` scales that gradient (``w = hard + g * (soft -
soft.detach())``; 1 as is, below 1 a weaker push on the selection against the rest of the loss).

Shapes: masks and scores (Hkv, s) per layer; the attention function's query (1, Hq, S, D), key and
value (1, Hkv, S, D), output (1, S, Hq, D).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from ..architectures import capture_pre_rope_keys, kv_shape, layout_of
from ..attention import attention_names, text_attention
from ..methods.base import CompressionContext
from ..methods.compactor import Compactor
from ..prefill import KV

TRAIN_ATTN = "kvforge_cat_train"
POLICIES = ("random", "attention", "router", "compactor")
SCOPES = ("head", "layer")


def budget_mask(scores: torch.Tensor, k: int, sink: int, scope: str = "head") -> torch.Tensor:
    """(Hkv, s) bool: every head's first ``sink`` slots and the top-scoring others.

    scope "head":  exactly ``min(k, s)`` slots per head
    scope "layer": exactly ``Hkv * min(k, s)`` over the layer's heads, one top-k over all of them (heads get
                   different counts, as the compactor's selection at build time gives them)
    """
    H, s = scores.shape
    k = min(max(k, min(sink, s)), s)
    ranked = scores.detach().float().clone()
    ranked[:, : min(sink, s)] = torch.inf
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if scope == "layer":
        mask.view(-1)[torch.topk(ranked.view(-1), k=H * k, sorted=False).indices] = True
    else:
        mask.scatter_(1, torch.topk(ranked, k=k, dim=1, sorted=False).indices, True)
    return mask


class Router(torch.nn.Module):
    """One score per (layer, KV head, slot) from the slot's value vector: (Hkv, s, D) -> (Hkv, s)."""

    def __init__(self, layers: int, heads: int, head_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(layers, heads, head_dim, generator=g) / head_dim ** 0.5)
        self.bias = torch.nn.Parameter(torch.full((layers, heads), 2.0))  # sigmoid(2) = 0.88 at the start

    def forward(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        v = values.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.einsum("hsd,hd->hs", v, self.weight[layer]) + self.bias[layer][:, None]


class Pass:
    """One forward's layout and policy; the attention function reads it (None: plain text attention).

    teacher: the dense window only (T rows); records the suffix rows' attention over the prefix per layer
    student: the window and the suffix copy (T + n rows), the copy's prefix slots chosen by the policy
    """

    def __init__(self, window: int, split: int, k: int, policy: str, *, teacher: bool, sink: int = 4,
                 scope: str = "head", record: list | None = None, router: Router | None = None,
                 generator: torch.Generator | None = None, select_temp: float = 0.0, select_grad: float = 1.0):
        self.T, self.s, self.k, self.policy, self.teacher, self.sink = window, split, k, policy, teacher, sink
        self.scope = scope  # one of SCOPES: budget_mask's
        self.select_temp = select_temp  # > 0: the compactor's selection straight through (module docstring)
        self.select_grad = select_grad  # that gradient's scale
        self.record = record  # teacher: filled with (Hkv, s) per layer; student "attention": read
        self.router, self.generator = router, generator
        self.masks: list[torch.Tensor] = []  # student: the (Hkv, s) mask each layer used
        self.pre_keys: list[torch.Tensor] = []  # student "compactor": each layer's (Hkv, T + n, D) pre-RoPE keys

    def slots(self, layer: int, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """For the copy's rows: the kept mask (Hkv, s), the kept slots' bias (Hkv, s) or None, and the
        straight-through weights (Hkv, s) or None (equal to the mask, with the selection's gradient)."""
        prefix = value[0, :, : self.s]  # (Hkv, s, D)
        bias = weight = None
        if self.policy == "random":
            scores = torch.rand(prefix.shape[:2], generator=self.generator).to(prefix.device)
        elif self.policy == "attention":
            scores = self.record[layer]
        elif self.policy == "compactor":
            scores = self._compactor(layer, query, key, value)
        else:
            scores = self.router(layer, prefix)
            bias = F.logsigmoid(scores)
        mask = budget_mask(scores, self.k, self.sink, self.scope)
        self.masks.append(mask)
        if self.select_temp > 0 and scores.requires_grad:
            weight = straight_through(scores, mask, self.select_temp, self.scope, self.select_grad)
        return mask, bias, weight

    def _compactor(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The compactor's scores (Hkv, s) of the prefix at this pass's keep; with a gradient only when the
        selection is straight through (``select_temp`` > 0), else a plain selection."""
        s, grad = self.s, self.select_temp > 0 and torch.is_grad_enabled()

        def part(x):  # (1, H, S, D) -> the prefix's (1, H, s, D) in float32 on the CPU, as a build scores it
            x = x[:, :, :s].float().cpu()
            return x if grad else x.detach()

        with torch.set_grad_enabled(grad):
            kv = KV(keys=part(key), values=part(value), queries=part(query),
                    keys_pre_rope=part(self.pre_keys[layer][None]))  # L = 1
            keep = self.k / s
            scores = Compactor().scorer(kv, CompressionContext(seed=0, keep=keep))(keep)[0]  # a default build's sketch
        return scores.to(value.device)


def straight_through(scores: torch.Tensor, mask: torch.Tensor, temp: float, scope: str = "layer",
                     scale: float = 1.0) -> torch.Tensor:
    """(Hkv, s) weights equal to ``mask`` (1 kept, 0 dropped) whose gradient is ``scale`` times that of
    sigmoid((scores - threshold) / (temp * std)), per selection (the layer's heads together with scope "layer",
    each head with "head"): the threshold midway between its lowest kept and highest dropped finite score, std
    that of its finite scores. The protected slots score inf and get no gradient."""
    hard = mask.float()
    z = scores.float()
    finite = torch.isfinite(z.detach())
    rows = [slice(None)] if scope == "layer" else [slice(h, h + 1) for h in range(z.shape[0])]
    threshold, width = torch.zeros_like(hard), torch.ones_like(hard)
    moves = torch.zeros_like(finite)
    for r in rows:
        zd, f, m = z.detach()[r], finite[r], mask[r]
        kept, dropped = zd[m & f], zd[~m & f]
        if kept.numel() == 0 or dropped.numel() == 0:
            continue  # nothing near a threshold to move
        threshold[r] = 0.5 * (float(kept.min()) + float(dropped.max()))
        width[r] = temp * float(zd[f].std().clamp_min(1e-6))
        moves[r] = f
    soft = torch.sigmoid((torch.where(moves, z, threshold) - threshold) / width)
    soft = torch.where(moves, soft, hard)
    return hard + scale * (soft - soft.detach())  # exactly the mask forward: soft - soft is 0


_active: Pass | None = None


def activate(p: Pass | None) -> None:
    global _active
    _active = p


def _cat_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """See the module docstring; without an active pass, kvforge's text attention."""
    p = _active
    if p is None:
        return text_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    T, s = p.T, p.s
    layer = module.layer_idx
    group = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    dense = F.scaled_dot_product_attention(query[:, :, :T], k[:, :, :T], v[:, :, :T], is_causal=True, scale=scale)
    if p.teacher:
        logits = torch.matmul(query[:, :, s:T], k[:, :, :T].transpose(-1, -2)).float() * scale  # (1, Hq, n, T)
        causal = torch.ones(T - s, T, dtype=torch.bool, device=query.device).tril(diagonal=s)
        probs = torch.softmax(logits.masked_fill(~causal, -torch.inf), dim=-1)
        p.record.append(probs[0, :, :, :s].sum(dim=1).view(key.shape[1], group, s).sum(dim=1))  # (Hkv, s)
        return dense.transpose(1, 2).contiguous(), None
    n = query.shape[2] - T
    mask, bias, weight = p.slots(layer, query, key, value)
    cols = torch.cat([k[:, :, :s], k[:, :, T:]], dim=2)  # the prefix slots and the copy
    vals = torch.cat([v[:, :, :s], v[:, :, T:]], dim=2)
    logits = torch.matmul(query[:, :, T:], cols.transpose(-1, -2)).float() * scale  # (1, Hq, n, s + n)
    add = torch.zeros(key.shape[1], n, s + n, device=query.device)
    if weight is None:
        add[:, :, :s] = torch.where(mask, 0.0 if bias is None else bias, -torch.inf)[:, None, :]
    add[:, :, s:] = torch.zeros(n, n, device=query.device).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool, device=query.device).tril(), -torch.inf)
    probs = torch.softmax(logits + add.repeat_interleave(group, dim=0)[None], dim=-1)
    if weight is not None:  # every prefix slot in the softmax, then weighed: the kept ones' probabilities renormalized
        w = torch.cat([weight.to(probs.device), torch.ones(weight.shape[0], n, device=probs.device)], dim=1)
        probs = probs * w.repeat_interleave(group, dim=0)[None, :, None, :]
        probs = probs / probs.sum(-1, keepdim=True)
    copy = torch.matmul(probs.to(vals.dtype), vals)  # (1, Hq, n, D)
    return torch.cat([dense, copy], dim=2).transpose(1, 2).contiguous(), None


def forward(model, p: Pass, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s decoder over ``input_ids`` (1, S) with ``p`` active: the last hidden states (1, S, hidden).

    For the compactor policy the key module's outputs (the pre-RoPE keys) are captured on the way.
    """
    with ExitStack() as stack:
        if p.policy == "compactor" and not p.teacher:
            p.pre_keys = stack.enter_context(capture_pre_rope_keys(model, layout_of(model), *kv_shape(model.config)))
        activate(p)
        stack.callback(activate, None)
        return model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def install(model) -> None:
    """Switch a private model copy to the CAT training attention (text attention when no pass is active)."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    attention_names(TRAIN_ATTN, _cat_attention, sdpa_mask, eager_mask)
    model.set_attn_implementation(TRAIN_ATTN)


__all__ = ["POLICIES", "SCOPES", "Pass", "Router", "activate", "budget_mask", "forward", "install",
           "straight_through"]
