"""One zarr v3 array's metadata and chunks, restricted to what kvforge writes, and the arrays a document holds.

The subset (spec section 3): a regular chunk grid, the default '/' chunk key
encoding, ``bytes`` (little endian) + ``zstd`` + ``crc32c`` codecs, and a fixed
dtype allow-list. :meth:`ArraySpec.parse` refuses anything else before a byte
of chunk data is read; :meth:`ArraySpec.decode` bounds what zstd may produce by
what the metadata implies (zarr-python's own codecs do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .. import quantize as _quant
from ..errors import FormatError, IntegrityError

CHUNK_BYTES = 4 * 1024 * 1024  # decoded bytes per chunk the writer aims at
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # the reader refuses larger decoded chunks
ZSTD_LEVEL = 3

# zarr v3 data types the reader accepts, and the torch dtype each holds (bfloat16 travels as uint16 bits)
DTYPES = {"int32": (np.int32, torch.int32), "uint8": (np.uint8, torch.uint8), "uint16": (np.uint16, torch.bfloat16),
          "float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}
ZARR_DTYPE = {torch.int32: "int32", torch.uint8: "uint8", torch.bfloat16: "uint16", torch.float16: "float16",
              torch.float32: "float32"}
CODECS_WRITTEN = [{"name": "bytes", "configuration": {"endian": "little"}},
                  {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}},
                  {"name": "crc32c"}]
# the data type each array must have, where it does not follow the storage dtype
ARRAY_DTYPES = {"lengths": {"int32"}, "positions": {"int32"}, "key_scale": {"float16"}, "key_min": {"float16"},
                "value_scale": {"float16"}, "beta": {"float32"}}


def array_names(storage: dict) -> dict:
    """{array name: shape(L, H, D, N, width)} of a document group with this manifest ``storage``.

    L layers, H KV heads, D head_dim, N kept entries over all layers, width = D * bits / 8 bytes of codes.
    """
    dense = storage["quantization"] == "none"
    names = {"lengths": lambda L, H, D, N, W: (L, H),
             "positions": lambda L, H, D, N, W: (N,),
             "keys": lambda L, H, D, N, W: (N, D if dense else W),
             "values": lambda L, H, D, N, W: (N, D if dense else W)}
    if not dense:
        names |= {"key_scale": lambda L, H, D, N, W: (L, H, D), "key_min": lambda L, H, D, N, W: (L, H, D),
                  "value_scale": lambda L, H, D, N, W: (N,)}
    if storage["has_beta"]:
        names["beta"] = lambda L, H, D, N, W: (N,)
    return names


def code_width(storage: dict, head_dim: int) -> int:
    """Bytes per entry of quantized keys / values (``head_dim * bits / 8``)."""
    return head_dim * _quant.bits_of(storage["quantization"]) // 8


@dataclass
class ArraySpec:
    """A zarr v3 array's metadata, restricted to what kvforge writes."""

    shape: tuple
    chunks: tuple
    data_type: str
    codecs: list

    @property
    def np_dtype(self):
        return np.dtype(DTYPES[self.data_type][0]).newbyteorder("<")

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunks, dtype=np.int64)) * self.np_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def grid(self) -> tuple:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def chunk_indices(self):
        return list(np.ndindex(*self.grid())) if self.shape else [()]

    def chunk_keys(self) -> list[str]:
        return ["/".join(["c", *map(str, idx)]) for idx in self.chunk_indices()]

    @staticmethod
    def parse(meta, where: str) -> "ArraySpec":
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: array metadata is not an object")
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise FormatError(f"{where}: not a zarr v3 array")
        dtype = meta.get("data_type")
        if dtype not in DTYPES:
            raise FormatError(f"{where}: data_type {dtype!r} is not one kvforge reads ({sorted(DTYPES)})")
        shape, grid = meta.get("shape"), meta.get("chunk_grid")
        chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
        if (not isinstance(grid, dict) or grid.get("name") != "regular" or not _ints(shape, 0)
                or not _ints(chunks, 1) or len(chunks) != len(shape)):
            raise FormatError(f"{where}: shape / chunk_grid must be integer lists with a regular grid")
        enc = meta.get("chunk_key_encoding")
        if enc != {"name": "default", "configuration": {"separator": "/"}}:
            raise FormatError(f"{where}: chunk_key_encoding must be default with separator '/', found {enc!r}")
        if meta.get("storage_transformers") not in (None, []):
            raise FormatError(f"{where}: storage_transformers are not supported")
        codecs = meta.get("codecs")
        if not _codecs_ok(codecs, np.dtype(DTYPES[dtype][0]).itemsize):
            raise FormatError(f"{where}: codecs {json.dumps(codecs)[:200]} are not bytes(little) + zstd + crc32c")
        spec = ArraySpec(shape=tuple(shape), chunks=tuple(chunks), data_type=dtype, codecs=codecs)
        if spec.chunk_nbytes > MAX_CHUNK_BYTES:
            raise FormatError(f"{where}: chunks of {spec.chunk_nbytes} bytes exceed the {MAX_CHUNK_BYTES} byte cap")
        if int(np.prod(spec.grid(), dtype=np.int64)) > 1_000_000:
            raise FormatError(f"{where}: more than a million chunks")
        return spec

    def decode(self, raw: bytes, where: str) -> bytes:
        """crc32c check, then zstd with the exact decoded size the metadata implies."""
        import google_crc32c
        import zstandard

        if len(raw) < 4:
            raise IntegrityError(f"{where}: chunk is truncated")
        body, crc = raw[:-4], raw[-4:]
        if google_crc32c.value(body) != int.from_bytes(crc, "little"):
            raise IntegrityError(f"{where}: chunk checksum (crc32c) mismatch; the library is corrupt")
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: chunk is not a zstd frame ({exc})") from exc
        if size != self.chunk_nbytes:
            raise FormatError(f"{where}: chunk declares {size} decoded bytes, the array needs {self.chunk_nbytes}")
        try:  # zstd enforces the declared content size, checked above, so the output is bounded
            dobj = zstandard.ZstdDecompressor().decompressobj()
            data = dobj.decompress(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where}: chunk does not decompress ({exc})") from exc
        if len(data) != self.chunk_nbytes or not dobj.eof or dobj.unused_data:
            raise IntegrityError(f"{where}: chunk is not exactly one zstd frame of {self.chunk_nbytes} bytes")
        return data

    def to_json(self) -> dict:
        return {"zarr_format": 3, "node_type": "array", "shape": list(self.shape), "data_type": self.data_type,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunks)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": self.codecs, "attributes": {}}


def _ints(value, low: int) -> bool:
    return (isinstance(value, list) and len(value) <= 4
            and all(isinstance(v, int) and not isinstance(v, bool) and low <= v < 2 ** 40 for v in value))


def _codecs_ok(codecs, itemsize: int) -> bool:
    if not isinstance(codecs, list) or len(codecs) != 3:
        return False
    first, middle, last = codecs
    endian = first.get("configuration", {}).get("endian") if isinstance(first, dict) else None
    return (isinstance(first, dict) and first.get("name") == "bytes"
            and (endian == "little" or (endian is None and itemsize == 1))
            and isinstance(middle, dict) and middle.get("name") == "zstd"
            and isinstance(last, dict) and last.get("name") == "crc32c")


def spec_for(t: torch.Tensor) -> ArraySpec:
    """The metadata the writer gives tensor ``t``: chunks of whole rows, about CHUNK_BYTES each."""
    dtype = ZARR_DTYPE[t.dtype]
    itemsize = t.element_size()
    row = itemsize * int(np.prod(t.shape[1:], dtype=np.int64)) if t.dim() > 1 else itemsize
    first = max(1, min(int(t.shape[0]) if t.dim() else 1, CHUNK_BYTES // max(1, row)))
    codecs = json.loads(json.dumps(CODECS_WRITTEN))
    return ArraySpec(shape=tuple(t.shape), chunks=(first, *t.shape[1:]) if t.dim() else (), data_type=dtype,
                     codecs=codecs)


def encode_chunk(data: bytes) -> bytes:
    """zstd (with its content size, which the reader checks) and a little-endian crc32c."""
    import google_crc32c
    import zstandard

    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    return body + google_crc32c.value(body).to_bytes(4, "little")
