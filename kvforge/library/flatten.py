"""A document's stored ``.kv`` tensors (per layer) <-> its library arrays (over layers).

The same tensors, regrouped so that a document is a handful of arrays however many layers
the model has: ``layer.{l}.keys`` (N_l, D) for l in 0..L-1 become ``keys`` (sum N_l, D); per-layer
scale tables (H, D) are stacked into (L, H, D). ``lengths`` (L, H) is the same in both, and
splits the flat arrays back into layers.
"""

from __future__ import annotations

import torch

from .arrays import array_names

# arrays flattened over layers along their first axis, and arrays stacked per layer
FLAT = ("positions", "keys", "values", "value_scale", "beta")
STACKED = ("key_scale", "key_min")


def flatten(tensors: dict[str, torch.Tensor], L: int, storage: dict) -> dict[str, torch.Tensor]:
    """Stored .kv tensors -> the document's arrays (per-layer tensors concatenated, or stacked)."""
    arrays = {"lengths": tensors["lengths"]}
    for name in array_names(storage):
        if name in FLAT:
            arrays[name] = torch.cat([tensors[f"layer.{l}.{name}"] for l in range(L)])
        elif name in STACKED:
            arrays[name] = torch.stack([tensors[f"layer.{l}.{name}"] for l in range(L)])
    return arrays


def unflatten(arrays: dict[str, torch.Tensor], lengths: torch.Tensor, L: int) -> dict[str, torch.Tensor]:
    sizes = [int(n) for n in lengths.sum(1).tolist()]
    tensors = {"lengths": lengths}
    for name, t in arrays.items():
        if name in FLAT:
            for l, part in enumerate(torch.split(t, sizes)):
                tensors[f"layer.{l}.{name}"] = part.contiguous()
        elif name in STACKED:
            for l in range(L):
                tensors[f"layer.{l}.{name}"] = t[l].contiguous()
    return tensors
