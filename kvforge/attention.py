"""Runtime attention over a ragged prefix: a transformers ``Cache`` and an attention function.

A :class:`RaggedCache` holds, per layer, the artifact's kept entries exactly as
stored (flat, head-major, in the storage dtype: resident bytes match the
artifact) plus a dense suffix of the tokens appended after the document.

It reports the **logical** length (document tokens + suffix) as its sequence
length, so transformers derives positions from the document's logical end,
never from the physical number of kept entries.

The attention function ``"kvforge"`` (registered with transformers'
``AttentionInterface``) computes, for each KV head and its group of query
heads, one softmax over the head's own prefix entries (logit + beta) and the
causal suffix, without padding the prefix or concatenating it with the suffix.
For any other cache it falls back to transformers' SDPA attention, so a model
switched to ``"kvforge"`` still prefills text normally (through the model's own eager attention when it
softcaps attention logits, which SDPA cannot). Every tensor it makes follows the query's device.
"""

from __future__ import annotations

import sys

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ragged import CompressedKV

ATTN_NAME = "kvforge"
_TAG = "_kvforge_ragged_layer"


class RaggedLayer(CacheLayerMixin):
    """One layer: a ragged, read-only prefix and a dense suffix (1, kv_heads, S, head_dim)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys, values, beta, offsets: list[int], num_heads: int, head_dim: int,
                 logical_length: int, compute_dtype: torch.dtype):
        super().__init__()
        self.prefix_keys = keys  # (N, D), storage dtype
        self.prefix_values = values  # (N, D)
        self.prefix_beta = beta  # (N,) float32 or None
        self.offsets = offsets  # H + 1 ints
        sizes = {b - a for a, b in zip(offsets[:-1], offsets[1:])}
        # every head keeps the same number of entries (keep 1.0, uniform methods): one fused SDPA call serves them
        self.uniform = len(sizes) == 1 and beta is None
        self.num_heads, self.head_dim = num_heads, head_dim
        self.logical_length = logical_length
        self.compute_dtype = compute_dtype
        # uniform layers: prefix and suffix in one (2, 1, H, n + capacity, D) buffer in the compute dtype, the
        # prefix converted once here, so that a question's forward neither converts nor concatenates the prefix
        self.dense: torch.Tensor | None = None
        self._suffix = 0
        if self.uniform:
            self._grow(64)
        self._empty_suffix()
        self.is_initialized = True

    def _grow(self, capacity: int) -> None:
        n, H, D = self.offsets[1], self.num_heads, self.head_dim
        buf = torch.empty(2, 1, H, n + capacity, D, dtype=self.compute_dtype, device=self.prefix_keys.device)
        if self.dense is None:
            buf[0, 0, :, :n] = self.prefix_keys.view(H, n, D)
            buf[1, 0, :, :n] = self.prefix_values.view(H, n, D)
        else:
            buf[..., : n + self._suffix, :] = self.dense[..., : n + self._suffix, :]
        self.dense = buf

    def _set_suffix(self, length: int) -> None:
        """Uniform layers: the suffix is the buffer's ``length`` entries after the prefix."""
        n = self.offsets[1]
        self._suffix = length
        self.keys = self.dense[0, :, :, n:n + length]
        self.values = self.dense[1, :, :, n:n + length]

    def _empty_suffix(self) -> None:
        if self.dense is not None:
            self._set_suffix(0)
            return
        shape = (1, self.num_heads, 0, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.compute_dtype, device=self.prefix_keys.device)
        self.values = torch.zeros(shape, dtype=self.compute_dtype, device=self.prefix_keys.device)

    def lazy_initialization(self, key_states, value_states) -> None:  # initialized at construction
        return None

    def update(self, key_states, value_states, cache_kwargs=None):
        if key_states.shape[0] != 1:
            raise ValueError("a kvforge RaggedCache serves batch size 1 only")
        if self.dense is not None:
            n, S, T = self.offsets[1], self._suffix, key_states.shape[-2]
            if n + S + T > self.dense.shape[3]:
                self._grow(2 * (S + T) + 64)
            self.dense[0, :, :, n + S:n + S + T] = key_states
            self.dense[1, :, :, n + S:n + S + T] = value_states
            self._set_suffix(S + T)
        else:
            self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
            self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        keys = self.keys
        setattr(keys, _TAG, self)  # lets the attention function find the prefix of this layer
        return keys, self.values

    @property
    def suffix_length(self) -> int:
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length + self.suffix_length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Drop suffix tokens beyond logical position ``max_length`` (negative: drop that many)."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        keep = max(0, max_length - self.logical_length)
        if self.dense is not None:
            self._set_suffix(min(keep, self._suffix))
            return
        self.keys = self.keys[..., :keep, :]
        self.values = self.values[..., :keep, :]

    def reset(self) -> None:
        self._empty_suffix()

    def resident_bytes(self) -> int:
        held = (self.prefix_keys, self.prefix_values) + ((self.dense,) if self.dense is not None else
                                                          (self.keys, self.values))
        total = sum(t.numel() * t.element_size() for t in held)
        if self.prefix_beta is not None:
            total += self.prefix_beta.numel() * self.prefix_beta.element_size()
        return total


class RaggedCache(Cache):
    """A transformers ``Cache`` over an artifact's ragged KV; usable with ``model.generate``.

    ``get_seq_length()`` is the logical length (document tokens + appended
    tokens). ``reset()`` / ``crop(logical_length)`` drop what a question appended.
    """

    def __init__(self, kv: CompressedKV, logical_length: int, compute_dtype: torch.dtype = torch.float32):
        heads = kv.lengths.shape[1]
        head_dim = kv.keys[0].shape[-1]
        layers = [
            RaggedLayer(kv.keys[l], kv.values[l], kv.beta[l] if kv.beta is not None else None,
                        kv.layer_offsets(l), heads, head_dim, logical_length, compute_dtype)
            for l in range(len(kv.keys))
        ]
        super().__init__(layers=layers)
        self.logical_length = logical_length

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers)

    @property
    def suffix_length(self) -> int:
        return self.layers[0].suffix_length


def kv_to(kv: CompressedKV, device) -> CompressedKV:
    """``kv``'s tensors on ``device`` (the same object when they are there already)."""
    device = torch.device(device)
    if kv.keys and kv.keys[0].device == device:
        return kv
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return CompressedKV(lengths=kv.lengths, positions=kv.positions, keys=move(kv.keys), values=move(kv.values),
                        beta=move(kv.beta) if kv.beta is not None else None)


def text_attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    """The attention of a plain text forward: the model's own eager one when it softcaps logits, else SDPA."""
    if kwargs.get("softcap") is not None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        return eager(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for ``attn_implementation="kvforge"``.

    query: (1, H_q, T, D); key / value: (1, H_kv, S, D), the dense suffix whose
    last T entries are the current tokens. Returns (1, T, H_q, D).
    """
    layer = getattr(key, _TAG, None)
    if layer is None:
        return text_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _, n_q, T, D = query.shape
    n_kv, S = key.shape[1], key.shape[2]
    group = n_q // n_kv
    scale = scaling if scaling is not None else D ** -0.5
    softcap = kwargs.get("softcap")  # Gemma 2: logits -> softcap * tanh(logits / softcap), before any bias
    if layer.dense is not None and softcap is None:
        return _uniform_attention(layer, query, T, S, scale), None
    # causal mask over the suffix: current token t sits at suffix index S - T + t
    rows = torch.arange(T, device=query.device).unsqueeze(1) + (S - T)
    blocked = torch.arange(S, device=query.device).unsqueeze(0) > rows  # (T, S)
    out = torch.empty(1, T, n_q, D, dtype=query.dtype, device=query.device)
    for h in range(n_kv):
        q = query[0, h * group:(h + 1) * group]  # (G, T, D)
        a, b = layer.offsets[h], layer.offsets[h + 1]
        kp = layer.prefix_keys[a:b].to(query.dtype)  # (n_h, D)
        vp = layer.prefix_values[a:b].to(query.dtype)
        s_pre = torch.matmul(q, kp.T) * scale  # (G, T, n_h)
        s_suf = torch.matmul(q, key[0, h].T) * scale  # (G, T, S)
        if softcap is not None:
            s_pre, s_suf = (torch.tanh(s / softcap) * softcap for s in (s_pre, s_suf))
        if layer.prefix_beta is not None:
            s_pre = s_pre + layer.prefix_beta[a:b].to(query.dtype)
        s_suf = s_suf.masked_fill(blocked, float("-inf"))
        probs = torch.softmax(torch.cat([s_pre, s_suf], dim=-1).float(), dim=-1).to(query.dtype)
        o = torch.matmul(probs[..., : b - a], vp) + torch.matmul(probs[..., b - a:], value[0, h])  # (G, T, D)
        out[0, :, h * group:(h + 1) * group] = o.transpose(0, 1)
    return out, None


def _uniform_attention(layer: RaggedLayer, query, T: int, S: int, scale) -> torch.Tensor:
    """Every head holds n prefix entries, in the layer's dense buffer just before the S suffix entries (the last
    T of them the current tokens): one SDPA call. query: (1, H_q, T, D). Returns (1, T, H_q, D)."""
    n = layer.offsets[1]
    k = layer.dense[0, :, :, : n + S]  # (1, H_kv, n + S, D), no copy
    v = layer.dense[1, :, :, : n + S]
    mask = _suffix_mask(T, n, S, query.dtype, query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


_MASK: dict = {}


def _suffix_mask(T: int, n: int, S: int, dtype, device) -> torch.Tensor | None:
    """(T, n + S) additive mask: the prefix open, the suffix causal; None for one token. One per forward's shape
    (every layer of a forward shares it)."""
    if T == 1:
        return None
    key = (T, n, S, dtype, device)
    if key not in _MASK:
        _MASK.clear()
        rows = torch.arange(T, device=device).unsqueeze(1) + (S - T)
        blocked = torch.arange(S, device=device).unsqueeze(0) > rows
        mask = torch.zeros(T, n + S, dtype=dtype, device=device)
        mask[:, n:].masked_fill_(blocked, float("-inf"))
        _MASK[key] = mask
    return _MASK[key]


_registered = False
EAGER = "_eager"  # suffix of the names whose masks are eager's additive float masks


def attention_names(base: str, fn, mask_for_sdpa, mask_for_eager) -> None:
    """Register ``base`` (SDPA's boolean mask, None when causal suffices) and ``base + "_eager"`` (eager's float
    mask): a model loaded with the eager attention (softcapping) gets the float masks its eager path adds."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, mask in ((base, mask_for_sdpa), (base + EAGER, mask_for_eager)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, mask)


def attention_name(model, base: str) -> str:
    """``base``, or its eager variant when ``model`` computes text with the eager attention."""
    current = getattr(model.config, "_attn_implementation", None) or ""
    return base + EAGER if current == "eager" or current.endswith(EAGER) else base


def register_attention() -> None:
    """Register ``"kvforge"`` with transformers (idempotent; SDPA's or eager's mask builder for the fallback)."""
    global _registered
    if _registered:
        return
    from transformers.masking_utils import eager_mask, sdpa_mask

    attention_names(ATTN_NAME, ragged_attention, sdpa_mask, eager_mask)
    _registered = True


def use_ragged_attention(model) -> None:
    """Switch ``model`` to the kvforge attention (text prefill keeps working through SDPA or eager)."""
    register_attention()
    name = attention_name(model, ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)
