"""Corpus -> artifacts: progress bars, resumable builds and the library manifest live here.

(Named builder, not build, so that the module does not shadow the function ``kvforge.build``.)

``build_document(lm, doc, config)`` is a pure function of its inputs (model,
document, config) returning the artifact's manifest and ragged KV: an executor
(a process pool, a Ray cluster) can map it over a corpus. ``build`` is the
sequential executor with progress bars and resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from . import artifact as _artifact
from .calibrate import DEFAULT_TOLERANCE, CalibrationConfig, calibrate
from .corpus import Document, load_corpus
from .errors import ConfigError, FormatError, KvforgeError
from .methods import Budget, CompressionContext, Compressor, get_method
from .model import LoadedModel, load_model
from .prefill import check_length, prefill
from .ragged import CompressedKV

LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = "kvforge-library"
LIBRARY_VERSION = "1.0.0"


@dataclass
class BuildConfig:
    """Everything that decides an artifact's content besides the model and the document."""

    method: dict = field(default_factory=lambda: {"name": "compactor", "config": {}})
    keep: float | str = 0.5  # a fraction in (0, 1], or "auto": calibrated per document
    dtype: str = "float16"
    seed: int = 0
    tolerance: float | None = None  # with keep "auto": the largest proxy KL accepted

    @property
    def auto(self) -> bool:
        return self.keep == "auto"

    @staticmethod
    def make(method: str | dict | Compressor = "compactor", keep: float | str = 0.5, dtype: str = "float16",
             seed: int = 0, tolerance: float | None = None) -> "BuildConfig":
        if isinstance(method, Compressor):
            m = method.to_dict()
        elif isinstance(method, dict):
            m = Compressor.from_dict(method).to_dict()
        else:
            m = get_method(method).to_dict()
        if m["name"] == "full":
            keep, tolerance = 1.0, None
        if isinstance(keep, str) and keep.strip().lower() == "auto":
            keep = "auto"
            tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
            try:
                tolerance = float(tolerance)
            except (TypeError, ValueError):
                raise ConfigError(f"tolerance must be a number > 0, got {tolerance!r}") from None
            if not tolerance > 0 or tolerance == float("inf"):
                raise ConfigError(f"tolerance must be a finite number > 0 (mean KL in nats per token), got {tolerance}")
        else:
            if tolerance is not None:
                raise ConfigError("--tolerance applies to --keep auto only; drop it or pass --keep auto")
            try:
                keep = float(keep)
            except (TypeError, ValueError):
                raise ConfigError(f"keep must be a number in (0, 1] or 'auto', got {keep!r}") from None
            if not 0.0 < keep <= 1.0:
                raise ConfigError(f"keep must be in (0, 1] or 'auto', got {keep}")
        if dtype not in _artifact.STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_artifact.STORAGE_DTYPES)}, got {dtype!r}")
        return BuildConfig(method=m, keep=keep, dtype=dtype, seed=int(seed), tolerance=tolerance)

    def digest(self) -> str:
        return hashlib.sha256(_artifact.canonical_json(asdict(self)).encode()).hexdigest()


def build_document(lm: LoadedModel, doc: Document, config: BuildConfig,
                   input_ids: list[int] | None = None) -> tuple[dict, CompressedKV]:
    """Prefill and compress one document. Pure: same inputs, same output."""
    ids = input_ids if input_ids is not None else lm.encode_document(doc.text)
    check_length(len(ids), lm.info.max_context, doc.path or doc.id)
    compressor = Compressor.from_dict(config.method)
    kv = prefill(lm.model, ids, queries=compressor.needs_queries, pre_rope_keys=compressor.needs_pre_rope_keys)
    L, H, T, _ = kv.shape
    ctx = CompressionContext(model=lm, seed=config.seed)
    extra = {}
    if config.auto:
        keep, out, record = calibrate(lm, ids, kv, compressor, ctx, CalibrationConfig(tolerance=config.tolerance))
        extra["calibration"] = record.to_dict()
    else:
        keep = config.keep
        out = compressor.compress(kv, Budget(keep=keep), ctx)
    total = L * H * T
    manifest = {
        "format": _artifact.FORMAT_NAME,
        "version": _artifact.FORMAT_VERSION,
        "created_by": f"kvforge {__version__}",
        "model": lm.info.to_dict(),
        "document": {"id": doc.id, "sha256": doc.sha256, "logical_length": T},
        "template": lm.template.to_dict(),
        "compression": {
            "method": compressor.to_dict(),
            "keep_requested": keep,
            "keep_achieved": out.kept / total,
            "kept_entries": out.kept,
            "total_entries": total,
            "seed": config.seed,
            "extra": extra,
        },
        "storage": {"dtype": config.dtype, "quantization": "none", "has_beta": out.beta is not None},
        "tensors_sha256": "0" * 64,  # filled by the writer
    }
    return manifest, out


@dataclass
class BuildReport:
    """What ``build`` did: one entry per document in the library, plus the skipped and the refused."""

    out: str
    entries: list[dict]
    built: list[str]
    skipped: list[str]
    errors: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    _artifact.atomic_write_bytes(out / LIBRARY_FILE, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def _is_current(entry: dict | None, doc: Document, config: BuildConfig, lm: LoadedModel, out: Path) -> bool:
    if not entry or entry.get("sha256") != doc.sha256 or entry.get("config_sha256") != config.digest():
        return False
    if entry.get("model_weights_sha256") != lm.info.weights_sha256:
        return False
    path = out / entry.get("file", "")
    try:
        manifest, _, _ = _artifact.read_header(path)
    except FormatError:
        return False
    return manifest["document"]["sha256"] == doc.sha256 and path.stat().st_size == entry.get("bytes")


def build(sources, out, method: str | dict | Compressor = "compactor", keep: float | str = 0.5, model=None, *,
          dtype: str = "float16", seed: int = 0, tolerance: float | None = None, skip_bad: bool = False,
          force: bool = False, progress: bool = True) -> BuildReport:
    """Compile documents into ``out/<doc-id>.kv`` artifacts and ``out/library.json``.

    sources: files (.txt / .md) and folders. All documents are read and checked before
    anything is written; a rerun skips documents whose text, config and model are unchanged.
    keep: a fraction in (0, 1], or ``"auto"``: per document, the smallest keep whose
    recall proxy stays within ``tolerance`` (see :mod:`kvforge.calibrate`).
    """
    from tqdm.auto import tqdm

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    t_start = time.perf_counter()
    config = BuildConfig.make(method, keep, dtype, seed, tolerance)
    docs, bad = load_corpus(sources, skip_bad=skip_bad)
    lm = load_model(model)
    # tokenize and check every length first: a too-long document stops the build before any write
    encoded = {}
    for doc in docs:
        ids = lm.encode_document(doc.text)
        try:
            check_length(len(ids), lm.info.max_context, doc.path or doc.id)
        except KvforgeError as exc:
            if not skip_bad:
                raise type(exc)(f"{exc}; nothing was written") from exc
            bad.append(exc)
            continue
        encoded[doc.id] = ids
    docs = [d for d in docs if d.id in encoded]

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    library = _read_library(out)
    todo = [d for d in docs if force or not _is_current(library.get(d.id), d, config, lm, out)]
    skipped = [d.id for d in docs if d not in todo]
    built = []
    bar_docs = tqdm(total=len(todo), desc="documents", unit="doc", disable=not progress or not todo)
    bar_tok = tqdm(total=sum(len(encoded[d.id]) for d in todo), desc="tokens", unit="tok",
                   disable=not progress or not todo)
    try:
        for doc in todo:
            t0 = time.perf_counter()
            manifest, kv = build_document(lm, doc, config, encoded[doc.id])
            path = out / f"{doc.id}.kv"
            nbytes = _artifact.write(path, manifest, kv)
            comp = manifest["compression"]
            library[doc.id] = {
                "id": doc.id,
                "file": path.name,
                "source": doc.path,
                "sha256": doc.sha256,
                "logical_tokens": manifest["document"]["logical_length"],
                "kept_entries": comp["kept_entries"],
                "kept_tokens_per_head": comp["kept_entries"] / (lm.info.num_layers * lm.info.num_kv_heads),
                "keep_requested": "auto" if config.auto else comp["keep_requested"],
                "keep_achieved": comp["keep_achieved"],
                "bytes": nbytes,
                "method": comp["method"],
                "storage_dtype": config.dtype,
                "config_sha256": config.digest(),
                "model": lm.info.name,
                "model_weights_sha256": lm.info.weights_sha256,
                "build_seconds": round(time.perf_counter() - t0, 3),
            }
            if "calibration" in comp["extra"]:
                library[doc.id]["calibration"] = comp["extra"]["calibration"]
            _write_library(out, library)  # after every document: a killed build resumes from here
            built.append(doc.id)
            bar_docs.update(1)
            bar_tok.update(len(encoded[doc.id]))
    finally:
        bar_tok.close()
        bar_docs.close()
    if not todo:
        _write_library(out, library)
    return BuildReport(out=str(out), entries=[library[d.id] for d in docs], built=built, skipped=skipped,
                       errors=[str(e) for e in bad], seconds=time.perf_counter() - t_start)
