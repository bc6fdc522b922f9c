"""Compression methods: the :class:`Compressor` abstraction, one file per method, a registry."""

from .base import (
    Budget,
    CompressedKV,
    CompressionContext,
    Compressor,
    ScoredCompressor,
    available_methods,
    get_method,
    register,
)
from . import compactor, distill, full, knorm, replay, sculpt, select_fit  # noqa: F401  (register the built-in methods)

__all__ = [
    "Budget",
    "CompressedKV",
    "CompressionContext",
    "Compressor",
    "ScoredCompressor",
    "available_methods",
    "get_method",
    "register",
]
