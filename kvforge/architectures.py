"""What kvforge needs to know about a model family's attention, found (or refused) when the model is loaded.

Users bring models whose layouts differ: fused ``qkv_proj`` (Phi-3), a key norm between ``k_proj`` and RoPE
(Qwen3, Gemma 3, OLMo 2), sliding-window layers (Mistral, Gemma 2 / 3), attention-logit softcapping
(Gemma 2), attention sinks (gpt-oss), linear-attention or state-space layers (Qwen3-Next, Jamba, ...).
:func:`inspect_model` asks the model's own modules and config, and either returns a :class:`Layout` or
raises :class:`UnsupportedModelError` with the reason, so that nothing crashes or goes silently wrong later:

- every decoder layer must be full (or sliding-window) softmax attention with a per-layer KV cache;
- sliding-window layers attend to the whole sequence while it is no longer than the window, so the model's
  context for kvforge is capped at the smallest window (``Layout.context``): within it every layer is exact;
- the key RoPE rotates is the output of ``k_norm`` when the attention has one, else of ``k_proj``, else the
  key slice of ``qkv_proj``; :func:`probe` checks at load that this key, at position 0 (where RoPE is the
  identity), is the key the cache holds.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_RECURRENT = ("linear_attn", "mamba", "mixer", "ssm", "conv", "feed_forward_recurrent", "temporal_block")


@dataclass(frozen=True)
class Layout:
    """How to read a loaded model's attention.

    key_source: "k_norm", "k_proj" or "qkv_proj": the module whose output is the pre-RoPE key
    key_axes:   the hooked output's layout without the batch axis: "thd" (T, H, D), "htd" (H, T, D), "tf" (T, H*D)
    context:    tokens every layer attends to in full (the smallest sliding window, else max_position_embeddings)
    context_note: why ``context`` is below the model's own context ("" when it is not)
    softcap:    attention-logit softcapping (Gemma 2), applied by kvforge's attention; None when absent
    """

    key_source: str
    key_axes: str
    context: int
    context_note: str = ""
    softcap: float | None = None


def _refuse(cfg, reason: str) -> None:
    name = (getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "?")])[0]
    raise UnsupportedModelError(f"kvforge does not support {name} (model_type {getattr(cfg, 'model_type', '?')!r}): "
                                f"{reason}")


def text_config(cfg):
    """The decoder's config (multimodal configs nest it)."""
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_config(cfg) -> None:
    """Refuse, from the config alone (before the weights load), a model kvforge cannot cache."""
    cfg = text_config(cfg)
    types = list(getattr(cfg, "layer_types", None) or [])
    other = sorted(set(types) - set(ATTENTION_LAYER_TYPES))
    if other:
        _refuse(cfg, f"its layers include {', '.join(other)} ({sum(t in other for t in types)} of {len(types)}); "
                     "kvforge caches and compresses softmax-attention keys and values only, and a recurrent or "
                     "linear-attention state has no per-token entries to keep")
    if getattr(cfg, "attention_chunk_size", None):
        _refuse(cfg, "chunked attention (attention_chunk_size) restarts attention every chunk; kvforge's "
                     "runtime attends to the whole document")
    if getattr(cfg, "alibi", False) or getattr(cfg, "model_type", "") == "bloom":
        _refuse(cfg, "ALiBi position biases live in the attention mask, which kvforge's runtime attention does "
                     "not read")


def _attention(layer):
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def inspect_model(model) -> Layout:
    """The :class:`Layout` of a loaded causal LM, or UnsupportedModelError naming what kvforge cannot do."""
    cfg = text_config(model.config)
    check_config(cfg)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        _refuse(cfg, "its decoder layers are not at model.model.layers, where kvforge looks for them")
    for i, layer in enumerate(layers):
        attn = _attention(layer)
        recurrent = [n for n in _RECURRENT if getattr(layer, n, None) is not None]
        if attn is None or recurrent:
            _refuse(cfg, f"decoder layer {i} has {'a ' + recurrent[0] + ' block' if recurrent else 'no self-attention'}"
                         "; kvforge caches softmax-attention layers only")
        if getattr(attn, "sinks", None) is not None:
            _refuse(cfg, "its attention has learned sinks (an extra logit per head), which kvforge's runtime "
                         "attention does not apply")
    attn = _attention(layers[0])
    if getattr(attn, "k_norm", None) is not None and getattr(attn, "k_proj", None) is not None:
        source = "k_norm"
    elif getattr(attn, "k_proj", None) is not None:
        source = "k_proj"
    elif getattr(attn, "qkv_proj", None) is not None:
        source = "qkv_proj"
    else:
        _refuse(cfg, "its attention has none of k_proj, qkv_proj (with k_norm optional): kvforge cannot find "
                     "the keys before RoPE")
    max_pos = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    types = list(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    sliding = bool(window) and ("sliding_attention" in types if types else True)
    context, note = max_pos, ""
    if sliding and int(window) < max_pos:
        n = types.count("sliding_attention") if types else len(layers)
        context = int(window)
        note = (f"{n} of {len(layers)} layers attend to a sliding window of {window} tokens: kvforge limits "
                f"document + question + answer to the window, where every layer sees the whole sequence")
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    return Layout(key_source=source, key_axes="", context=context, context_note=note,
                  softcap=float(softcap) if softcap else None)


def kv_shape(cfg) -> tuple[int, int]:
    """(KV heads, head dim) of a text config."""
    cfg = text_config(cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return int(heads), int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def layout_of(model) -> Layout:
    """The checked :class:`Layout` of ``model`` (inspected and probed once per model object)."""
    if model not in _LAYOUTS:
        heads, dim = kv_shape(model.config)
        _LAYOUTS[model] = probe(model, inspect_model(model), heads, dim)
    return _LAYOUTS[model]


def _key_module(layer, source: str):
    return getattr(_attention(layer), source)


def _to_htd(out: torch.Tensor, layout: Layout, attn, heads: int, dim: int) -> torch.Tensor:
    """The hooked module's output for one sequence as (H, T, D)."""
    x = out[0]
    if layout.key_source == "qkv_proj":
        q = attn.config.num_attention_heads * dim
        x = x[..., q:q + heads * dim]
    axes = layout.key_axes
    if axes == "htd":
        return x
    if axes == "thd":
        return x.transpose(0, 1)
    return x.reshape(x.shape[0], heads, dim).transpose(0, 1)  # "tf"


@contextmanager
def capture_pre_rope_keys(model, layout: Layout, heads: int, dim: int):
    """Hooks every layer's key module; yields a list that fills with (H, T, D) pre-RoPE keys, one per layer."""
    found: list[torch.Tensor] = []
    hooks = []
    for layer in model.model.layers:
        attn = _attention(layer)
        hooks.append(_key_module(layer, layout.key_source).register_forward_hook(
            lambda mod, inp, out, attn=attn: found.append(_to_htd(out, layout, attn, heads, dim))))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def probe(model, layout: Layout, heads: int, dim: int) -> Layout:
    """Run a few tokens; find the key module's output layout and check it is the cached key before RoPE.

    Refuses a model whose cache does not hold (1, heads, T, dim) keys and values in every layer, or whose
    hooked key at position 0 (RoPE is the identity there, up to the rotary embedding's scaling) differs from
    the cached one.
    """
    from transformers import DynamicCache

    cfg = text_config(model.config)
    T = heads + dim + 3  # a length no other axis has: the hooked output's layout is read from its shape
    device = next(model.parameters()).device
    ids = (torch.arange(T, device=device) * 7 + 3) % int(cfg.vocab_size)
    cache = DynamicCache(config=model.config)
    raw: list[torch.Tensor] = []
    hooks = [_key_module(layer, layout.key_source).register_forward_hook(lambda m, i, o: raw.append(o))
             for layer in model.model.layers]
    try:
        model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    shape = raw[0].shape[1:]
    if layout.key_source == "qkv_proj" or (len(shape) == 2 and shape[0] == T):
        axes = "tf"
    elif tuple(shape) == (T, heads, dim):
        axes = "thd"
    elif tuple(shape) == (heads, T, dim):
        axes = "htd"
    else:
        _refuse(cfg, f"its {layout.key_source} output has shape {tuple(raw[0].shape)}, not a (T, H, D) key "
                     f"for T={T}, H={heads}, D={dim}")
    layout = Layout(layout.key_source, axes, layout.context, layout.context_note, layout.softcap)
    scale = float(getattr(getattr(model.model, "rotary_emb", None), "attention_scaling", 1.0) or 1.0)
    for i, (layer, out) in enumerate(zip(cache.layers, raw)):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or tuple(keys.shape) != (1, heads, T, dim) or tuple(values.shape) != (1, heads, T, dim):
            _refuse(cfg, f"layer {i}'s cache holds {None if keys is None else tuple(keys.shape)}, not the "
                         f"(1, {heads}, {T}, {dim}) keys and values of a softmax-attention layer")
        pre = _to_htd(out, layout, _attention(model.model.layers[i]), heads, dim)
        if not torch.allclose(pre[:, 0].float() * scale, keys[0, :, 0].float(), rtol=2e-2, atol=2e-2):
            _refuse(cfg, f"layer {i}: the {layout.key_source} output is not the key that RoPE rotates "
                         "(they differ at position 0, where RoPE changes nothing), so methods that score "
                         "keys before RoPE would read wrong keys")
    return layout
