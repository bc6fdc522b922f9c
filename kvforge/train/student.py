"""One training example through the teacher (dense cache) and the student (compressed, adapted cache).

A sequence is a document window (``T`` tokens of the document segment) followed by a probe (a question
segment and its answer). Both passes run it in one forward with kvforge's training attention:

- the document's rows attend causally to the whole document, as in a prefill;
- the probe's rows attend to the document's entries through an additive bias (teacher: 0 everywhere;
  student: -inf on the dropped entries and, on the kept ones, as the runtime applies an artifact's
  ``beta``: with a token scorer ``log sigmoid(score)`` in every layer and head; with an entry scorer each
  (layer, head) its own kept set and either the mass its dropped entries had, :func:`mass_beta`
  (``fit="head"``), or each kept entry's own beta fitted as the build fits it, :func:`matched_bias`
  (``fit="match"``), and with ``fit="build"`` also the kept entries' values refitted under it, as the
  build refits them, :func:`refit_kept_values`: the student then reads the cache a ``distill`` build
  writes) and causally to the probe.

In the student, the kept document tokens also run through the LoRA-adapted projections (layers from
``first_layer`` on; with an entry scorer, in each layer the tokens some head of it keeps), so that their
keys and values can absorb what the dropped tokens carried; the probe runs on the base weights, as a
question does at query time. The loss is KV-Distill's mix of forward and reverse KL on the answer tokens.
A token scorer learns in the same loss, with kvforge's ranking term: its softmax over the document is
pulled towards where the teacher's answer tokens attend (gradients through ``beta`` alone only reach the
kept tokens). An entry scorer is fitted before, to the replay's attribution (:mod:`kvforge.train.targets`),
and stays fixed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import attention_names, text_attention

TRAIN_ATTN = "kvforge_distill_train"
FORWARD_WEIGHT = 0.6  # lambda: KL(p||q) weight; KV-Distill found 0.6 better than pure forward or reverse KL


@dataclass
class Example:
    """context: T document-segment ids; probe: question segment + answer ids; the answer starts at
    ``answer_start`` within the probe (the loss covers the predictions of the answer tokens)."""

    context: list[int]
    probe: list[int]
    answer_start: int
    kind: str = ""

    @property
    def answer_positions(self) -> torch.Tensor:
        """Positions (in the whole sequence) whose next-token distribution is scored: (n,)."""
        T = len(self.context)
        return torch.arange(T + self.answer_start - 1, T + len(self.probe) - 1)


@dataclass
class Teacher:
    """What the dense pass gives, computed once per example and reused.

    logprobs:   (n, V) bfloat16, the answer tokens' next-token log-probabilities over the full cache
    hidden:     (T, d) float32, the hidden states entering ``first_layer`` (the scorer's input)
    importance: (T,) float32, sums to 1: the answer rows' attention to each document token (all layers, heads)
    """

    logprobs: torch.Tensor
    hidden: torch.Tensor
    importance: torch.Tensor


FITS = ("head", "match", "build")  # what the entry scorer's kept entries get in training (student_loss)


class _Pass:
    """One forward's layout. bias: (m, S) additive bias of the probe rows, shared by every layer and head; or
    kept: (L, H, T) bool, each (layer, KV head) its own kept entries, with the mass beta of ``reference``
    document rows, or with ``match`` (the HF ``model``, for the rotary) each entry's matched beta, and with
    ``refit`` their values refitted under it (and a causal 0 / -inf block over the probe)."""

    def __init__(self, context: int, bias: torch.Tensor | None = None, record_rows: slice | None = None,
                 kept: torch.Tensor | None = None, reference: int = 0, device=None, match=None,
                 refit: bool = False):
        self.context = context  # T
        self.bias = bias
        self.kept = kept
        self.reference = reference
        self.match = match
        self.refit = refit  # with match: the kept values refitted as the build refits them (refit_kept_values)
        self.layer: tuple | None = None  # the current layer's (reference queries (H, M, D), doc bias (H, T))
        self.record_rows = record_rows  # probe rows whose attention over the document is summed (teacher)
        self.record = torch.zeros(context, device=device) if record_rows is not None else None

    def probe_bias(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
        """(Hq or 1, m, S) additive bias of the probe rows in ``layer``."""
        if self.kept is None:
            return self.bias
        T, S = self.context, key.shape[2]
        m = S - T
        kept = self.kept[layer]  # (H, T)
        group = query.shape[1] // key.shape[1]
        if self.match is not None:
            ref = reference_queries(query[0, :, :T].detach(), key.shape[1], self.match)
            doc = matched_bias(ref, key[0, :, :T].detach(), kept, scale)
            self.layer = (ref, doc)
        else:
            beta = torch.zeros(kept.shape[0], device=query.device)
            if self.reference > 0:
                beta = mass_beta(query[0, :, T - min(self.reference, T):T].detach(), key[0, :, :T].detach(), kept,
                                 scale)
            doc = torch.where(kept, beta[:, None], torch.full_like(beta[:, None], float("-inf")))  # (H, T)
        doc = doc.repeat_interleave(group, dim=0)[:, None, :].expand(-1, m, T)  # (Hq, m, T)
        causal = torch.full((m, m), float("-inf"), device=query.device).triu(1)
        return torch.cat([doc, causal[None].expand(doc.shape[0], m, m)], dim=2)


_active: _Pass | None = None


def mass_beta(queries: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """Each KV head's log ratio of attention mass, whole document over kept entries: (H,) float32, >= 0.

    queries: (Hq, R, D), the document's last R queries (the nearest stand-in for a question's);
    keys: (H, T, D), post-RoPE; kept: (H, T) bool. The kept entries' logits raised by this bias carry, for
    a typical query, the mass of the whole document, so that the question's own tokens are not
    over-weighted against a prefix that lost most of its entries (the mass term of sculpt's fit, in
    closed form for one number per head). Heads with every entry kept get 0.
    """
    H, T, _ = keys.shape
    group = queries.shape[0] // H
    logits = torch.einsum("hrd,htd->hrt", queries.float(), keys.float().repeat_interleave(group, dim=0)) * scale
    full = torch.logsumexp(logits, dim=-1)  # (Hq, R)
    mask = kept.repeat_interleave(group, dim=0)[:, None, :]  # (Hq, 1, T)
    part = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return (full - part).view(H, group, -1).mean(dim=(1, 2)).clamp_min(0.0)


@torch.no_grad()
def reference_queries(queries: torch.Tensor, kv_heads: int, model, seed: int = 0) -> torch.Tensor:
    """(H, M, D) float32 on the CPU: the build's reference queries for the matched beta and the refit.

    queries: (Hq, T, D) the document's post-RoPE queries; ``model`` the HF model (its rotary). As the build
    (:class:`kvforge.methods.distill.Distill`): ``MATCH_SAMPLES`` seeded document queries rotated to the
    document's end, a KV head's group of query heads together (:func:`kvforge.methods.fit.sample_reference`).
    """
    from ..methods.distill import MATCH_SAMPLES
    from ..methods.fit import sample_reference

    T = queries.shape[1]
    return sample_reference(queries.float().cpu()[None], torch.arange(T), T, kv_heads, model, MATCH_SAMPLES,
                            "end", seed).queries[0]


@torch.no_grad()
def matched_bias(ref: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, T) float32: each kept entry's matched beta, -inf on the dropped ones (no gradient).

    ref: (H, M, D) :func:`reference_queries`; keys: (H, T, D) post-RoPE; kept: (H, T) bool. Per KV head the
    least-squares weights with which the kept entries carry the full document's mass for the reference
    (:func:`kvforge.methods.fit.match_mass`), as ``distill:match=1`` builds (on the CPU, as the build does).
    """
    from ..methods.fit import match_mass

    H, T, _ = keys.shape
    logits = torch.einsum("hmd,htd->hmt", ref, keys.float().cpu()) * scale  # (H, M, T)
    lse = torch.logsumexp(logits, dim=-1)  # (H, M): the full document's log-mass
    bias = torch.full((H, T), float("-inf"))
    mask = kept.cpu()
    for h in range(H):
        idx = mask[h].nonzero()[:, 0]
        if len(idx):
            bias[h, idx] = match_mass(logits[h][:, idx], lse[h])
    return bias.to(keys.device)


def refit_kept_values(ref: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float,
                      ridge: float) -> torch.Tensor:
    """(H, T, D) float32: ``values`` with every head's kept entries (finite ``bias``) refitted as the build's
    value refit does (:func:`kvforge.methods.select_fit.refit_values` under the matched beta), with autograd.

    ref: (H, M, D) reference queries; keys, values: (H, T, D) the student's document entries; bias: (H, T)
    from :func:`matched_bias`. The targets (the whole document's outputs for the reference) and the
    starting values carry gradients; the kept entries' attention weights are taken as constants (the
    probe's own logits already give the keys theirs). Computed on the CPU, as the build does.
    """
    from ..methods.fit import fit_values

    k, v, b = keys.float().cpu(), values.float().cpu(), bias.cpu()
    logits = torch.einsum("hmd,htd->hmt", ref, k) * scale  # (H, M, T)
    target = torch.einsum("hmt,htd->hmd", torch.softmax(logits, dim=-1), v)  # (H, M, D): the full document's output
    heads = []
    for h in range(k.shape[0]):
        idx = torch.isfinite(b[h]).nonzero()[:, 0]
        new = v[h]
        if len(idx):
            probs = torch.softmax(logits[h][:, idx].detach() + b[h, idx], dim=-1)  # (M, n)
            new = new.index_put((idx,), fit_values(probs, target[h], v[h, idx], ridge))
        heads.append(new)
    return torch.stack(heads).to(values.device)


def _train_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (1, Hq, S, D), key / value (1, Hkv, S, D) -> (1, S, Hq, D): see the module docstring."""
    p = _active
    if p is None:
        return text_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    T = p.context
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    doc = F.scaled_dot_product_attention(query[:, :, :T], k[:, :, :T], v[:, :, :T], is_causal=True, scale=scale)
    bias = p.probe_bias(module.layer_idx, query, key, scale)
    if p.refit and p.layer is not None:  # the probe reads the kept entries' refitted values, as from an artifact
        from ..methods.distill import REFIT_RIDGE

        ref, doc_bias = p.layer
        fitted = refit_kept_values(ref, key[0, :, :T], value[0, :, :T], doc_bias, scale, REFIT_RIDGE)  # (H, T, D)
        v = torch.cat([fitted.to(v.dtype)[None].repeat_interleave(group, dim=1), v[:, :, T:]], dim=2)
    logits = torch.matmul(query[:, :, T:], k.transpose(-1, -2)) * scale + bias.to(query.dtype)  # (1, Hq, m, S)
    probs = torch.softmax(logits.float(), dim=-1)
    if p.record is not None:
        p.record += probs[0, :, p.record_rows, :T].detach().sum(dim=(0, 1))
    probe = torch.matmul(probs.to(v.dtype), v)  # (1, Hq, m, D)
    return torch.cat([doc, probe], dim=2).transpose(1, 2).contiguous(), None


def install(model) -> None:
    """Switch a private model copy to the training attention (plain text attention when no pass is active)."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    attention_names(TRAIN_ATTN, _train_attention, sdpa_mask, eager_mask)
    model.set_attn_implementation(TRAIN_ATTN)


def protected_tokens(T: int, sink: int, recent: int, device=None) -> torch.Tensor:
    """(T,) bool: the first ``sink`` (at least one) and last ``recent`` tokens, always kept."""
    protected = torch.zeros(T, dtype=torch.bool, device=device)
    protected[: max(sink, 1)] = True
    if recent > 0:
        protected[-recent:] = True
    return protected


def select_tokens(scores: torch.Tensor, k: int, sink: int, recent: int) -> torch.Tensor:
    """(T,) bool: the ``sink`` first and ``recent`` last tokens plus the top-scoring others, ``k`` in all
    (never fewer than the protected ones)."""
    T = scores.shape[0]
    protected = protected_tokens(T, sink, recent, scores.device)
    ranked = torch.where(protected, torch.inf, scores.detach().float())
    keep = torch.zeros(T, dtype=torch.bool, device=scores.device)
    keep[torch.topk(ranked, k=min(T, max(k, int(protected.sum()))), sorted=False).indices] = True
    return keep


def _entry_ranking(scores: torch.Tensor, sink: int, recent: int) -> tuple[torch.Tensor, int]:
    """(L, H, T) scores with the protected tokens at +inf and NaN at -inf, and how many tokens are protected."""
    protected = protected_tokens(scores.shape[-1], sink, recent, scores.device)
    ranked = torch.nan_to_num(scores.detach().float(), nan=-torch.inf).clone()
    ranked[:, :, protected] = torch.inf
    return ranked, int(protected.sum())


def select_entries(scores: torch.Tensor, total: int, sink: int, recent: int) -> torch.Tensor:
    """(L, H, T) bool: in every head the protected tokens, and over all heads of all layers the
    top-scoring others, ``total`` entries in all (never fewer than the protected ones): one top-k over the
    document's entries, so that layers and heads get ragged shares."""
    L, H, T = scores.shape
    ranked, n_protected = _entry_ranking(scores, sink, recent)
    k = min(L * H * T, max(int(total), L * H * n_protected))
    keep = torch.zeros(L * H * T, dtype=torch.bool, device=scores.device)
    keep[torch.topk(ranked.reshape(-1), k=k, sorted=False).indices] = True
    return keep.view(L, H, T)


def select_per_head(scores: torch.Tensor, counts: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """(L, H, T) bool: every (layer, head) keeps its ``counts`` (L, H) top-scoring entries, protected first."""
    L, H, T = scores.shape
    ranked, n_protected = _entry_ranking(scores, sink, recent)
    keep = torch.zeros(L, H, T, dtype=torch.bool, device=scores.device)
    for layer in range(L):
        for h in range(H):
            n = min(T, max(int(counts[layer, h]), n_protected))
            keep[layer, h, torch.topk(ranked[layer, h], k=n, sorted=False).indices] = True
    return keep


def route_of(kept: torch.Tensor) -> torch.Tensor:
    """(L, T) float: 1 where some KV head of the layer keeps the token (the tokens LoRA adapts there)."""
    return kept.any(dim=1).float()


def _probe_bias(T: int, m: int, doc_bias: torch.Tensor) -> torch.Tensor:
    """(m, T + m): ``doc_bias`` (T,) over the document for every probe row, then a causal 0 / -inf block."""
    causal = torch.full((m, m), float("-inf"), device=doc_bias.device).triu(1)
    return torch.cat([doc_bias[None].expand(m, T), causal], dim=1)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states (1, S, d) a decoder layer's forward pre-hook (``with_kwargs=True``) is given."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_at(model, layer: int, store: list):
    """A hook (remove it after) that appends the hidden states entering decoder layer ``layer``: (1, S, d)."""
    return model.model.layers[layer].register_forward_pre_hook(
        lambda mod, args, kwargs: store.append(layer_input(args, kwargs)), with_kwargs=True)


def _answer_logits(model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden[0, positions]).float()  # (n, V)


@torch.no_grad()
def teacher_pass(dm, ex: Example) -> Teacher:
    """The dense pass on the base weights (adapter off)."""
    global _active
    T, m = len(ex.context), len(ex.probe)
    device = next(dm.model.parameters()).device
    ids = torch.tensor([ex.context + ex.probe], device=device)
    store: list = []
    with dm.routed(None) as model:
        hook = hidden_at(model, dm.cfg.first_layer, store)
        _active = _Pass(T, _probe_bias(T, m, torch.zeros(T, device=device)), slice(ex.answer_start - 1, m - 1),
                        device=device)
        try:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            record = _active.record
        finally:
            _active = None
            hook.remove()
    logprobs = torch.log_softmax(_answer_logits(model, hidden, ex.answer_positions), dim=-1)
    importance = record / record.sum().clamp_min(1e-12)
    return Teacher(logprobs=logprobs.to(torch.bfloat16).cpu(), hidden=store[0][0, :T].float().cpu(),
                   importance=importance.float().cpu())


def mixed_kl(p_log: torch.Tensor, q_log: torch.Tensor, forward: float = FORWARD_WEIGHT) -> torch.Tensor:
    """lambda KL(p||q) + (1 - lambda) KL(q||p), mean over positions; both (n, V) log-probabilities."""
    p, q = p_log.exp(), q_log.exp()
    fwd = (p * (p_log - q_log)).sum(-1)
    rev = (q * (q_log - p_log)).sum(-1)
    return (forward * fwd + (1 - forward) * rev).mean()


def student_loss(dm, ex: Example, teacher: Teacher, keep: float, rank_weight: float,
                 fit: str) -> tuple[torch.Tensor, dict]:
    """The student's loss on one example at ``keep``: (loss with its graph, its parts as floats). ``fit``
    (entry scorer, :data:`FITS`): "head" the per-head mass beta, "match" each kept entry's matched beta,
    "build" the matched beta and the kept values refitted under it (module docstring)."""
    global _active
    T, m = len(ex.context), len(ex.probe)
    device = next(dm.model.parameters()).device
    cfg = dm.cfg
    ids = torch.tensor([ex.context + ex.probe], device=device)
    if cfg.scorer == "entry":  # the scorer is fitted beforehand (kvforge.train.targets) and fixed here
        with torch.no_grad():
            scores = dm.scorer(teacher.hidden.to(device))  # (L, H, T)
        kept = select_entries(scores, round(keep * scores.numel()), cfg.sink, cfg.recent)
        route = torch.cat([route_of(kept), torch.zeros(kept.shape[0], m, device=device)], dim=1)  # (L, T + m)
        layout = _Pass(T, kept=kept, reference=cfg.reference, match=None if fit == "head" else dm.model,
                       refit=fit == "build")
    else:
        scores = dm.scorer(teacher.hidden.to(device))  # (T,)
        kept = select_tokens(scores, round(keep * T), cfg.sink, cfg.recent)
        doc_bias = torch.where(kept, F.logsigmoid(scores), torch.full_like(scores, float("-inf")))
        route = torch.cat([kept.float(), torch.zeros(m, device=device)])  # adapter on the kept document tokens only
        layout = _Pass(T, _probe_bias(T, m, doc_bias))
    with dm.routed(route) as model:
        _active = layout
        try:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            _active = None
    q_log = torch.log_softmax(_answer_logits(model, hidden, ex.answer_positions), dim=-1)
    kl = mixed_kl(teacher.logprobs.to(device).float(), q_log)
    if cfg.scorer == "entry":
        return kl, {"loss": float(kl.detach()), "kl": float(kl.detach()), "rank": 0.0, "keep": keep}
    free = ~protected_tokens(T, cfg.sink, cfg.recent, device)
    target = teacher.importance.to(device)[free]
    rank = -(target / target.sum().clamp_min(1e-12) * torch.log_softmax(scores[free], dim=-1)).sum()
    loss = kl + rank_weight * rank
    return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "rank": float(rank.detach()), "keep": keep}
