"""``full``: keep every entry. The lossless reference."""

from __future__ import annotations

from dataclasses import dataclass

from ..prefill import KV
from .base import Budget, CompressedKV, CompressionContext, Compressor, keep_all, register


@register
@dataclass
class Full(Compressor):
    """Keep the whole cache (lossless; keep is always 1.0)."""

    name = "full"

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        return keep_all(kv)
