"""Corpus -> artifacts: progress bars, resumable builds and the library manifest live here.

(Named builder, not build, so that the module does not shadow the function ``kvforge.build``.)

``build_document(lm, document, config)`` is a pure function of its inputs (model,
document, config) returning the artifact's manifest and ragged KV: an executor
(a process pool, a Ray cluster) can map it over a corpus. ``build`` is the
driver: resume, progress bars, the sinks; an executor (:mod:`kvforge.executors`) maps
``build_document``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import artifact as _artifact
from . import library
from .containers import atomic_write_bytes, canonical_json
from .budget import allocate as pilot_allocation
from .calibrate import DEFAULT_TOLERANCE, CalibrationConfig, calibrate, summarize_keeps
from .corpus import Document, load_corpus
from .errors import ConfigError, FormatError, KvforgeError
from .methods import Budget, CompressionContext, Compressor, get_method
from .model import LoadedModel, load_model
from .options import ALLOCATIONS, AUTO, FORMATS, check_choice, check_keep_and_tolerance, check_storage
from .manifest import make_manifest
from .prefill import KV, check_length, prefill
from .ragged import CompressedKV

LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = "kvforge-library"
LIBRARY_VERSION = "1.0.0"


@dataclass
class BuildConfig:
    """Everything that decides an artifact's content besides the model and the document."""

    method: dict = field(default_factory=lambda: {"name": "compactor", "config": {}})
    keep: float | str = 0.5  # a fraction in (0, 1], or "auto": calibrated per document
    dtype: str = "float16"  # one of kvforge.options.STORAGE_DTYPES
    seed: int = 0
    tolerance: float | None = None  # with keep "auto": the largest proxy KL accepted
    quant: str = "none"  # storage quantization, one of options.QUANTIZATIONS (applied after compression)
    allocate: str = "uniform"  # per-head budgets, one of options.ALLOCATIONS: the method's own split, or "pilot"

    @property
    def auto(self) -> bool:
        return self.keep == AUTO

    @staticmethod
    def make(method: str | dict | Compressor = "compactor", keep: float | str = 0.5, dtype: str = "float16",
             seed: int = 0, tolerance: float | None = None, quant: str = "none",
             allocate: str = "uniform") -> "BuildConfig":
        """The checked config (every check in :mod:`kvforge.options`); method ``full`` keeps 1.0, uniform."""
        if isinstance(method, Compressor):
            m = method.to_dict()
        elif isinstance(method, dict):
            m = Compressor.from_dict(method).to_dict()
        else:
            m = get_method(method).to_dict()
        full = m["name"] == "full"  # keeps everything: nothing to calibrate or allocate
        if full:
            keep, tolerance = 1.0, None
        keep, tolerance = check_keep_and_tolerance(keep, tolerance, DEFAULT_TOLERANCE)
        check_storage(dtype, quant)
        check_choice("allocate", allocate, ALLOCATIONS)
        if full:
            allocate = "uniform"
        return BuildConfig(method=m, keep=keep, dtype=dtype, seed=int(seed), tolerance=tolerance, quant=quant,
                           allocate=allocate)

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()


def build_document(lm: LoadedModel, document: Document, config: BuildConfig,
                   input_ids: list[int] | None = None) -> tuple[dict, CompressedKV]:
    """Prefill and compress one document: (its manifest, its compressed cache). Pure: same inputs, same output."""
    ids = input_ids if input_ids is not None else lm.encode_document(document.text)
    check_length(len(ids), lm.info.max_context, document.path or document.id)
    compressor = Compressor.from_dict(config.method)
    if compressor.own_prefill and not config.auto and config.allocate == "uniform":  # no dense cache needed
        keep, extra = config.keep, {}
        compressed = compressor.compress_ids(lm, ids, Budget(keep=keep), CompressionContext(model=lm, seed=config.seed))
    else:
        kv = prefill(lm.model, ids, queries=compressor.needs_queries or config.allocate == "pilot",
                     pre_rope_keys=compressor.needs_pre_rope_keys, surprisal=compressor.needs_surprisal)
        keep, compressed, extra = compress_document(lm, ids, kv, compressor, config.keep, tolerance=config.tolerance,
                                                    allocate=config.allocate, seed=config.seed)
    manifest = make_manifest(lm.info.to_dict(), lm.template.to_dict(), doc_id=document.id,
                             doc_sha256=document.sha256, logical_length=len(ids), compressed=compressed,
                             method=compressor.to_dict(), keep_requested=keep, seed=config.seed, extra=extra,
                             dtype=config.dtype, quantization=config.quant)
    return manifest, compressed


def compress_document(lm: LoadedModel, ids: list[int], kv: KV, compressor: Compressor, keep: float | str, *,
                      tolerance: float | None = None, allocate: str = "uniform",
                      seed: int = 0) -> tuple[float, CompressedKV, dict]:
    """Compress one prefilled document: (keep used, compressed KV, ``compression.extra``).

    ``kv``: the dense prefill. ``keep`` ``"auto"`` calibrates it first; ``allocate="pilot"`` then
    sets per-head counts from a pilot run (:mod:`kvforge.budget`). Shared by the build and ``kvforge eval``.
    """
    ctx = CompressionContext(model=lm, seed=seed)
    extra: dict = {}
    compressed = None
    if keep == AUTO:
        calibration = CalibrationConfig(tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        keep, compressed, record = calibrate(lm, ids, kv, compressor, ctx, calibration)
        extra["calibration"] = record.to_dict()
    if allocate == "pilot" and keep < 1.0:
        ctx = dataclasses.replace(ctx, keep=keep)
        compress_at = compressor.prepare(kv, ctx)  # scored once for the pilot (when it is the method) and the build
        budget, allocation = pilot_allocation(kv, compressor, keep, ctx, compress_at=compress_at)
        compressed = compress_at(budget)
        extra["allocation"] = allocation.to_dict()
    elif compressed is None:
        compressed = compressor.compress(kv, Budget(keep=keep), ctx)
    return keep, compressed, extra


@dataclass
class BuildReport:
    """What ``build`` did: one entry per document in the library, plus the skipped and the refused."""

    out: str
    entries: list[dict]
    built: list[str]
    skipped: list[str]
    errors: list[str]
    seconds: float
    executor: dict = field(default_factory=dict)  # who built: name, workers, threads, start-up seconds

    def to_dict(self) -> dict:
        return asdict(self)

    def keep_summary(self) -> str | None:
        """Quantiles and a histogram of the keeps ``keep="auto"`` chose; None when nothing was calibrated."""
        calibrated = [e for e in self.entries if e.get("calibration")]
        if not calibrated:
            return None
        return summarize_keeps(sorted(e["keep_achieved"] for e in calibrated),
                               calibrated[0]["calibration"]["tolerance"])


def _read_library(out: Path) -> dict:
    path = out / LIBRARY_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {e["id"]: e for e in data.get("documents", [])} if data.get("format") == LIBRARY_FORMAT else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # a damaged library manifest only costs a rebuild


def _write_library(out: Path, entries: dict[str, dict]) -> None:
    data = {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION,
            "documents": [entries[k] for k in sorted(entries)]}
    atomic_write_bytes(out / LIBRARY_FILE, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def _entry_is_current(entry: dict | None, document: Document, config: BuildConfig, lm: LoadedModel) -> bool:
    return bool(entry) and entry.get("sha256") == document.sha256 and entry.get("config_sha256") == config.digest() \
        and entry.get("model_weights_sha256") == lm.info.weights_sha256


class _FolderSink:
    """``out/<doc-id>.kv`` files plus ``out/library.json``, rewritten after every document."""

    def __init__(self, out: Path):
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.library = out, _read_library(out)

    def current(self, document: Document, config: BuildConfig, lm: LoadedModel) -> dict | None:
        entry = self.library.get(document.id)
        if not _entry_is_current(entry, document, config, lm):
            return None
        path = self.out / entry.get("file", "")
        try:
            manifest, _, _ = _artifact.read_header(path)
        except FormatError:
            return None
        ok = manifest["document"]["sha256"] == document.sha256 and path.stat().st_size == entry.get("bytes")
        return entry if ok else None

    def write(self, document: Document, manifest: dict, compressed: CompressedKV, entry: dict) -> dict:
        path = self.out / f"{document.id}.kv"
        entry = entry | {"file": path.name, "bytes": _artifact.write(path, manifest, compressed)}
        self.library[document.id] = entry
        _write_library(self.out, self.library)  # after every document: a killed build resumes from here
        return entry

    def finish(self) -> None:
        _write_library(self.out, self.library)


class _ZarrSink:
    """One zarr v3 library (``out.zarr``): a group per document, each swapped in atomically."""

    def __init__(self, out: Path):
        library.create(out)
        self.out = out

    def current(self, document: Document, config: BuildConfig, lm: LoadedModel) -> dict | None:
        try:  # one zarr.json read; a missing document is a FormatError like a damaged one
            with library.open_library(self.out) as lib:
                manifest, entry = lib.manifest_and_build(document.id)
        except FormatError:
            return None
        ok = _entry_is_current(entry, document, config, lm) and manifest["document"]["sha256"] == document.sha256
        return entry if ok else None

    def write(self, document: Document, manifest: dict, compressed: CompressedKV, entry: dict) -> dict:
        entry = entry | {"file": document.id}
        nbytes = library.write(self.out, manifest, compressed, build_entry=entry | {"bytes": 0})
        return entry | {"bytes": nbytes}

    def finish(self) -> None:
        pass


def _library_entry(lm: LoadedModel, config: BuildConfig, document: Document, manifest: dict, seconds: float) -> dict:
    """The library manifest's entry for one built document (the sink adds its file and bytes)."""
    comp = manifest["compression"]
    entry = {
        "id": document.id,
        "source": document.path,
        "sha256": document.sha256,
        "logical_tokens": manifest["document"]["logical_length"],
        "kept_entries": comp["kept_entries"],
        "kept_tokens_per_head": comp["kept_entries"] / (lm.info.num_layers * lm.info.num_kv_heads),
        "keep_requested": "auto" if config.auto else comp["keep_requested"],
        "keep_achieved": comp["keep_achieved"],
        "method": comp["method"],
        "storage_dtype": config.dtype,
        "quantization": config.quant,
        "allocate": config.allocate,
        "config_sha256": config.digest(),
        "model": lm.info.name,
        "model_weights_sha256": lm.info.weights_sha256,
        "build_seconds": seconds,
    }
    if "calibration" in comp["extra"]:
        entry["calibration"] = comp["extra"]["calibration"]
    return entry


def build(sources, out, method: str | dict | Compressor = "compactor", keep: float | str = 0.5, model=None, *,
          dtype: str = "float16", seed: int = 0, tolerance: float | None = None, quant: str = "none",
          allocate: str = "uniform", format: str | None = None, skip_bad: bool = False, force: bool = False,
          progress: bool = True, executor: str = "local", workers: int | None = None,
          threads_per_worker: int | None = None, ray_address: str | None = None, device: str | None = None,
          compute_dtype: str | None = None) -> BuildReport:
    """Compile documents into ``out/<doc-id>.kv`` artifacts and ``out/library.json``, or into one zarr library.

    sources: files (.txt / .md) and folders. All documents are read and checked before
    anything is written; a rerun skips documents whose text, config and model are unchanged.
    keep: a fraction in (0, 1], or ``"auto"``: per document, the smallest keep whose
    recall proxy stays within ``tolerance`` (see :mod:`kvforge.calibrate`).
    quant: ``none``, ``int8`` or ``int4`` storage of keys and values.
    allocate: ``uniform`` (the method's own split of each layer's budget) or ``pilot``: per-head
    counts redistributed from a pilot run's per-head difficulty (see :mod:`kvforge.budget`).
    format: ``kv`` (a folder of .kv files) or ``zarr`` (one library store); default: ``zarr``
    when ``out`` ends in ``.zarr``, else ``kv``.
    skip_bad: skip unusable documents (unreadable, too long, refused while building) instead of stopping.
    executor: ``local`` (this process, one document after the other) or ``ray``: ``workers`` Ray actors of
    ``threads_per_worker`` CPUs each, on a local runtime or the cluster at ``ray_address`` (``auto`` or
    ``HOST:PORT``); see :mod:`kvforge.executors`. Either way this process writes the library.
    """
    from tqdm.auto import tqdm

    from .executors import make_executor

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    t_start = time.perf_counter()
    config = BuildConfig.make(method, keep, dtype, seed, tolerance, quant, allocate)
    out = Path(out)
    format = check_choice("format", format or ("zarr" if out.suffix == ".zarr" else "kv"), FORMATS)
    if out.suffix == ".zip":
        raise ConfigError(f"{out}: build into a folder or a .zarr library; zip one for shipping with "
                          "`kvforge convert lib.zarr lib.zarr.zip`")
    runner = make_executor(executor, workers=workers, threads_per_worker=threads_per_worker,
                           ray_address=ray_address)  # checked (and Ray imported) before the model loads
    documents, bad = load_corpus(sources, skip_bad=skip_bad)
    lm = load_model(model, device=device, compute_dtype=compute_dtype)
    # tokenize and check every length first: a too-long document stops the build before any write
    encoded = {}
    for document in documents:
        ids = lm.encode_document(document.text)
        try:
            check_length(len(ids), lm.info.max_context, document.path or document.id)
        except KvforgeError as exc:
            if not skip_bad:
                raise type(exc)(f"{exc}; nothing was written") from exc
            bad.append(exc)
            continue
        encoded[document.id] = ids
    documents = [d for d in documents if d.id in encoded]

    sink = _ZarrSink(out) if format == "zarr" else _FolderSink(out)
    entries = {} if force else {d.id: sink.current(d, config, lm) for d in documents}
    todo = [d for d in documents if not entries.get(d.id)]
    skipped = [d.id for d in documents if d not in todo]
    built = []
    bar_docs = tqdm(total=len(todo), desc="documents", unit="doc", disable=not progress or not todo)
    bar_tok = tqdm(total=sum(len(encoded[d.id]) for d in todo), desc="tokens", unit="tok",
                   disable=not progress or not todo)
    try:
        with runner:  # a Ray runtime starts on the first document only: a current library needs none
            for outcome in runner.map(lm, todo, config, encoded):
                document, err = outcome.document, outcome.error
                bar_docs.update(1)
                bar_tok.update(len(encoded[document.id]))
                if err is not None:
                    if not skip_bad:
                        raise type(err)(f"{err}; nothing of it was written, the {len(built)} document(s) built "
                                        f"before it are in {out} (a rerun resumes); fix or remove it, or pass "
                                        "--skip-bad") from err
                    bad.append(err)
                    continue
                entry = _library_entry(lm, config, document, outcome.manifest, outcome.seconds)
                entries[document.id] = sink.write(document, outcome.manifest, outcome.compressed, entry)
                built.append(document.id)
    finally:
        bar_tok.close()
        bar_docs.close()
    if not todo:
        sink.finish()
    return BuildReport(out=str(out), entries=[entries[d.id] for d in documents if entries.get(d.id)], built=built,
                       skipped=skipped, errors=[str(e) for e in bad], seconds=time.perf_counter() - t_start,
                       executor=runner.describe())
