"""kvforge: an offline KV-cache compiler for language models.

The public API (stable):

    kvforge.build(sources, out, method="compactor", keep=0.5, model=None)  -> BuildReport
    kvforge.build(sources, "lib.zarr", quant="int8")                     -> one zarr library
    doc = kvforge.load(path, model=None)                                -> Doc
    doc = kvforge.load("lib.zarr", doc="notes")                         -> one document of a library
    doc.answer(question, max_new_tokens=64) -> str
    doc.logits(question, answer) -> Tensor (answer_tokens, vocab)
    doc.cache() -> transformers Cache;  doc.generate_inputs(question) -> kwargs for model.generate
    kvforge.available_methods() -> {name: description}

Importing kvforge loads nothing heavy and patches nothing; torch and
transformers are imported by the functions that need them.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    FormatError,
    IncompatibleModelError,
    InputError,
    IntegrityError,
    KvforgeError,
    ModelNotFoundError,
    ResourceLimitError,
    UnsupportedVersionError,
    WorkerLostError,
)

__version__ = "0.1.0"


def build(sources, out, method="compactor", keep=0.5, model=None, **options):
    """Compile .txt / .md documents into ``out/<doc-id>.kv`` artifacts; see :func:`kvforge.builder.build`."""
    from .builder import build as _build

    return _build(sources, out, method=method, keep=keep, model=model, **options)


def load(path, model=None, *, verify=True, doc=None, resident="float", device=None, compute_dtype=None):
    """Load an artifact (a .kv file, or document ``doc`` of a zarr library) bound to its model.

    ``resident="codes"`` keeps a quantized document's codes in memory. See :func:`kvforge.runtime.load`.
    """
    from .runtime import load as _load

    return _load(path, model=model, verify=verify, doc=doc, resident=resident, device=device,
                 compute_dtype=compute_dtype)


def load_model(model=None, *, device=None, compute_dtype=None):
    """Load (once per process, device and compute dtype) the embedded default or a local HF model directory."""
    from .model import load_model as _load_model

    return _load_model(model, device=device, compute_dtype=compute_dtype)


def available_methods() -> dict[str, str]:
    """Registered compression methods: {name: one-line description}."""
    from .methods import available_methods as _available

    return _available()


__all__ = [
    "__version__",
    "available_methods",
    "build",
    "load",
    "load_model",
    "ConfigError",
    "FormatError",
    "IncompatibleModelError",
    "InputError",
    "IntegrityError",
    "KvforgeError",
    "ModelNotFoundError",
    "ResourceLimitError",
    "UnsupportedVersionError",
    "WorkerLostError",
]
