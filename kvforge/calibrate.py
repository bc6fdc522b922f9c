"""Context-calibrated keep: the smallest keep whose quality proxy stays within a tolerance.

Query-agnostic and document-only. The proxy asks the model to recall the
document: ``probes`` passages, half spread evenly over it and half where it says
something it does not repeat (the spans with most non-repeated 4-grams); each probe is a
question turn that quotes a short cue from the passage ("Quote the text that
follows ...") and, teacher-forced, the passage's next ``target`` tokens as the
answer. The proxy value of a candidate cache is the mean KL(full || candidate)
over those answer tokens: how much the model's recall of this document moves
when the cache is compressed. A redundant document (boilerplate, repetition)
keeps recall at a small keep; a dense one (many distinct facts) needs more.

Cost: one prefill and one scoring pass, shared by all candidates
(``Compressor.prepare``); per candidate only the selection and one short
forward per probe over the ragged cache (logits only on the answer rows).
The probes are not concatenated into one forward: in a repetitive document
a later probe's answer can be copied from an earlier probe's quoted text
instead of from the cache, which hid compression damage (measured in
docs/experiments/calibration.md).
Candidates are searched by bisection on a grid (the proxy falls as the keep
grows), so about log2(len(grid)) of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .methods import Budget, CompressionContext, Compressor
from .methods.base import keep_all
from .model import LoadedModel
from .prefill import KV
from .ragged import CompressedKV
from .runtime import Doc

GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)  # floor 0.1: docs/experiments/calibration.md
DEFAULT_TOLERANCE = 0.1


@dataclass
class CalibrationConfig:
    """How ``--keep auto`` searches. ``tolerance``: the largest mean KL (nats/token) accepted."""

    tolerance: float = DEFAULT_TOLERANCE
    grid: tuple[float, ...] = GRID
    probes: int = 6
    cue: int = 12
    target: int = 24
    aggregate: str = "mean"  # over the probes' mean KLs: "mean", or "max" (no passage may be forgotten)

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "max"):
            raise ValueError(f"aggregate must be 'mean' or 'max', got {self.aggregate!r}")


@dataclass
class Calibration:
    """The outcome, recorded in the artifact (``compression.extra.calibration``) and the manifest."""

    tolerance: float
    keep: float
    proxy: str
    probes: int
    probe_tokens: int
    trace: list[dict] = field(default_factory=list)  # [{"keep", "kl", "top1"}] in search order
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def novelty(ids: list[int], n: int = 4) -> list[int]:
    """1 where the n-gram ending at a token occurs once in ``ids``, else 0: where a document says
    something it does not repeat (a fact in boilerplate, a row that differs from the others)."""
    grams = [tuple(ids[max(0, i - n + 1):i + 1]) for i in range(len(ids))]
    counts: dict[tuple, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return [int(counts[g] == 1) for g in grams]


def probe_starts(ids: list[int], start: int, cfg: CalibrationConfig) -> list[int]:
    """Where the probes' cues begin: up to half of them at the spans with the most non-repeated
    4-grams (not overlapping each other), the rest spread evenly over the body, the last span
    ending at its end.

    Even spreading alone misses what matters in a redundant document: its one distinct fact sits
    in one place, and recall of the repetition around it survives small keeps (BENCHMARKS.md,
    section 4).
    """
    body = len(ids) - start
    span = cfg.cue + cfg.target
    n = max(1, min(cfg.probes, body // span))
    new = novelty(ids)
    prefix = [0]
    for x in new:
        prefix.append(prefix[-1] + x)
    score = {s: prefix[s + span] - prefix[s] for s in range(start, len(ids) - span + 1)}
    novel: list[int] = []
    for s in sorted(score, key=lambda s: (-score[s], s)):
        if len(novel) >= n // 2 or score[s] == 0:
            break
        if all(abs(s - t) >= span for t in novel):
            novel.append(s)
    k = n - len(novel)
    even = [start + round(i * (body - span) / max(1, k - 1)) for i in range(k)] if k > 1 else [start]
    for i, e in enumerate(even):  # an even start that repeats a novel one moves just past it (or before)
        for t in novel:
            if e == t:
                e = t + span if t + span <= len(ids) - span else max(start, t - span)
        even[i] = e
    return sorted(novel + even)


def make_probes(lm: LoadedModel, ids: list[int], cfg: CalibrationConfig) -> list[tuple[list[int], list[int]]]:
    """(question ids, answer ids) pairs: a cue from the document and the tokens that follow it.

    ids: the document's token ids as prefilled (template prefix + text).
    """
    start = len(lm.encode_document(""))
    span = cfg.cue + cfg.target
    if len(ids) - start < span:
        return []
    probes = []
    for s in probe_starts(ids, start, cfg):
        cue = lm.tokenizer.decode(ids[s:s + cfg.cue], skip_special_tokens=True).strip()
        q = lm.encode_question(f'Quote the text that follows "{cue}" in the document above.')
        probes.append((q, list(ids[s + cfg.cue:s + span])))
    return probes


def answer_rows(question: list[int], answer: list[int]) -> list[int]:
    """Rows of ``question + answer`` whose logits predict the answer's tokens (row i predicts token i + 1)."""
    return list(range(len(question) - 1, len(question) - 1 + len(answer)))


@torch.inference_mode()
def _probe_logits(doc: Doc, probes) -> torch.Tensor:
    """The logits that predict the probes' answer tokens, each probe on its own: (answer tokens, vocab)."""
    return torch.cat([doc.continuation_logits(q + a, rows=answer_rows(q, a)) for q, a in probes])


def kl_per_row(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of every row, both given as logits (rows, vocab): (rows,) float32, clamped at 0."""
    p = torch.log_softmax(p_logits.float(), dim=-1)
    q = torch.log_softmax(q_logits.float(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1).clamp_min(0)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(p || q), both given as logits (rows, vocab). Also what ``kvforge eval`` reports."""
    return float(kl_per_row(p_logits, q_logits).mean())


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || got) per answer token, and top-1 agreement. ref, got: (tokens, vocab) logits."""
    return kl_divergence(ref, got), float((ref.argmax(-1) == got.argmax(-1)).float().mean())


def calibrate(lm: LoadedModel, ids: list[int], kv: KV, compressor: Compressor, ctx: CompressionContext,
              cfg: CalibrationConfig | None = None) -> tuple[float, CompressedKV, Calibration]:
    """Choose the keep for one document; returns (keep, its compressed KV, the record).

    kv: the document's prefill (L, H, T, D), with whatever the compressor needs captured.
    """
    cfg = cfg or CalibrationConfig()
    t0 = time.perf_counter()
    T = kv.shape[2]
    compress_at = compressor.prepare(kv, ctx)
    probes = make_probes(lm, ids, cfg)
    proxy = "probe-recall-kl" + ("-max" if cfg.aggregate == "max" else "")
    record = Calibration(tolerance=cfg.tolerance, keep=1.0, proxy=proxy, probes=len(probes),
                         probe_tokens=sum(len(a) for _, a in probes))
    grid = sorted(set(float(k) for k in cfg.grid) | {1.0})
    results: dict[float, CompressedKV] = {}

    if probes:
        ref = _probe_logits(Doc.from_kv(lm, keep_all(kv), T), probes)

    sizes = [len(a) for _, a in probes]

    def evaluate(keep: float) -> float:
        compressed = compress_at(Budget(keep))
        got = _probe_logits(Doc.from_kv(lm, compressed, T), probes)
        kl, top1 = _compare(ref, got)
        if cfg.aggregate == "max":  # the worst-recalled passage decides
            kl = max(kl_divergence(r, g) for r, g in zip(ref.split(sizes), got.split(sizes)))
        results[keep] = compressed
        record.trace.append({"keep": keep, "kl": round(kl, 6), "top1": round(top1, 4)})
        return kl

    # bisection for the smallest grid keep with kl <= tolerance; keep 1.0 is accepted without a test
    # (a document too short to probe has nothing to calibrate on: it keeps everything)
    lo, hi = (0 if probes else len(grid) - 1), len(grid) - 1  # invariant: grid[hi] is accepted
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(grid[mid]) <= cfg.tolerance:
            hi = mid
        else:
            lo = mid + 1
    keep = grid[hi]
    compressed = results[keep] if keep in results else compress_at(Budget(keep))
    record.keep = keep
    record.seconds = round(time.perf_counter() - t0, 3)
    return keep, compressed, record


def summarize_keeps(keeps: list[float], tolerance: float) -> str:
    """A one-screen summary of the keeps ``--keep auto`` chose over a corpus: quantiles and a histogram.

    keeps: sorted ascending, one per document.
    """
    n = len(keeps)
    q = lambda f: keeps[min(n - 1, int(f * n))]  # noqa: E731
    lines = [f"calibrated keep (tolerance {tolerance:g}) over {n} document(s): mean {sum(keeps) / n:.3f}, "
             f"min {keeps[0]:.3f}, median {q(0.5):.3f}, max {keeps[-1]:.3f}"]
    edges = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0001]
    for a, b in zip(edges[:-1], edges[1:]):
        c = sum(a <= k < b for k in keeps)
        if c:
            lines.append(f"  keep {a:.1f}-{min(b, 1.0):.1f} {'#' * max(1, round(30 * c / n))} {c}")
    return "\n".join(lines)
