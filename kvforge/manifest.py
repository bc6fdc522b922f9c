"""The one place an artifact manifest is put together (the build, the runtime's in-memory ``Doc``, benchmarks).

Plain data in, a plain dict out; the normative meaning of every field is section 2 of
``formats/kvforge-artifact-v1.md`` (and its JSON schema). The writer
(:func:`kvforge.artifact.prepare`) then sets what only it can know: ``version`` (the lowest one
the storage needs), ``storage.has_beta`` from the tensors, and ``tensors_sha256``.
The golden-file makers in ``formats/golden/`` keep their own literal manifest on purpose:
they pin released files independently of this code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import __version__
from .artifact import FORMAT_NAME, FORMAT_VERSION

if TYPE_CHECKING:
    from .ragged import CompressedKV

UNSET_SHA256 = "0" * 64  # a digest not known here: tensors_sha256 (the writer fills it), an in-memory document's


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
