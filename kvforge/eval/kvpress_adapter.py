"""Run kvpress 0.5.5 presses on the same model and tasks, and hand the result to kvforge's runtime.

A press compresses during the context prefill (its forward hooks prune the
DynamicCache, or, for head-wise presses such as KVzipPress, mark entries to
mask). Either way the surviving entries become a :class:`CompressedKV`, so the
question is answered by the same runtime loop and the same metrics as
kvforge's own methods: only the selection differs.

Optional: ``pip install 'kvforge[bench]'`` (kvpress needs transformers < 5.3).
"""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from ..ragged import CompressedKV

PRESSES = ("CompactorPress", "KVzipPress", "SnapKVPress", "KnormPress", "ExpectedAttentionPress")  # --against kvpress
# also runnable by name: KVgradPress (KVzip's context replay, scored by input x gradient attribution; slower)
SUPPORTED = PRESSES + ("KVgradPress",)


def make_press(name: str, keep: float):
    try:
        import kvpress
    except ImportError as exc:
        raise ConfigError("--against kvpress needs kvpress 0.5.5: pip install 'kvforge[bench]'") from exc
    if name not in SUPPORTED:
        raise ConfigError(f"unknown press {name!r}; supported: {', '.join(SUPPORTED)}")
    return getattr(kvpress, name)(compression_ratio=1.0 - keep)


@torch.inference_mode()
def press_prefill(model, input_ids: list[int], press_name: str, keep: float) -> tuple[CompressedKV, float]:
    """Prefill ``input_ids`` under a kvpress press; returns the surviving KV and the seconds it took."""
    from transformers import DynamicCache

    press = make_press(press_name, keep)
    saved = model.config._attn_implementation
    if saved != "sdpa":
        model.set_attn_implementation("sdpa")
    layers = model.model.layers
    try:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        with press(model):
            model.model(input_ids=torch.tensor([input_ids], device=model.device), past_key_values=cache,
                        use_cache=True)
        seconds = time.perf_counter() - t0
        lengths, positions, keys, values = [], [], [], []
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys[0].float().cpu(), layer.values[0].float().cpu()  # (H, P, D)
            H, P, _ = k.shape
            keep_mask = torch.ones(H, P, dtype=torch.bool)
            masked = getattr(layers[i].self_attn, "masked_key_indices", None)
            if masked is not None:  # head-wise presses mask entries instead of removing them
                _, heads, seq = masked
                keep_mask[heads, seq] = False
            head_idx, tok_idx = keep_mask.nonzero(as_tuple=True)
            lengths.append(keep_mask.sum(dim=1))
            # physically pruned caches lose the original positions; the runtime does not need them
            positions.append(tok_idx.to(torch.int32))
            keys.append(k[head_idx, tok_idx])
            values.append(v[head_idx, tok_idx])
    finally:
        for layer in layers:
            if hasattr(layer.self_attn, "masked_key_indices"):
                layer.self_attn.masked_key_indices = None
        if model.config._attn_implementation != saved:
            model.set_attn_implementation(saved)
    return CompressedKV(lengths=torch.stack(lengths).to(torch.int32), positions=positions, keys=keys,
                        values=values), seconds
