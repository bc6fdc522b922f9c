"""Storage quantization of a ragged KV cache, and its exact inverse (spec section 3.1).

Applied after compression, on write; undone on load (the runtime attends over
the dequantized keys and values). Both directions live here so that the writer
and the reader cannot disagree; the runtime imports only :func:`dequantize_keys`
and :func:`dequantize_values` through the artifact reader.

Integer codes in ``[0, 2**bits - 1]``, grouped as in KIVI (Liu et al., 2024):

* keys, asymmetric, one (scale, minimum) per KV head and channel (keys have
  outlier channels, so a channel's range is the natural group):
  ``x ~= minimum + code * scale``;
* values, symmetric, one scale per entry (token) over its ``head_dim`` channels:
  ``x ~= (code - 2**(bits-1)) * scale`` with ``scale = max|x| / (2**(bits-1) - 1)``.

Measured on the embedded model (docs/experiments/storage.md): symmetric per-token
values cost no more KL than asymmetric ones (int4, keep 0.1: 0.460 vs 0.474) for
half the per-entry overhead, and float16 key scales the same as float32.

``int8`` stores one code per byte, ``int4`` two (the even channel in the low
nibble). Shapes: codes ``(N, D * bits / 8)`` uint8; key scale and minimum
``(H, D)`` float16; value scale ``(N,)`` float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = {"none": 16, "int8": 8, "int4": 4}


def bits_of(scheme: str) -> int:
    return SCHEMES[scheme]


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, D) uint8 codes < 2**bits -> (N, D * bits / 8) uint8 bytes."""
    if bits == 8:
        return q.contiguous()
    lo, hi = q[:, 0::2], q[:, 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """(N, D * bits / 8) uint8 -> (N, D) uint8 codes."""
    if bits == 8:
        return codes
    out = torch.empty(codes.shape[0], dim, dtype=torch.uint8)
    out[:, 0::2] = codes & 0x0F
    out[:, 1::2] = codes >> 4
    return out


def _encode(x: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of x (N, D) given broadcastable minimum / scale (float32); a zero scale gives code 0."""
    levels = (1 << bits) - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((x - minimum) / safe).round().clamp_(0, levels)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8)


def _scale(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(hi - lo) / levels, rounded up to ``dtype`` so that hi stays reachable."""
    s = ((hi - lo) / ((1 << bits) - 1)).to(dtype)
    short = s.float() * ((1 << bits) - 1) < (hi - lo)
    if bool(short.any()):  # one step up where rounding to the storage dtype lost range
        s = torch.where(short, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def quantize_keys(keys: torch.Tensor, counts: list[int], bits: int):
    """keys (N, D) head-major with ``counts[h]`` rows per head -> (codes, scale (H, D) f16, minimum (H, D) f16)."""
    x = keys.float()
    H, D = len(counts), x.shape[1]
    minimum = torch.zeros(H, D)
    maximum = torch.zeros(H, D)
    start = 0
    for h, n in enumerate(counts):
        if n:
            minimum[h] = x[start:start + n].min(0).values
            maximum[h] = x[start:start + n].max(0).values
        start += n
    minimum = minimum.to(torch.float16)
    scale = _scale(minimum.float(), maximum, bits, torch.float16)
    rep = torch.tensor(counts, dtype=torch.long)
    q = _encode(x, minimum.float().repeat_interleave(rep, 0), scale.float().repeat_interleave(rep, 0), bits)
    return pack(q, bits), scale, minimum


def quantize_values(values: torch.Tensor, bits: int):
    """values (N, D) -> (codes, scale (N,) f16): symmetric, one scale per entry."""
    x = values.float()
    half = 1 << (bits - 1)
    amax = x.abs().amax(1) if x.shape[0] else torch.zeros(0)
    scale = _scale(torch.zeros_like(amax), amax, bits - 1, torch.float16)  # max|x| / (2**(bits-1) - 1)
    s = scale.float()[:, None]
    q = torch.where(s > 0, (x / torch.where(s > 0, s, torch.ones_like(s))).round(), torch.zeros_like(x))
    q = (q.clamp_(-(half - 1), half - 1) + half).to(torch.uint8)
    return pack(q, bits), scale


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, counts: list[int],
                    bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: (N, D) float32."""
    rep = torch.tensor(counts, dtype=torch.long)
    q = unpack(codes, bits, dim).float()
    return minimum.float().repeat_interleave(rep, 0) + q * scale.float().repeat_interleave(rep, 0)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: (N, D) float32."""
    q = unpack(codes, bits, dim).float() - (1 << (bits - 1))
    return q * scale.float()[:, None]


@dataclass
class QuantizedLayer:
    """One layer's stored codes, kept resident; a head's slice is dequantized when attention reads it.

    key_codes / value_codes: (N, D * bits / 8) uint8; key_scale / key_min: (H, D) float16 (per head and
    channel); value_scale: (N,) float16 (per entry); ``dtype``: the storage dtype the load-time path
    dequantizes to, so that the values attention sees are bit-identical to a document dequantized on load.
    """

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_min: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    bits: int
    dim: int
    dtype: torch.dtype

    def keys(self, a: int, b: int, head: int) -> torch.Tensor:
        """Rows a:b (all of head ``head``), as :func:`dequantize_keys` then ``.to(dtype)`` would give them."""
        q = unpack(self.key_codes[a:b], self.bits, self.dim).float()
        return (self.key_min[head].float() + q * self.key_scale[head].float()).to(self.dtype)

    def values(self, a: int, b: int) -> torch.Tensor:
        q = unpack(self.value_codes[a:b], self.bits, self.dim).float() - (1 << (self.bits - 1))
        return (q * self.value_scale[a:b].float()[:, None]).to(self.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.key_codes, self.key_scale, self.key_min, self.value_codes, self.value_scale))

    def to(self, device) -> "QuantizedLayer":
        move = lambda t: t.to(device)  # noqa: E731
        return QuantizedLayer(move(self.key_codes), move(self.key_scale), move(self.key_min), move(self.value_codes),
                              move(self.value_scale), self.bits, self.dim, self.dtype)
