"""Load an artifact and answer from it. Never imports the build side (``kvforge.methods``, ``build``).

    doc = kvforge.load("out/json-module.kv")
    doc.answer("Which function parses a JSON string?")
    doc.logits(question, answer)     # (answer_tokens, vocab), teacher-forced
    doc.cache()                      # a transformers Cache for model.generate

Question tokens continue at the document's logical length, whatever the
number of kept entries. Every question starts from the pristine document cache:
what one question appends is dropped before the next.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import artifact as _artifact
from . import library as _library
from .attention import RaggedCache, kv_to, use_ragged_attention
from .errors import IncompatibleModelError, KvforgeError, ModelNotFoundError, ResourceLimitError
from .manifest import make_manifest
from .model import EMBEDDED, LoadedModel, Template, load_model
from .ragged import CompressedKV

IDENTITY_FIELDS = ("weights_sha256", "tokenizer_sha256", "architecture", "num_layers",
                   "num_attention_heads", "num_kv_heads", "head_dim")


@dataclass
class AnswerStats:
    """Timings and sizes of the last answer (``kvforge query --json``)."""

    ttft_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    question_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Doc:
    """A loaded artifact bound to its model."""

    artifact: _artifact.Artifact
    lm: LoadedModel
    load_s: float = 0.0
    last: AnswerStats = field(default_factory=AnswerStats)

    def __post_init__(self) -> None:
        check_kv_shape(self.artifact.kv, self.lm, self.manifest["document"]["id"])
        use_ragged_attention(self.lm.model)
        param = next(self.lm.model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._kv = kv_to(self.artifact.kv, self._device)  # the artifact's tensors, once, where the model is
        self._cache = RaggedCache(self._kv, self.logical_length, compute_dtype=self._dtype)

    @classmethod
    def from_kv(cls, lm: LoadedModel, compressed: CompressedKV, logical_length: int,
                method: dict | None = None) -> "Doc":
        """A Doc over a compressed cache that was never written (calibration, evaluation): same runtime, same
        answers. Its manifest is a complete one for document ``in-memory`` with no keep requested."""
        manifest = make_manifest(lm.info.to_dict(), lm.template.to_dict(), doc_id="in-memory",
                                 logical_length=logical_length, compressed=compressed, method=method or {},
                                 keep_requested=None)
        return cls(artifact=_artifact.Artifact(manifest=manifest, kv=compressed), lm=lm)

    # -- facts --------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def logical_length(self) -> int:
        return self.artifact.logical_length

    @property
    def template(self) -> Template:
        t = self.manifest["template"]
        return Template(t["doc_prefix"], t["question_prefix"], t["question_suffix"], t["bos_token_id"])

    @property
    def kept_entries(self) -> int:
        return int(self.manifest["compression"]["kept_entries"])

    @property
    def kept_tokens(self) -> float:
        """Kept entries per (layer, head): the physical length an average head holds."""
        m = self.manifest["model"]
        return self.kept_entries / (m["num_layers"] * m["num_kv_heads"])

    def resident_kv_bytes(self) -> int:
        """Bytes the loaded document cache holds (prefix as stored, plus any suffix)."""
        return self._cache.resident_bytes()

    def answer_report(self, question: str, answer: str, *, source: str, started: float) -> dict:
        """The last answer with its timings and sizes (``kvforge query --json``).

        source: the artifact's path as given; started: ``time.perf_counter()`` before the load.
        """
        stats = self.last
        return {
            "answer": answer,
            "question": question,
            "artifact": source,
            "doc": self.manifest["document"]["id"],
            "load_s": round(self.load_s, 4),
            "ttft_s": round(stats.ttft_s, 4),
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "new_tokens": stats.new_tokens,
            "question_tokens": stats.question_tokens,
            "logical_tokens": self.logical_length,
            "kept_tokens": round(self.kept_tokens, 2),
            "kept_entries": self.kept_entries,
            "keep": self.manifest["compression"]["keep_achieved"],
            "artifact_bytes": self.artifact.file_bytes,
            "resident_kv_bytes": self.resident_kv_bytes(),
            "total_s": round(time.perf_counter() - started, 4),
            "model": self.lm.info.name,
        }

    # -- answering ----------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        ids = self.lm.encode_question(question, self.template)
        if self.logical_length + len(ids) >= self.manifest["model"]["max_context"]:
            raise ResourceLimitError(
                f"the question ({len(ids)} tokens) does not fit after the document "
                f"({self.logical_length} tokens) in the model's context of {self.manifest['model']['max_context']}"
            )
        return ids

    def cache(self) -> RaggedCache:
        """A fresh transformers ``Cache`` of this document (shares the read-only prefix tensors).

        Use it with ``doc.generate_inputs(question)`` and ``model.generate``; batch size 1,
        greedy or sampling, no beam search.
        """
        return RaggedCache(self._kv, self.logical_length, compute_dtype=self._dtype)

    def generate_inputs(self, question: str) -> dict:
        """Keyword arguments for ``model.generate``: ids padded to the logical length, and a fresh cache.

        generate() takes ``input_ids`` as the whole sequence and feeds only the part past
        the cache's length; the document part is placeholder ids that are never fed.
        """
        q = self.question_ids(question)
        pad = self.lm.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        ids = torch.tensor([[pad] * self.logical_length + q], dtype=torch.long, device=self._device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "past_key_values": self.cache()}

    @torch.inference_mode()
    def _forward(self, ids: list[int], last_only: bool = False, rows: list[int] | None = None) -> torch.Tensor:
        """Feed ``ids`` after the current cache content; logits (len(ids), vocab).

        ``last_only``: only the last row; ``rows``: only these rows, in that order.
        """
        start = self._cache.get_seq_length()
        dev = self._device
        pos = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
        logits_to_keep = 1 if last_only else (torch.tensor(rows, dtype=torch.long, device=dev)
                                              if rows is not None else 0)
        out = self.lm.model(input_ids=torch.tensor([ids], device=dev), past_key_values=self._cache,
                            position_ids=pos, cache_position=pos[0], use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits[0].float().cpu()

    def stream(self, question: str, max_new_tokens: int = 64) -> Iterator[int]:
        """Greedy decoding; yields answer token ids (the stop token is not yielded)."""
        q = self.question_ids(question)
        stats = AnswerStats(question_tokens=len(q))
        self.last = stats
        with self.lm.lock:
            self._cache.reset()
            try:
                t0 = time.perf_counter()
                logits = self._forward(q, last_only=True)[-1]
                stats.ttft_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                for _ in range(max_new_tokens):
                    token = int(torch.argmax(logits))
                    if token in self.lm.stop_ids:
                        break
                    stats.new_tokens += 1
                    stats.decode_s = time.perf_counter() - t1
                    yield token
                    if stats.new_tokens == max_new_tokens:
                        break
                    if self.logical_length + self._cache.suffix_length + 1 >= self.manifest["model"]["max_context"]:
                        break
                    logits = self._forward([token], last_only=True)[-1]
                stats.decode_s = time.perf_counter() - t1
            finally:
                self._cache.reset()

    def answer_ids(self, question: str, max_new_tokens: int = 64) -> list[int]:
        return list(self.stream(question, max_new_tokens))

    def answer(self, question: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None) -> str:
        """Greedy answer to ``question``; ``on_text`` receives the text as it grows (streaming)."""
        ids: list[int] = []
        shown = ""
        for token in self.stream(question, max_new_tokens):
            ids.append(token)
            if on_text is not None:
                text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
        text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        return text

    def answer_token_ids(self, answer: str) -> list[int]:
        """The tokens ``answer`` would produce for this text (no leading space added)."""
        return list(self.lm.tokenizer(answer, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def logits(self, question: str, answer: str | list[int], *, include_question: bool = False) -> torch.Tensor:
        """Teacher-forced next-token logits over the answer's tokens: (answer_tokens, vocab).

        Row i is the distribution that predicts answer token i, given the compressed
        document, the question and the answer tokens before i. ``answer`` is text or the
        token ids ``answer_ids`` returned. ``include_question=True`` also returns the rows
        that predict question tokens 1.. (question_tokens - 1 more rows, first).
        """
        q = self.question_ids(question)
        a = list(answer) if isinstance(answer, (list, tuple)) else self.answer_token_ids(answer)
        if not a:
            raise KvforgeError("the answer is empty: logits need at least one answer token")
        out = self.continuation_logits(q + a)
        return out[:-1] if include_question else out[len(q) - 1:-1]

    @torch.inference_mode()
    def continuation_logits(self, ids: list[int], rows: list[int] | None = None) -> torch.Tensor:
        """Logits after feeding ``ids`` right after the document: (len(ids), vocab); row i predicts ids[i + 1].

        ``rows``: compute only these rows (len(rows), vocab), skipping the vocabulary projection of the others.
        """
        if self.logical_length + len(ids) > self.manifest["model"]["max_context"]:
            raise ResourceLimitError(f"{len(ids)} tokens do not fit after the document in the model's context")
        with self.lm.lock:
            self._cache.reset()
            try:
                return self._forward(list(ids), rows=rows)
            finally:
                self._cache.reset()


def check_kv_shape(kv: CompressedKV, lm: LoadedModel, where: str) -> None:
    """Refuse a cache whose (layers, KV heads, head dim) are not the loaded model's, naming both."""
    got = (int(kv.lengths.shape[0]), int(kv.lengths.shape[1]), int(kv.keys[0].shape[-1]) if kv.keys else 0)
    info = lm.info
    want = (info.num_layers, info.num_kv_heads, info.head_dim)
    if got != want:
        raise IncompatibleModelError(
            f"{where}: the cache holds {got[0]} layers x {got[1]} KV heads x head dim {got[2]}, but the loaded "
            f"model {info.name!r} has {want[0]} x {want[1]} x {want[2]}; load it with the model it was built for")


def check_model(manifest: dict, lm: LoadedModel, where: str) -> None:
    """Refuse an artifact built for another model, listing every field that differs."""
    built, have = manifest["model"], lm.info.to_dict()
    diffs = [f"{k}: artifact has {str(built.get(k))[:16]!s}, model has {str(have.get(k))[:16]!s}"
             for k in IDENTITY_FIELDS if built.get(k) != have.get(k)]
    if diffs:
        raise IncompatibleModelError(
            f"{where} was built for model {built.get('name')!r} ({built.get('source')}), "
            f"not for the loaded {have['name']!r} ({have['source']}); differing fields: " + "; ".join(diffs)
            + ". Pass --model with the model it was built for, or rebuild the artifact for this model"
        )


def resolve_model_for(manifest: dict, model, **where) -> LoadedModel:
    """The model to use: the one given, else the artifact's own source when it is here, else the default.

    ``where``: ``device`` and ``compute_dtype`` for :func:`kvforge.model.load_model`."""
    if model is not None:
        return load_model(model, **where)
    if os.environ.get("KVFORGE_MODEL"):
        return load_model(None, **where)
    source = manifest["model"].get("source", "")
    if source and source != EMBEDDED and os.path.isdir(source):
        return load_model(source, **where)
    try:
        return load_model(EMBEDDED if source == EMBEDDED else None, **where)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{exc} (the artifact was built for {manifest['model'].get('name')!r} "
                                 f"from {source!r})") from exc


def load(path: str | os.PathLike, model=None, *, verify: bool = True, doc: str | None = None,
         device: str | None = None, compute_dtype: str | None = None) -> Doc:
    """Load an artifact, check it against its model, and return a :class:`Doc`.

    ``path``: a ``.kv`` file, or a zarr library (``lib.zarr`` folder or ``lib.zarr.zip``) with ``doc``
    naming the document (optional when the library holds one). Only that document is read.
    ``model``: ``None`` (the artifact's own model if found, else ``$KVFORGE_MODEL`` or the embedded default),
    a model directory, ``"embedded"``, or a loaded model from a previous call.
    ``verify=False`` skips the tensor digest (structure, shapes and finiteness are always checked).
    ``device`` / ``compute_dtype``: where and how the model computes (kvforge.devices; ``None``: the
    environment or auto); an artifact answers the same from any of them.
    """
    t0 = time.perf_counter()
    doc_id = doc  # the public keyword names the document by its id
    library = _library.is_library(path)
    if library:
        doc_id, manifest = _library.read_manifest(path, doc_id)
        where = f"{path}:{doc_id}"
    else:
        if doc_id is not None:
            raise KvforgeError(f"{path}: --doc applies to a zarr library (lib.zarr or lib.zarr.zip), "
                               "not to a .kv file")
        manifest, _, _ = _artifact.read_header(path)  # cheap: refuse a wrong model before reading tensors
        where = str(path)
    lm = resolve_model_for(manifest, model, device=device, compute_dtype=compute_dtype)
    check_model(manifest, lm, where)
    art = _library.read(path, doc_id, verify=verify) if library else _artifact.read(path, verify=verify)
    loaded = Doc(artifact=art, lm=lm)
    loaded.load_s = time.perf_counter() - t0
    return loaded
