"""The ragged KV cache shared by the build side, the artifact and the runtime.

Neutral ground: the runtime imports this module, never ``kvforge.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedKV:
    """A ragged KV cache: per layer, the kept entries of every KV head, head-major.

    lengths:   (layers, kv_heads) int32, kept entries per head
    positions: per layer (N_l,) int32, original token positions, ascending within a head
    keys:      per layer (N_l, head_dim), post-RoPE
    values:    per layer (N_l, head_dim)
    beta:      None, or per layer (N_l,) float32 additive attention bias
    with N_l = lengths[l].sum().
    """

    lengths: torch.Tensor
    positions: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    beta: list[torch.Tensor] | None = None

    @property
    def kept(self) -> int:
        return int(self.lengths.sum())

    def layer_offsets(self, layer: int) -> list[int]:
        """Start of every head's slice in layer ``layer``'s flat tensors, plus the end."""
        counts = self.lengths[layer].tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + int(c))
        return offsets
