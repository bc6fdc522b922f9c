"""Load an artifact and answer from it. Never imports the build side (``kvforge.methods``, ``build``).

    doc = kvforge.load("out/json-module.kv")
    doc.answer("Which function parses a JSON string?")
    doc.run(question)                # Answer: text, ids, stats (ttft, tokens/s, finish reason)
    doc.logits(question, answer)     # (answer_tokens, vocab), teacher-forced
    doc.cache()                      # a transformers Cache for model.generate

Question tokens continue at the document's logical length, whatever the
number of kept entries. Every question starts from the pristine document cache:
it runs in its own fork of the prefix (``doccache``), decoded by ``decoder``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import artifact as _artifact
from . import library as _library
from .attention import RaggedCache
from .catmodel import EMBEDDED_CAT
from .decoder import Answer, AnswerStats, Decoder  # noqa: F401  (AnswerStats: re-exported)
from .doccache import DocumentCache
from .errors import IncompatibleModelError, KvforgeError, ModelNotFoundError
from .manifest import make_manifest
from .model import EMBEDDED, LoadedModel, Template, load_model
from .ragged import CompressedKV

IDENTITY_FIELDS = ("weights_sha256", "tokenizer_sha256", "architecture", "num_layers",
                   "num_attention_heads", "num_kv_heads", "head_dim")


@dataclass
class Doc:
    """A loaded artifact bound to its model: a :class:`DocumentCache` and the :class:`Decoder` that answers over it.

    Every method returns its result; nothing about a question is stored, so one Doc answers from
    several threads at once and no question leaks into the next.
    """

    artifact: _artifact.Artifact
    lm: LoadedModel
    load_s: float = 0.0
    resident: str = "float"  # "codes": a quantized document keeps its codes resident (see DocumentCache)
    document: DocumentCache = field(init=False, repr=False)
    decoder: Decoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_kv_shape(self.artifact.kv, self.lm, self.manifest["document"]["id"])
        self.decoder = Decoder(self.lm)
        self.document = DocumentCache.for_model(self.artifact, self.lm, resident=self.resident)
        self.artifact = self.document.artifact  # with resident="codes", the one without float keys

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
        return self.document.template

    @property
    def kept_entries(self) -> int:
        return self.document.kept_entries

    @property
    def kept_tokens(self) -> float:
        """Kept entries per (layer, head): the physical length an average head holds."""
        return self.document.kept_tokens

    def resident_kv_bytes(self) -> int:
        """Bytes the loaded document cache holds (the prefix as stored; a question's suffix is its own)."""
        return self.document.resident_bytes()

    def answer_report(self, result: Answer, *, source: str, started: float | None = None,
                      question: str = "") -> dict:
        """An answer with its timings and sizes (``kvforge query --json``).

        result: what :meth:`run` returned; source: the artifact's path as given; started:
        ``time.perf_counter()`` before the load (``total_s``; None: the answer's own time).
        """
        stats = result.stats
        total = time.perf_counter() - started if started is not None else stats.ttft_s + stats.decode_s
        return {
            "answer": result.text,
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
            "total_s": round(total, 4),
            "model": self.lm.info.name,
        }

    # -- answering ----------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        return self.decoder.question_ids(self.document, question)

    def cache(self) -> RaggedCache:
        """A fresh transformers ``Cache`` of this document (shares the read-only prefix tensors).

        Use it with ``doc.generate_inputs(question)`` and ``model.generate``; batch size 1,
        greedy or sampling, no beam search.
        """
        return self.document.fork()

    def generate_inputs(self, question: str) -> dict:
        """Keyword arguments for ``model.generate``: ids padded to the logical length, and a fresh cache.

        generate() takes ``input_ids`` as the whole sequence and feeds only the part past
        the cache's length; the document part is placeholder ids that are never fed.
        """
        q = self.question_ids(question)
        pad = self.lm.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        ids = torch.tensor([[pad] * self.logical_length + q], dtype=torch.long, device=self.decoder.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "past_key_values": self.cache()}

    def stream(self, question: str, max_new_tokens: int = 64) -> Iterator[int]:
        """Greedy decoding; yields answer token ids (the stop token is not yielded)."""
        return self.decoder.stream(self.document, question, max_new_tokens)

    def run(self, question: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None) -> Answer:
        """The greedy answer with its ids and stats (time to first token, tokens per second, finish reason)."""
        return self.decoder.run(self.document, question, max_new_tokens, on_text=on_text)

    def answer_ids(self, question: str, max_new_tokens: int = 64) -> list[int]:
        return list(self.stream(question, max_new_tokens))

    def answer(self, question: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None) -> str:
        """Greedy answer to ``question``; ``on_text`` receives the text as it grows (streaming)."""
        return self.run(question, max_new_tokens, on_text=on_text).text

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

    def continuation_logits(self, ids: list[int], rows: list[int] | None = None) -> torch.Tensor:
        """Logits after feeding ``ids`` right after the document: (len(ids), vocab); row i predicts ids[i + 1].

        ``rows``: compute only these rows (len(rows), vocab), skipping the vocabulary projection of the others.
        """
        return self.decoder.continuation_logits(self.document, ids, rows=rows)


def check_kv_shape(kv: CompressedKV, lm: LoadedModel, where: str) -> None:
    """Refuse a cache whose (layers, KV heads, head dim) are not the loaded model's, naming both."""
    info = lm.info
    float_keys = bool(kv.keys) and kv.keys[0].is_floating_point()  # resident codes hold packed bytes instead
    got = (int(kv.lengths.shape[0]), int(kv.lengths.shape[1]), int(kv.keys[0].shape[-1]) if float_keys else
           info.head_dim)
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
    if source == EMBEDDED_CAT or (source and source != EMBEDDED and os.path.isdir(source)):
        return load_model(source, **where)
    try:
        return load_model(EMBEDDED if source == EMBEDDED else None, **where)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{exc} (the artifact was built for {manifest['model'].get('name')!r} "
                                 f"from {source!r})") from exc


def load(path: str | os.PathLike, model=None, *, verify: bool = True, doc: str | None = None,
         resident: str = "float", device: str | None = None, compute_dtype: str | None = None) -> Doc:
    """Load an artifact, check it against its model, and return a :class:`Doc`.

    ``path``: a ``.kv`` file, or a zarr library (``lib.zarr`` folder or ``lib.zarr.zip``) with ``doc``
    naming the document (optional when the library holds one). Only that document is read.
    ``model``: ``None`` (the artifact's own model if found, else ``$KVFORGE_MODEL`` or the embedded default),
    a model directory, ``"embedded"``, or a loaded model from a previous call.
    ``verify=False`` skips the tensor digest (structure, shapes and finiteness are always checked).
    ``resident="codes"``: a quantized (int8 / int4) document keeps its codes in memory and dequantizes a
    head when it attends: the same answers for about its stored bytes instead of twice them, at some cost
    per token (docs/experiments/serve.md).
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
    codes = resident == "codes"
    art = (_library.read(path, doc_id, verify=verify, keep_codes=codes) if library
           else _artifact.read(path, verify=verify, keep_codes=codes))
    loaded = Doc(artifact=art, lm=lm, resident=resident)
    loaded.load_s = time.perf_counter() - t0
    return loaded
