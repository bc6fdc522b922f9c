"""``full``: keep every entry. The lossless reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prefill import KV
from .base import Budget, CompressedKV, CompressionContext, Compressor, gather, register


@register
@dataclass
class Full(Compressor):
    """Keep the whole cache (lossless; keep is always 1.0)."""

    name = "full"

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        L, H, T, _ = kv.shape
        return gather(kv, torch.ones(L, H, T, dtype=torch.bool))
