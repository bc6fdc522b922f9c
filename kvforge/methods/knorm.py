"""``knorm``: keep the keys with the smallest L2 norm.

Low-norm keys tend to draw more attention (Devoto et al. 2024, "A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression"; kvpress's
``KnormPress``). One top-k per layer over all heads lets heads whose keys are
smaller keep more entries than others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prefill import KV
from .base import CompressionContext, ScoredCompressor, register


@register
@dataclass
class Knorm(ScoredCompressor):
    """Keep low-norm keys; one top-k per layer across heads (ragged per-head budgets)."""

    name = "knorm"

    def score(self, kv: KV, ctx: CompressionContext) -> torch.Tensor:
        return -kv.keys.float().norm(dim=-1)  # (L, H, T)
