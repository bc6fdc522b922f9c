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
_BATCH_TAG = "_kvforge_ragged_batch"


class RaggedLayer(CacheLayerMixin):
    """One layer: a ragged, read-only prefix and a dense suffix (1, kv_heads, S, head_dim)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys, values, beta, offsets: list[int], num_heads: int, head_dim: int,
                 logical_length: int, compute_dtype: torch.dtype, codes=None):
        super().__init__()
        self.prefix_keys = keys  # (N, D), storage dtype; None when ``codes`` hold the prefix
        self.prefix_values = values  # (N, D)
        self.codes = codes  # quantize.QuantizedLayer: stored codes, a head dequantized when it attends
        self.device = (keys if codes is None else codes.key_codes).device
        self.prefix_beta = beta  # (N,) float32 or None
        self.offsets = offsets  # H + 1 ints
        sizes = {b - a for a, b in zip(offsets[:-1], offsets[1:])}
        # every head keeps the same number of entries (keep 1.0, uniform methods): one fused SDPA call serves them
        self.uniform = len(sizes) == 1 and beta is None
        self.num_heads, self.head_dim = num_heads, head_dim
        self.logical_length = logical_length
        self.compute_dtype = compute_dtype
        self._empty_suffix()
        self.is_initialized = True

    def _empty_suffix(self) -> None:
        shape = (1, self.num_heads, 0, self.head_dim)
        device = self.device  # the suffix lives where the prefix does
        self.keys = torch.zeros(shape, dtype=self.compute_dtype, device=device)
        self.values = torch.zeros(shape, dtype=self.compute_dtype, device=device)

    def fork(self) -> "RaggedLayer":
        """A layer over the same read-only prefix tensors with an empty suffix of its own (no copy)."""
        twin = RaggedLayer.__new__(RaggedLayer)
        CacheLayerMixin.__init__(twin)
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("keys", "values")})
        twin._empty_suffix()
        return twin

    def lazy_initialization(self, key_states, value_states) -> None:  # initialized at construction
        return None

    def update(self, key_states, value_states, cache_kwargs=None):
        if key_states.shape[0] != 1:
            raise ValueError("a kvforge RaggedCache serves batch size 1 only")
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
        self.keys = self.keys[..., :keep, :]
        self.values = self.values[..., :keep, :]

    def reset(self) -> None:
        self._empty_suffix()

    def head_prefix(self, h: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``h``'s prefix keys and values (n_h, D) in ``dtype`` (dequantized now when held as codes)."""
        a, b = self.offsets[h], self.offsets[h + 1]
        if self.codes is not None:
            return self.codes.keys(a, b, h).to(dtype), self.codes.values(a, b).to(dtype)
        return self.prefix_keys[a:b].to(dtype), self.prefix_values[a:b].to(dtype)

    def full_prefix(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's prefix keys and values, head-major (N, D), in ``dtype``."""
        if self.codes is None:
            return self.prefix_keys.to(dtype), self.prefix_values.to(dtype)
        keys = torch.cat([self.codes.keys(self.offsets[h], self.offsets[h + 1], h) for h in range(self.num_heads)])
        return keys.to(dtype), self.codes.values(0, self.offsets[-1]).to(dtype)

    def resident_bytes(self) -> int:
        prefix = (self.prefix_keys, self.prefix_values) if self.codes is None else ()
        total = sum(t.numel() * t.element_size() for t in (*prefix, self.keys, self.values))
        if self.codes is not None:
            total += self.codes.nbytes()
        if self.prefix_beta is not None:
            total += self.prefix_beta.numel() * self.prefix_beta.element_size()
        return total


class RaggedCache(Cache):
    """A transformers ``Cache`` over an artifact's ragged KV; usable with ``model.generate``.

    ``get_seq_length()`` is the logical length (document tokens + appended
    tokens). ``reset()`` / ``crop(logical_length)`` drop what a question appended.
    """

    def __init__(self, kv: CompressedKV, logical_length: int, compute_dtype: torch.dtype = torch.float32,
                 codes: list | None = None):
        """``codes``: per layer ``quantize.QuantizedLayer`` to hold instead of ``kv``'s keys and values."""
        heads = kv.lengths.shape[1]
        head_dim = codes[0].dim if codes else kv.keys[0].shape[-1]
        layers = [
            RaggedLayer(None if codes else kv.keys[l], None if codes else kv.values[l],
                        kv.beta[l] if kv.beta is not None else None, kv.layer_offsets(l), heads, head_dim,
                        logical_length, compute_dtype, codes=codes[l] if codes else None)
            for l in range(kv.lengths.shape[0])
        ]
        super().__init__(layers=layers)
        self.logical_length = logical_length

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers)

    def fork(self) -> "RaggedCache":
        """A fresh cache over the same prefix tensors: what a question appends stays in its own fork."""
        twin = RaggedCache.__new__(RaggedCache)
        Cache.__init__(twin, layers=[layer.fork() for layer in self.layers])
        twin.logical_length = self.logical_length
        return twin

    @property
    def suffix_length(self) -> int:
        return self.layers[0].suffix_length


class _BatchedLayer(CacheLayerMixin):
    """One layer of a :class:`BatchedRaggedCache`: row b of every update goes to member b's own layer."""

    is_compileable = False
    is_sliding = False

    def __init__(self, members: list[RaggedLayer]):
        super().__init__()
        self.members = members
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, cache_kwargs=None):
        # key_states: (B, H_kv, 1, D); each row joins its own sequence's suffix
        rows = [m.update(key_states[b:b + 1], value_states[b:b + 1]) for b, m in enumerate(self.members)]
        setattr(key_states, _BATCH_TAG, rows)  # the attention function attends row by row, each on its own cache
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(m.get_seq_length() for m in self.members)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1


class BatchedRaggedCache(Cache):
    """Several :class:`RaggedCache` as one batch for a decode step: one new token per row.

    Rows may be different documents at different lengths; the projections and MLPs run once for the
    batch, the attention of each row runs over its own ragged prefix and suffix. Pass explicit
    ``position_ids`` (B, 1): each row continues at its own logical length.
    """

    def __init__(self, caches: list[RaggedCache]):
        layers = [_BatchedLayer([c.layers[i] for c in caches]) for i in range(len(caches[0].layers))]
        super().__init__(layers=layers)
        self.members = caches


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
    rows = getattr(key, _BATCH_TAG, None)
    if rows is not None:  # a batched decode step: each row on its own ragged cache
        return torch.cat([ragged_attention(module, query[b:b + 1], k, v, None, scaling=scaling, **kwargs)[0]
                          for b, (k, v) in enumerate(rows)]), None
    layer = getattr(key, _TAG, None)
    if layer is None:
        return text_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _, n_q, T, D = query.shape
    n_kv, S = key.shape[1], key.shape[2]
    group = n_q // n_kv
    scale = scaling if scaling is not None else D ** -0.5
    # causal mask over the suffix: current token t sits at suffix index S - T + t
    softcap = kwargs.get("softcap")  # Gemma 2: logits -> softcap * tanh(logits / softcap), before any bias
    rows = torch.arange(T, device=query.device).unsqueeze(1) + (S - T)
    blocked = torch.arange(S, device=query.device).unsqueeze(0) > rows  # (T, S)
    if layer.uniform and softcap is None:
        return _uniform_attention(layer, query, key, value, blocked, scale), None
    out = torch.empty(1, T, n_q, D, dtype=query.dtype, device=query.device)
    for h in range(n_kv):
        q = query[0, h * group:(h + 1) * group]  # (G, T, D)
        a, b = layer.offsets[h], layer.offsets[h + 1]
        kp, vp = layer.head_prefix(h, query.dtype)  # (n_h, D)
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


def _uniform_attention(layer: RaggedLayer, query, key, value, blocked, scale) -> torch.Tensor:
    """Every head holds n prefix entries: view them as (1, H_kv, n, D) and make one SDPA call.

    query: (1, H_q, T, D); key / value: (1, H_kv, S, D); blocked: (T, S). Returns (1, T, H_q, D).
    """
    n_kv, D = key.shape[1], key.shape[3]
    n = layer.offsets[1]
    keys, values = layer.full_prefix(query.dtype)
    kp, vp = keys.view(1, n_kv, n, D), values.view(1, n_kv, n, D)
    k = torch.cat([kp, key], dim=2)  # (1, H_kv, n + S, D)
    v = torch.cat([vp, value], dim=2)
    mask = None
    if bool(blocked.any()):
        allowed = torch.ones(blocked.shape[0], n + blocked.shape[1], dtype=torch.bool, device=blocked.device)
        allowed[:, n:] = ~blocked
        mask = allowed
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


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
