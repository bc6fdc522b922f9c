"""One training example through the teacher (dense cache) and the student (compressed, adapted cache).

A sequence is a document window (``T`` tokens of the document segment) followed by a probe (a question
segment and its answer). Both passes run it in one forward with kvforge's training attention:

- the document's rows attend causally to the whole document, as in a prefill;
- the probe's rows attend to the document's entries through an additive bias (teacher: 0 everywhere;
  student: ``log sigmoid(score)`` on the kept tokens, -inf on the dropped ones, in every layer and head,
  as the runtime applies an artifact's ``beta``) and causally to the probe.

In the student, the kept document tokens also run through the LoRA-adapted projections (layers from
``first_layer`` on), so that their keys and values can absorb what the dropped tokens carried; the probe
runs on the base weights, as a question does at query time. The loss is KV-Distill's mix of forward and
reverse KL on the answer tokens, plus kvforge's ranking term: the scorer's softmax over the document is
pulled towards where the teacher's answer tokens attend (a question-agnostic scorer learns what questions
about such text look at; gradients through ``beta`` alone only reach the kept tokens).
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


class _Pass:
    def __init__(self, context: int, bias: torch.Tensor, record_rows: slice | None = None):
        self.context = context  # T
        self.bias = bias  # (m, S) additive bias of the probe rows
        self.record_rows = record_rows  # probe rows whose attention over the document is summed (teacher)
        self.record = torch.zeros(context, device=bias.device) if record_rows is not None else None


_active: _Pass | None = None


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
    logits = torch.matmul(query[:, :, T:], k.transpose(-1, -2)) * scale + p.bias.to(query.dtype)  # (1, Hq, m, S)
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


def _probe_bias(T: int, m: int, doc_bias: torch.Tensor) -> torch.Tensor:
    """(m, T + m): ``doc_bias`` (T,) over the document for every probe row, then a causal 0 / -inf block."""
    causal = torch.full((m, m), float("-inf"), device=doc_bias.device).triu(1)
    return torch.cat([doc_bias[None].expand(m, T), causal], dim=1)


def _hidden_at(model, layer: int, store: list):
    return model.model.layers[layer].register_forward_pre_hook(
        lambda mod, args, kwargs: store.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)


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
        hook = _hidden_at(model, dm.cfg.first_layer, store)
        _active = _Pass(T, _probe_bias(T, m, torch.zeros(T, device=device)), slice(ex.answer_start - 1, m - 1))
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


def student_loss(dm, ex: Example, teacher: Teacher, keep: float, rank_weight: float) -> tuple[torch.Tensor, dict]:
    """The student's loss on one example at ``keep``: (loss with its graph, its parts as floats)."""
    global _active
    T, m = len(ex.context), len(ex.probe)
    device = next(dm.model.parameters()).device
    cfg = dm.cfg
    scores = dm.scorer(teacher.hidden.to(device))  # (T,)
    kept = select_tokens(scores, round(keep * T), cfg.sink, cfg.recent)
    doc_bias = torch.where(kept, F.logsigmoid(scores), torch.full_like(scores, float("-inf")))
    route = torch.cat([kept.float(), torch.zeros(m, device=device)])  # adapter on the kept document tokens only
    ids = torch.tensor([ex.context + ex.probe], device=device)
    with dm.routed(route) as model:
        _active = _Pass(T, _probe_bias(T, m, doc_bias))
        try:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            _active = None
    q_log = torch.log_softmax(_answer_logits(model, hidden, ex.answer_positions), dim=-1)
    kl = mixed_kl(teacher.logprobs.to(device).float(), q_log)
    free = ~protected_tokens(T, cfg.sink, cfg.recent, device)
    target = teacher.importance.to(device)[free]
    rank = -(target / target.sum().clamp_min(1e-12) * torch.log_softmax(scores[free], dim=-1)).sum()
    loss = kl + rank_weight * rank
    return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "rank": float(rank.detach()), "keep": keep}
