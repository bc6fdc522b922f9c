"""The artifact manifest: its format constants, its checks, and the one place a manifest is put together.

Plain data in, a plain dict out; the normative meaning of every field is section 2 of
``formats/kvforge-artifact-v1.md`` (and its JSON schema, ``kvforge/schema/``, a byte copy of
``formats/``). Both containers (:mod:`kvforge.artifact`, :mod:`kvforge.library`) read a manifest
through :func:`parse_manifest` and write one checked by :func:`validate`.

:func:`make_manifest` is used by the build, the runtime's in-memory ``Doc`` and the benchmarks. The writer
(:func:`kvforge.artifact.prepare`) then sets what only it can know: ``version`` (the lowest one
the storage needs, :func:`version_for`), ``storage.has_beta`` from the tensors, and ``tensors_sha256``.
The golden-file makers in ``formats/golden/`` keep their own literal manifest on purpose:
they pin released files independently of this code.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

from . import __version__
from .containers import check_semver, strict_loads
from .errors import FormatError, IntegrityError

if TYPE_CHECKING:
    from .ragged import CompressedKV

FORMAT_NAME = "kvforge-artifact"
FORMAT_VERSION = "1.1.0"  # the newest version this writer knows; files get the lowest one they need
BASE_VERSION = "1.0.0"  # what an unquantized artifact is written as, so that 1.0 readers still read it
READABLE_MAJORS = (1,)
MANIFEST_KEY = "kvforge.manifest"
MANIFEST_SHA_KEY = "kvforge.manifest_sha256"
UNSET_SHA256 = "0" * 64  # a digest not known here: tensors_sha256 (the writer fills it), an in-memory document's


def version_for(storage: dict) -> str:
    """The lowest format version that describes a file with this ``storage`` (spec section 5)."""
    return BASE_VERSION if storage.get("quantization", "none") == "none" else "1.1.0"


def check_version(version, where: str) -> None:
    """Refuse a manifest version that is malformed or of a major this kvforge does not read."""
    check_semver(version, READABLE_MAJORS, where, field="field version", what="format version",
                 advice="Upgrade kvforge, or rebuild the artifact with this one")


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(resources.files("kvforge").joinpath("schema/artifact-v1.schema.json").read_text())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    base = jsonschema.Draft202012Validator
    # JSON Schema counts 2.0 as an integer; the spec does not: counts and sizes are written as integers
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)(_schema())


def validate(manifest: dict, where: str) -> None:
    """The schema check, and the one rule the schema cannot say (quantization needs version 1.1)."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.path) or "(manifest)"
        raise FormatError(f"{where}: manifest field {field}: {e.message}")
    quantization = manifest["storage"]["quantization"]
    if quantization != "none" and int(manifest["version"].split(".")[1]) < 1:
        raise FormatError(f"{where}: manifest field storage.quantization: {quantization!r} needs format version "
                          f"1.1 or later, the file says {manifest['version']}")


def parse_manifest(text, digest, where: str) -> dict:
    """The manifest from its canonical-JSON text and sha256, checked (digest, JSON, format, version, schema)."""
    if not isinstance(text, str) or not isinstance(digest, str):
        raise FormatError(f"{where}: {MANIFEST_KEY!r} / {MANIFEST_SHA_KEY!r} must be strings")
    if hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() != digest:
        raise IntegrityError(f"{where}: the manifest does not match its sha256; the file is corrupt, rebuild it")
    try:
        manifest = strict_loads(text)
    except ValueError as exc:
        raise FormatError(f"{where}: the manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise FormatError(f"{where}: field format: expected {FORMAT_NAME!r}, found {found!r}")
    check_version(manifest.get("version"), where)
    validate(manifest, where)
    return manifest


def make_manifest(model: dict, template: dict, *, doc_id: str, logical_length: int, compressed: "CompressedKV",
                  method: dict, keep_requested: float | None, doc_sha256: str = UNSET_SHA256, seed: int = 0,
                  extra: dict | None = None, dtype: str = "float16", quantization: str = "none") -> dict:
    """The manifest of ``compressed``, the ragged cache of one document.

    model:          ``ModelInfo.to_dict()``: name, source, fingerprints, shape, max_context (``model.*``)
    template:       ``Template.to_dict()``: the prompt pieces around the document and question (``template.*``)
    doc_id:         the document's id in its library (``document.id``)
    logical_length: tokens of the document segment, where the question continues (``document.logical_length``)
    compressed:     the ragged cache; gives ``kept_entries``, ``keep_achieved`` and ``storage.has_beta``
    method:         the compressor's ``to_dict()`` (``compression.method``)
    keep_requested: the keep asked for (the calibrated one for ``keep="auto"``); None only for an
                    in-memory cache that is never written (the writer's schema check refuses it)
    doc_sha256:     sha256 of the document's UTF-8 text (``document.sha256``)
    seed:           the seed the method was given (``compression.seed``)
    extra:          method-specific records: calibration, allocation (``compression.extra``)
    dtype, quantization: how keys and values are stored (``storage.*``)

    ``compression.total_entries`` is ``num_layers * num_kv_heads * logical_length``.
    """
    total = model["num_layers"] * model["num_kv_heads"] * logical_length
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,  # lowered by the writer to what the storage needs
        "created_by": f"kvforge {__version__}",
        "model": model,
        "document": {"id": doc_id, "sha256": doc_sha256, "logical_length": logical_length},
        "template": template,
        "compression": {
            "method": method,
            "keep_requested": keep_requested,
            "keep_achieved": compressed.kept / total,
            "kept_entries": compressed.kept,
            "total_entries": total,
            "seed": seed,
            "extra": {} if extra is None else extra,
        },
        "storage": {"dtype": dtype, "quantization": quantization, "has_beta": compressed.beta is not None},
        "tensors_sha256": UNSET_SHA256,  # filled by the writer
    }
