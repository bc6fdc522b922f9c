"""Side-by-side evaluation: every method and keep on the same model, tasks and prefill.

For each task the document is prefilled once (with queries and pre-RoPE keys,
so every kvforge method can score it); the full cache answers first and its
greedy answer becomes the teacher-forced reference. Then every configuration
compresses, answers with kvforge's runtime (question appended after
compression, at the logical position) and is compared with the full cache:

* ``score``: the task's accuracy (fraction of expected answers in the output)
* ``kl_qa``: mean KL(full || compressed) of the next-token distributions over the
  question and the full cache's answer tokens, teacher-forced
* ``kl_cont``: the same over real text that followed the document in its source
* ``bytes_per_token``: bytes of the tensors an artifact of a default build stores (float16 keys /
  values, no quantization, int32 positions) per document token (the answers themselves come from the KV
  in the model's dtype, not rounded to float16)
* ``build_s_per_1k``: prefill + compression seconds per 1000 document tokens
* ``ttft_s``: question prefill to first answer token, from the loaded cache

Rows are appended to ``rows.jsonl`` as they are made: a killed run resumes
where it stopped, and the seed reproduces every number.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from ..artifact import STORAGE_DTYPES, kv_to_tensors
from ..builder import BuildConfig, compress_document
from ..calibrate import DEFAULT_TOLERANCE, kl_divergence  # noqa: F401 (re-exported)
from ..errors import ConfigError
from ..methods import Compressor, get_method
from ..methods.base import keep_all
from ..model import LoadedModel
from ..options import check_allocations
from ..prefill import prefill
from ..ragged import CompressedKV
from ..runtime import Doc
from .phrasings import check_phrasings
from .sources import check_sources
from .tasks import CONTINUATION_TOKENS, KINDS, generate


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: ["knorm", "compactor"])
    keeps: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    samples: int = 2
    seed: int = 0
    against: list[str] = field(default_factory=list)  # kvpress press names
    max_new_tokens: int = 24
    tolerance: float = DEFAULT_TOLERANCE  # for keep "auto" (kvforge methods only)
    allocations: list[str] = field(default_factory=lambda: ["uniform"])  # "pilot": kvforge.budget per head
    sources: list[str] = field(default_factory=lambda: ["python-reference"])  # haystack text (eval.sources)
    phrasings: str | None = None  # needle wording set (eval.phrasings); None: each source's own split

    def __post_init__(self) -> None:
        self.allocations = check_allocations(self.allocations)  # kvforge.options.ALLOCATIONS
        self.sources = check_sources(self.sources)
        if self.phrasings is not None:
            check_phrasings(self.phrasings)


def stored_bytes(compressed: CompressedKV, dtype: str = BuildConfig.dtype,
                 quantization: str = BuildConfig.quant) -> int:
    """Bytes of the tensors an artifact stores for ``compressed`` (:func:`kvforge.artifact.kv_to_tensors`), in
    the storage ``dtype`` and ``quantization``; the defaults are a default build's."""
    tensors = kv_to_tensors(compressed, STORAGE_DTYPES[dtype], quantization)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _row_key(task_id: str, method: str, keep: float | str) -> str:
    return f"{task_id}|{method}|{keep if isinstance(keep, str) else format(keep, 'g')}"


def _configs(cfg: EvalConfig) -> list[tuple[str, float]]:
    """(label, keep) of every configuration; a pilot-allocated method is labelled ``<method>+pilot``."""
    out = [("full", 1.0)]
    for m in cfg.methods:
        if m != "full":
            for a in cfg.allocations:
                out += [(m if a == "uniform" else f"{m}+{a}", k) for k in cfg.keeps]
    out += [(f"kvpress:{p}", k) for p in cfg.against for k in cfg.keeps if k != "auto"]
    return out


def model_identity(lm: LoadedModel) -> dict:
    """What a run's config and report say of its model (rows of two models never share a folder)."""
    return {"name": lm.info.name, "source": lm.info.source, "weights_sha256": lm.info.weights_sha256}


def _check_same_model(out: Path, model: dict, resuming: bool) -> None:
    """A folder's rows are one model's: resuming them with another would mix two models in one report."""
    path = out / "config.json"
    if not resuming or not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("model")
    except (ValueError, AttributeError):
        old = None
    if old is None:  # written before the model was recorded
        return
    if old.get("weights_sha256") != model["weights_sha256"]:
        raise ConfigError(f"{out} holds rows of model {old.get('name')} ({old.get('source')}), not of "
                          f"{model['name']} ({model['source']}): pass another --out, or that --model to resume")


def run(lm: LoadedModel, cfg: EvalConfig, out: Path, progress: bool = True,
        on_kv=None) -> list[dict]:
    """Run (or resume) the evaluation; returns all rows, old and new.

    on_kv: optional callback (task, method, keep, CompressedKV) for plots of budgets.
    """
    from tqdm.auto import tqdm

    from . import kvpress_adapter

    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] \
        if rows_path.exists() else []
    done = {_row_key(r["task"], r["method"], r["keep"]) for r in rows}
    model = model_identity(lm)
    _check_same_model(out, model, bool(rows))
    (out / "config.json").write_text(json.dumps(asdict(cfg) | {"model": model}, indent=2))
    tasks = generate(lm.tokenizer, cfg.kinds, cfg.lengths, cfg.samples, cfg.seed, cfg.sources, cfg.phrasings)
    configs = _configs(cfg)
    compressors: dict[str, Compressor] = {m: get_method(m) for m in cfg.methods if m != "full"}
    needs_q = any(c.needs_queries for c in compressors.values()) or "pilot" in cfg.allocations
    needs_pre = any(c.needs_pre_rope_keys for c in compressors.values())
    needs_surprisal = any(c.needs_surprisal for c in compressors.values())
    bar = tqdm(total=len(tasks) * len(configs), desc="eval", unit="run", disable=not progress)
    bar.update(sum(_row_key(t.id, m, k) in done for t in tasks for m, k in configs))
    with open(rows_path, "a") as sink:
        for task in tasks:
            todo = [(m, k) for m, k in configs if _row_key(task.id, m, k) not in done]
            if not todo:
                continue
            ids = lm.encode_document(task.context)
            T = len(ids)
            t0 = time.perf_counter()
            kv = prefill(lm.model, ids, queries=needs_q, pre_rope_keys=needs_pre, surprisal=needs_surprisal)
            prefill_s = time.perf_counter() - t0
            all_kept = keep_all(kv)
            full = Doc.from_kv(lm, all_kept, T, {"name": "full"})
            ref_answer = full.answer_ids(task.question, cfg.max_new_tokens) or [lm.tokenizer.eos_token_id or 0]
            ref_qa = full.logits(task.question, ref_answer, include_question=True)
            cont_ids = lm.tokenizer(task.continuation, add_special_tokens=False)["input_ids"][:CONTINUATION_TOKENS]
            ref_cont = full.continuation_logits(cont_ids) if len(cont_ids) > 1 else None
            for method, keep in todo:
                t1 = time.perf_counter()
                if method == "full":
                    compressed, build_s = all_kept, prefill_s
                elif method.startswith("kvpress:"):
                    press = method.removeprefix("kvpress:")
                    compressed, build_s = kvpress_adapter.press_prefill(lm.model, ids, press, keep)
                else:
                    name, _, alloc = method.partition("+")
                    _, compressed, _ = compress_document(lm, ids, kv, compressors[name], keep,
                                                         tolerance=cfg.tolerance, allocate=alloc or "uniform",
                                                         seed=cfg.seed)
                    build_s = prefill_s + time.perf_counter() - t1
                if on_kv is not None:
                    on_kv(task, method, keep, compressed)
                doc = full if method == "full" else Doc.from_kv(lm, compressed, T, {"name": method})
                result = doc.run(task.question, cfg.max_new_tokens)
                answer = result.text
                row = {
                    "task": task.id, "kind": task.kind, "target_length": task.target_length,
                    "source": task.source, "phrasings": task.phrasings, "split": task.split,
                    "length": T, "method": method, "keep": keep,
                    "allocate": "pilot" if method.endswith("+pilot") else "uniform",
                    "keep_achieved": compressed.kept / (compressed.lengths.numel() * T),
                    "score": task.score(answer),
                    "kl_qa": kl_divergence(ref_qa, doc.logits(task.question, ref_answer, include_question=True)),
                    "kl_cont": kl_divergence(ref_cont, doc.continuation_logits(cont_ids)) if ref_cont is not None
                    else None,
                    "bytes_per_token": stored_bytes(compressed) / T,
                    "build_s_per_1k": 1000 * build_s / T,
                    "ttft_s": result.stats.ttft_s,
                    "answer": answer, "expected": task.answers,
                }
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                bar.update(1)
    bar.close()
    return rows
