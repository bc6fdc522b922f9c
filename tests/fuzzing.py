"""The hostile-input fuzzer of the artifact and library readers: mutated golden files.

``tests/test_fuzz.py`` runs a fast seeded subset and uses the helpers; the
10,000-input run is ``benchmarks/fuzz.py``, a thin command line over :func:`run`:

    .venv/bin/python benchmarks/fuzz.py --n 10000 --seed 0 [--out DIR]
    .venv/bin/python benchmarks/fuzz.py --seed 0 --index 1234      # replay one input, with its traceback

Every input must give a loaded artifact (or list of ids) or a ``KvforgeError``:
any other exception, a hang (past ``--timeout`` seconds) or a peak-RSS growth
beyond what the input's size justifies (``memory_budget``) is UNEXPECTED, and
the exit status is 1.

Inputs are the golden ``.kv`` files and the golden zip library in
``formats/golden/``, mutated by seeded mutators: raw byte edits, structure-aware
edits of the safetensors header and the manifest (half the time with the manifest
sha256 re-fixed so that the deeper checks are reached), tensor-data edits with
every digest re-fixed, and, for the zip, member-level edits (zarr.json fields,
chunk bytes with valid zstd / crc32c, zstd bombs, documents claiming a huge shape
with their metadata and chunks following the claim) rebuilt into a valid zip, and
zip-structure attacks (``..`` / absolute names, duplicates, compressed entries,
patched central-directory fields).
Input ``i`` of seed ``s`` depends only on ``(s, i)``, so any finding replays
with ``--index``. ``--trace`` also bounds Python / numpy allocations (tracemalloc;
it sees allocations that are requested but never touched, about 5x slower).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import math
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import traceback
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "formats" / "golden"
MANIFEST_KEY, MANIFEST_SHA_KEY = "kvforge.manifest", "kvforge.manifest_sha256"  # as in kvforge/manifest.py

# values that tend to sit on boundaries: sizes, signs, int32 / int64 / float limits
INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 1023, 1024, 1025, 4096, 65535, 65536, 2**24, 2**31 - 1, 2**31,
                    -2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, -2**63, 2**64, 10**30]
INTERESTING_JSON = INTERESTING_INTS + [
    0.0, -0.0, 0.5, 1.5, 2.0, 1e-300, 1e308, -1e308, "", "x", "1", "é", "\u0000", "\ud800", "../x", "a" * 300,
    None, True, False, [], {}, [0], [[]], {"": None},
    "float16", "bfloat16", "float32", "float64", "int8", "int4", "int16", "uint8", "uint16", "int32", "none",
    "1.0.0", "1.1.0", "1.99.0", "2.0.0", "0.9.0", "1.0", "1.0.0.0", "v1.0.0"]
INTERESTING_BYTES = [0x00, 0x01, 0x20, 0x22, 0x2C, 0x30, 0x5B, 0x5C, 0x7B, 0x7D, 0x7F, 0x80, 0xC0, 0xFE, 0xFF]


class Skip(Exception):
    """A structured mutator does not apply to this input (e.g. its header no longer parses)."""


class Hang(BaseException):
    """Raised by the alarm when one input runs past the time limit (BaseException: readers cannot swallow it)."""


# --------------------------------------------------------------------------- goldens
def goldens() -> dict[str, bytes]:
    """{path relative to formats/golden: bytes} of every golden .kv file and zip library."""
    paths = sorted(GOLDEN.glob("*/*.kv")) + sorted(GOLDEN.glob("*/*.zarr.zip"))
    if not any(p.suffix == ".kv" for p in paths):
        raise FileNotFoundError(f"no golden .kv files under {GOLDEN}")
    return {p.relative_to(GOLDEN).as_posix(): p.read_bytes() for p in paths}


def kind_of(name: str) -> str:
    return "zip" if name.endswith(".zip") else "kv"


def suffix_of(kind: str) -> str:
    return ".zarr.zip" if kind == "zip" else ".kv"


# --------------------------------------------------------------------------- raw byte mutators
def _span(n: int, rng: random.Random, most: int = 64) -> tuple[int, int]:
    start = rng.randrange(n + 1)
    return start, min(n, start + rng.randint(1, most))


def m_bitflip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        raise Skip
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_overwrite(data: bytes, rng: random.Random) -> bytes:
    if not data:
        raise Skip
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(len(out))] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(out)


def m_interesting_int(data: bytes, rng: random.Random) -> bytes:
    """Write a boundary integer (little-endian, 2, 4 or 8 bytes) at a random offset."""
    width = rng.choice([2, 4, 8])
    if len(data) < width:
        raise Skip
    value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
    at = rng.randrange(len(data) - width + 1)
    return data[:at] + value.to_bytes(width, "little") + data[at + width:]


def m_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))] if data else data


def m_extend(data: bytes, rng: random.Random) -> bytes:
    junk = rng.choice([b"\0", b" ", b"{}", b"PK\x05\x06" + bytes(18)])
    n = rng.choice([1, 7, 64, 4096])
    return data + (rng.randbytes(n) if rng.random() < 0.5 else (junk * n)[:n])


def m_dup_range(data: bytes, rng: random.Random) -> bytes:
    a, b = _span(len(data), rng, 256)
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[a:b] + data[at:]


def m_del_range(data: bytes, rng: random.Random) -> bytes:
    a, b = _span(len(data), rng, 256)
    return data[:a] + data[b:]


BYTE_MUTATORS = {"bitflip": m_bitflip, "overwrite": m_overwrite, "interesting_int": m_interesting_int,
                 "truncate": m_truncate, "extend": m_extend, "dup_range": m_dup_range, "del_range": m_del_range}
# byte edits that keep the length (for chunk data whose decoded size is fixed)
INPLACE_MUTATORS = {"bitflip": m_bitflip, "overwrite": m_overwrite, "interesting_int": m_interesting_int}


def byte_mutate(data: bytes, rng: random.Random, table=BYTE_MUTATORS) -> bytes:
    name = rng.choice(sorted(table))
    try:
        return table[name](data, rng)
    except Skip:
        return data + b"\0"


# --------------------------------------------------------------------------- JSON edits
def json_paths(obj, prefix=()) -> list[tuple]:
    """Every path (tuple of keys / indices) to a node of ``obj``, the root excluded."""
    found = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found.append(prefix + (key,))
        found.extend(json_paths(value, prefix + (key,)))
    return found


def get_path(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def set_path(obj, path, value):
    """A deep copy of ``obj`` with the node at ``path`` replaced by ``value`` (or deleted, for ``DELETE``)."""
    obj = copy.deepcopy(obj)
    parent = get_path(obj, path[:-1])
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


DELETE = object()


def _nearby(value, rng: random.Random):
    """A value of roughly the same kind as ``value``, likely to cross a boundary."""
    if isinstance(value, bool):
        return rng.choice([not value, None, 0, 1, "true"])
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2, value * 1_000_000, 0, float(value),
                           str(value), rng.choice(INTERESTING_INTS)])
    if isinstance(value, float):
        return rng.choice([value * 2, -value, value + 1e-6, 0.0, 1.0, 1.0000001, int(value), 1e308])
    if isinstance(value, str) and re.fullmatch(r"\d+\.\d+\.\d+", value):
        return rng.choice(["2.0.0", "0.9.0", "1.99.0", "1.0", "1.0.0.0", "1.x.0", "01.0.0", " 1.0.0", "1.0.0-rc1"])
    if isinstance(value, str):
        return rng.choice(["", value + "x", value[:-1], value.upper(), value + "é", value * 2, value[::-1],
                           "a" * 64, "0" * 64, value.replace("1", "2")])
    if isinstance(value, list):
        if not value:
            return [rng.choice(INTERESTING_JSON)]
        return rng.choice([value[:-1], value + value[-1:], value[::-1], [], [value], value * 3,
                           [rng.choice(INTERESTING_INTS) for _ in value]])
    if isinstance(value, dict):
        if value and rng.random() < 0.5:
            return set_path(value, (rng.choice(sorted(value)),), DELETE)
        return {**value, rng.choice(["extra", "", "__proto__", "name"]): rng.choice(INTERESTING_JSON)}
    return rng.choice(INTERESTING_JSON)


def json_edit(obj, rng: random.Random, paths: list | None = None):
    """``obj`` with one random node replaced (by a nearby or boundary value) or deleted."""
    paths = paths if paths is not None else json_paths(obj)
    if not paths:
        raise Skip
    path = rng.choice(paths)
    r = rng.random()
    if r < 0.1:
        value = DELETE
    elif r < 0.6:
        value = _nearby(get_path(obj, path), rng)
    else:
        value = copy.deepcopy(rng.choice(INTERESTING_JSON))
    return set_path(obj, path, value)


def dumps_any(obj) -> str:
    """Canonical-looking JSON that may still hold what canonical JSON forbids (NaN, lone surrogates)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- .kv structure
def split_kv(data: bytes) -> tuple[dict, bytes]:
    """(safetensors header, data section) of a .kv file; ``Skip`` if it does not parse."""
    if len(data) < 8:
        raise Skip
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Skip from None
    if not isinstance(header, dict) or len(data) < 8 + n:
        raise Skip
    return header, data[8 + n:]


def join_kv(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def kv_manifest(header: dict) -> dict:
    try:
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (KeyError, TypeError, ValueError):
        raise Skip from None
    if not isinstance(manifest, dict):
        raise Skip
    return manifest


def with_manifest(header: dict, manifest, refix: bool) -> dict:
    """``header`` holding ``manifest``; with ``refix`` its sha256 matches, so the reader looks further."""
    header = copy.deepcopy(header)
    text = dumps_any(manifest)
    header["__metadata__"][MANIFEST_KEY] = text
    if refix:
        header["__metadata__"][MANIFEST_SHA_KEY] = sha256_text(text)
    return header


def kv_tensor_digest(header: dict, body: bytes) -> str:
    """The spec's tensor digest (section 4), computed from the container alone (independent of kvforge)."""
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        start, end = entry["data_offsets"]
        h.update(name.encode() + b"\0" + entry["dtype"].encode() + b"\0")
        h.update(json.dumps(entry["shape"], separators=(",", ":")).encode() + b"\0")
        h.update(body[start:end])
    return h.hexdigest()


def refix_kv(header: dict, body: bytes) -> bytes:
    """Re-fix tensors_sha256 and the manifest sha256 after a tensor edit, so every check runs."""
    try:
        manifest = kv_manifest(header)
        manifest["tensors_sha256"] = kv_tensor_digest(header, body)
    except (Skip, KeyError, TypeError, ValueError):
        return join_kv(header, body)
    return join_kv(with_manifest(header, manifest, refix=True), body)


def m_header_len(data: bytes, rng: random.Random) -> bytes:
    """Rewrite the 8-byte safetensors header length."""
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    value = rng.choice([0, 1, 2, n - 1, n + 1, n - 8, n + 8, len(data) - 8, len(data) - 7, len(data),
                        16 * 1024 * 1024, 16 * 1024 * 1024 + 1, 2**31, 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", value % 2**64) + data[8:]


def m_header_json(data: bytes, rng: random.Random) -> bytes:
    """Edit the safetensors header: a tensor's dtype, shape or offsets, a renamed / extra / lost entry."""
    header, body = split_kv(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(8)
    if op == 0:
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "X"])
    elif op == 1:
        entry["shape"] = _nearby(entry["shape"], rng)
    elif op == 2:
        entry["data_offsets"] = [rng.choice(INTERESTING_INTS + entry["data_offsets"]) for _ in range(2)]
    elif op == 3:
        del header[name]
    elif op == 4:
        header[rng.choice([f"{name}x", "layer.99.keys", "layer.-1.keys", "", "lengths "])] = copy.deepcopy(entry)
    elif op == 5:
        header["__metadata__"][rng.choice(["extra", "kvforge.manifestx", ""])] = "x"
    elif op == 6:
        header["__metadata__"] = rng.choice([None, [], "x", {}, {MANIFEST_KEY: 1, MANIFEST_SHA_KEY: 2}])
    else:
        header = json_edit(header, rng)
    return join_kv(header, body)


def m_manifest(data: bytes, rng: random.Random) -> bytes:
    """Edit one manifest field; half the time re-fix its sha256 so that schema and tensor checks are reached."""
    header, body = split_kv(data)
    if rng.random() < 0.15:  # text that may no longer be JSON, with a matching sha256
        text = byte_mutate(header["__metadata__"][MANIFEST_KEY].encode(), rng).decode("utf-8", "replace")
        header["__metadata__"].update({MANIFEST_KEY: text, MANIFEST_SHA_KEY: sha256_text(text)})
        return join_kv(header, body)
    manifest = json_edit(kv_manifest(header), rng)
    return join_kv(with_manifest(header, manifest, refix=rng.random() < 0.5), body)


def m_manifest_shape(data: bytes, rng: random.Random) -> bytes:
    """Claim another shape (layers, heads, head_dim, length, counts) with a valid manifest sha256."""
    header, body = split_kv(data)
    manifest = kv_manifest(header)
    field = rng.choice([("model", "num_layers"), ("model", "num_kv_heads"), ("model", "head_dim"),
                        ("document", "logical_length"), ("compression", "kept_entries"),
                        ("compression", "total_entries"), ("storage", "has_beta"), ("storage", "quantization"),
                        ("storage", "dtype"), ("version",)])
    choices = {"has_beta": [True, False], "quantization": ["none", "int8", "int4"],
               "dtype": ["float16", "bfloat16", "float32"],
               "version": ["1.0.0", "1.1.0", "1.2.0", "2.0.0", "0.1.0"]}.get(field[-1])
    value = rng.choice(choices) if choices else rng.choice([1, 2, 3, 1024, 4096, 16777216, 1000000, 0, -1])
    manifest = set_path(manifest, field, value)
    return join_kv(with_manifest(header, manifest, refix=True), body)


def m_tensor_data(data: bytes, rng: random.Random) -> bytes:
    """Edit bytes of one tensor in place, then re-fix tensors_sha256 and the manifest sha256."""
    header, body = split_kv(data)
    names = sorted(k for k in header if k != "__metadata__" and header[k]["data_offsets"][1]
                   > header[k]["data_offsets"][0])
    entry = header[rng.choice(names)]
    start, end = entry["data_offsets"]
    part = byte_mutate(body[start:end], rng, INPLACE_MUTATORS)
    if entry["dtype"] in ("I32", "F32") and rng.random() < 0.5:  # a whole boundary / special value
        at = start + 4 * rng.randrange((end - start) // 4)
        value = rng.choice([struct.pack("<i", v) for v in (-1, 0, 1, 2**31 - 1, -2**31, 5, 6, 100)]
                           + [struct.pack("<f", v) for v in (float("nan"), float("inf"), -float("inf"), 1e38)])
        body = body[:at] + value + body[at + 4:]
    else:
        body = body[:start] + part + body[end:]
    return refix_kv(header, body)


KV_MUTATORS = {"header_len": m_header_len, "header_json": m_header_json, "manifest": m_manifest,
               "manifest_shape": m_manifest_shape, "tensor_data": m_tensor_data}


# --------------------------------------------------------------------------- zip structure
def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def build_zip(members, compressed: frozenset = frozenset()) -> bytes:
    """A well-formed zip (valid crc32) of ``(name, bytes)`` members, stored unless named in ``compressed``."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names, which some attacks want
        with zipfile.ZipFile(buf, "w") as zf:
            for name, payload in members:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED
                zf.writestr(info, payload)
    return buf.getvalue()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    try:
        return zip_members(data)
    except Exception:  # an already-mutated zip (stacked mutators)
        raise Skip from None


def _pick(members, rng: random.Random, pred) -> int:
    indices = [i for i, (name, _) in enumerate(members) if pred(name)]
    if not indices:
        raise Skip
    return rng.choice(indices)


def _is_group_meta(name: str) -> bool:
    return name.count("/") == 1 and name.endswith("/zarr.json")


def _is_chunk(name: str) -> bool:
    return "/c/" in name or name.endswith("/c")


def encode_chunk(decoded: bytes, content_size: bool = True) -> bytes:
    """A chunk as kvforge stores it: a zstd frame and its little-endian crc32c."""
    import zstandard

    body = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(decoded)
    return with_crc(body)


def with_crc(body: bytes) -> bytes:
    import google_crc32c

    return body + google_crc32c.value(body).to_bytes(4, "little")


@functools.lru_cache(maxsize=16)
def zstd_bomb(size: int, content_size: bool = True, fill: bytes = b"\0") -> bytes:
    """A valid zstd frame of ``size`` bytes repeating ``fill`` (size declared in its header), made in pieces."""
    import zstandard

    block = (fill * (min(size, 1 << 20) // len(fill) + 1))[:min(size, 1 << 20)]
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj(size=size)
    parts, left = [], size
    while left:
        parts.append(cobj.compress(block[:min(left, len(block))]))
        left -= min(left, len(block))
    return b"".join(parts) + cobj.flush()


def decode_chunk(raw: bytes) -> bytes:
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(raw[:-4])
    except zstandard.ZstdError:
        raise Skip from None


def m_zip_member_bytes(data: bytes, rng: random.Random) -> bytes:
    """Raw byte edit of one member, rebuilt into a valid zip (the zip's own crc32 passes)."""
    members = _members(data)
    i = _pick(members, rng, lambda name: True)
    name, payload = members[i]
    members[i] = (name, byte_mutate(payload, rng))
    return build_zip(members)


def _edit_json_member(data: bytes, rng: random.Random, pred, edit) -> bytes:
    members = _members(data)
    i = _pick(members, rng, pred)
    name, payload = members[i]
    try:
        meta = json.loads(payload)
    except ValueError:
        raise Skip from None
    edited = edit(meta, rng) if rng.random() < 0.97 else rng.choice([[meta], None, "zarr", 3])
    text = json.dumps(edited, indent=rng.choice([None, 2]), ensure_ascii=False, allow_nan=True)
    members[i] = (name, text.encode("utf-8", "surrogatepass"))
    return build_zip(members)


def m_zip_json(data: bytes, rng: random.Random) -> bytes:
    """Generic edit of any member's zarr.json (root, group or array)."""
    return _edit_json_member(data, rng, lambda n: n.endswith("zarr.json"), json_edit)


ARRAY_FIELDS = ("shape", "chunk_shape", "data_type", "codecs", "fill_value", "chunk_key_encoding", "zarr_format",
                "node_type", "storage_transformers", "chunk_grid")


def _edit_array_meta(meta: dict, rng: random.Random) -> dict:
    """One array's metadata in a group's consolidated metadata: shape, chunks, dtype, codecs, fill value..."""
    try:
        arrays = meta["consolidated_metadata"]["metadata"]
        name = rng.choice(sorted(arrays))
        array = arrays[name]
    except (KeyError, TypeError, IndexError):
        raise Skip from None
    if not isinstance(array, dict):
        raise Skip
    if rng.random() < 0.1:  # an array too few or too many
        if rng.random() < 0.5:
            del arrays[name]
        else:
            arrays[rng.choice(["beta", "key_scale", "extra", "lengths2"])] = copy.deepcopy(array)
        return meta
    field = rng.choice(ARRAY_FIELDS)
    if field == "shape":
        array["shape"] = rng.choice([_nearby(array.get("shape", []), rng),
                                     [rng.choice(INTERESTING_INTS) for _ in array.get("shape", [1])]])
    elif field == "chunk_shape":
        try:
            cfg = array["chunk_grid"]["configuration"]
            cfg["chunk_shape"] = rng.choice([_nearby(cfg["chunk_shape"], rng),
                                             [rng.choice([0, 1, 2, 2**20, 2**40, -1]) for _ in cfg["chunk_shape"]]])
        except (KeyError, TypeError):
            raise Skip from None
    elif field == "data_type":
        array["data_type"] = rng.choice(["int32", "uint8", "uint16", "float16", "float32", "float64", "int64",
                                         "bool", "complex64", "r16", "<f4", None, 4])
    elif field == "codecs":
        codecs = array.get("codecs")
        variants = [
            codecs[:-1] if isinstance(codecs, list) else None,
            list(reversed(codecs)) if isinstance(codecs, list) else None,
            [{"name": "bytes", "configuration": {"endian": "big"}}] + (codecs[1:] if isinstance(codecs, list) else []),
            [{"name": "bytes"}, {"name": "zstd"}, {"name": "crc32c"}],
            [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip"}, {"name": "crc32c"}],
            [{"name": "transpose", "configuration": {"order": [1, 0]}}] + (codecs or []),
            [{"name": "sharding_indexed", "configuration": {}}],
            [], None, "zstd", [1, 2, 3], [None, None, None],
        ]
        array["codecs"] = rng.choice(variants)
    elif field == "fill_value":
        array["fill_value"] = rng.choice(["NaN", "Infinity", "-Infinity", "0x7fc00000", 2**64, -1, None, [], 1.5])
    elif field == "chunk_key_encoding":
        array["chunk_key_encoding"] = rng.choice([{"name": "v2", "configuration": {"separator": "."}},
                                                  {"name": "default", "configuration": {"separator": "."}},
                                                  {"name": "default"}, None])
    elif field == "storage_transformers":
        array["storage_transformers"] = rng.choice([[{"name": "x"}], {}, "x"])
    else:
        array[field] = _nearby(array.get(field), rng)
    return meta


def m_zip_array_meta(data: bytes, rng: random.Random) -> bytes:
    return _edit_json_member(data, rng, _is_group_meta, _edit_array_meta)


def _edit_group_manifest(meta: dict, rng: random.Random) -> dict:
    """The manifest inside a group's attributes; half the time with its sha256 re-fixed."""
    try:
        info = meta["attributes"]["kvforge"]
        manifest = json.loads(info["manifest"])
    except (KeyError, TypeError, ValueError):
        raise Skip from None
    text = dumps_any(json_edit(manifest, rng))
    info["manifest"] = text
    if rng.random() < 0.5:
        info["manifest_sha256"] = sha256_text(text)
    return meta


def m_zip_manifest(data: bytes, rng: random.Random) -> bytes:
    return _edit_json_member(data, rng, _is_group_meta, _edit_group_manifest)


def m_zip_chunk_data(data: bytes, rng: random.Random) -> bytes:
    """Edit a chunk's decoded bytes, re-encode it (valid zstd and crc32c) and, mostly, re-fix the digests."""
    members = _members(data)
    i = _pick(members, rng, _is_chunk)
    name, raw = members[i]
    members[i] = (name, encode_chunk(byte_mutate(decode_chunk(raw), rng, INPLACE_MUTATORS)))
    mutated = build_zip(members)
    if rng.random() < 0.8:
        mutated = refix_zip_digest(mutated, name.split("/")[0]) or mutated
    return mutated


def m_zip_chunk_frame(data: bytes, rng: random.Random) -> bytes:
    """Edit a chunk's compressed frame, then fix only its crc32c: the zstd decoder sees the damage."""
    members = _members(data)
    i = _pick(members, rng, _is_chunk)
    name, raw = members[i]
    members[i] = (name, with_crc(byte_mutate(raw[:-4], rng)))
    return build_zip(members)


def m_zip_chunk_bomb(data: bytes, rng: random.Random) -> bytes:
    """Replace a chunk with a zstd frame of the wrong / no declared size, several frames, or a skippable frame."""
    members = _members(data)
    i = _pick(members, rng, _is_chunk)
    name, raw = members[i]
    decoded = decode_chunk(raw)
    op = rng.randrange(5)
    if op == 0:  # declares (and holds) far more than the array needs
        members[i] = (name, with_crc(zstd_bomb(rng.choice([len(decoded) + 1, 2 * len(decoded), 1 << 20, 1 << 30]))))
    elif op == 1:  # too little
        members[i] = (name, encode_chunk(decoded[:-1]))
    elif op == 2:  # the right bytes, but no content size in the frame header
        members[i] = (name, encode_chunk(decoded, content_size=False))
    elif op == 3:  # two frames back to back: the second is a bomb
        members[i] = (name, with_crc(raw[:-4] + zstd_bomb(1 << 30)))
    else:  # a skippable frame before the data
        members[i] = (name, with_crc(struct.pack("<II", 0x184D2A50, 8) + bytes(8) + raw[:-4]))
    return build_zip(members)


_ITEMSIZE = {"int32": 4, "uint8": 1, "uint16": 2, "float16": 2, "float32": 4}


def m_zip_claim(data: bytes, rng: random.Random) -> bytes:
    """A document that claims another, mostly much larger, shape with a valid manifest sha256.

    Half the time only the manifest, the lengths array's metadata and a lengths chunk
    of the claimed size (a tiny zstd frame) follow the claim; otherwise every array's
    metadata and chunk files follow it too (chunks declaring their full decoded size),
    so that the reader's decoded-size bound against the stored size is what decides.
    """
    members = _members(data)
    i = _pick(members, rng, _is_group_meta)
    name, payload = members[i]
    try:
        meta = json.loads(payload)
        info = meta["attributes"]["kvforge"]
        manifest = json.loads(info["manifest"])
        model, comp, storage = manifest["model"], manifest["compression"], manifest["storage"]
        arrays = meta["consolidated_metadata"]["metadata"]
        lengths_meta = arrays["lengths"]
    except (KeyError, TypeError, ValueError):
        raise Skip from None
    consistent = rng.random() < 0.5
    if consistent:  # sizes whose arrays can be written as a few chunks, up to tens of MiB decoded
        model.update(num_layers=rng.choice([1, 2]), num_kv_heads=rng.choice([1, 2, 3]),
                     head_dim=rng.choice([2, 4, 64, 4096]))
        manifest["document"]["logical_length"] = rng.choice([4, 6, 1000, 4096])
    else:
        for field, most in (("num_layers", 1024), ("num_kv_heads", 4096), ("head_dim", 4096)):
            if rng.random() < 0.6:  # the schema's maxima, or near them
                model[field] = rng.choice([most, most, most - 1, most // 4])
        if rng.random() < 0.5:
            manifest["document"]["logical_length"] = rng.choice([16777216, 65536, 7])
    L, H, D, T = model["num_layers"], model["num_kv_heads"], model["head_dim"], manifest["document"]["logical_length"]
    fill = rng.choice([0, 1, T])  # every head keeps this many entries
    N = L * H * fill
    comp.update(total_entries=L * H * T, kept_entries=N, keep_achieved=max(fill / T, 1e-9))
    text = dumps_any(manifest)
    info.update(manifest=text, manifest_sha256=sha256_text(text))
    group = name.split("/")[0]
    chunks = {"lengths": [("c/0/0", with_crc(zstd_bomb(4 * L * H, fill=struct.pack("<i", fill))))]}
    lengths_meta["shape"] = [L, H]
    lengths_meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": [L, H]}}
    if consistent:
        quant = storage.get("quantization")
        width = {"int8": D, "int4": D // 2}.get(quant, D)
        shapes = {"positions": [N], "keys": [N, width], "values": [N, width], "beta": [N], "value_scale": [N],
                  "value_min": [N], "key_scale": [L, H, D], "key_min": [L, H, D]}
        for array, shape in shapes.items():
            spec = arrays.get(array)
            if not isinstance(spec, dict) or spec.get("data_type") not in _ITEMSIZE:
                continue
            row = _ITEMSIZE[spec["data_type"]] * max(1, int(math.prod(shape[1:])))
            first = max(1, min(shape[0], (8 << 20) // row))
            chunk = [first] + [max(1, n) for n in shape[1:]]
            spec["shape"] = shape
            spec["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": chunk}}
            count = -(-shape[0] // first)
            if count > 16:
                raise Skip
            frame = with_crc(zstd_bomb(math.prod(chunk) * _ITEMSIZE[spec["data_type"]]))
            chunks[array] = [("/".join(["c", str(k)] + ["0"] * (len(shape) - 1)), frame) for k in range(count)]
    members[i] = (name, json.dumps(meta).encode())
    members = [(n, b) for n, b in members if not any(n.startswith(f"{group}/{a}/c/") for a in chunks)]
    members += [(f"{group}/{array}/{key}", frame) for array, items in chunks.items() for key, frame in items]
    return build_zip(members)


ATTACK_NAMES = ["../evil", "/abs/path", "golden-d/../../evil", "golden-d/../zarr.json", "C:\\evil", "c:/evil",
                "golden-d//zarr.json", "./zarr.json", "golden-d/./keys/c/0/0", "", "golden-d\\zarr.json"]


def m_zip_structure(data: bytes, rng: random.Random) -> bytes:
    """Zip-level attacks: escaping or absolute names, duplicates, compressed or missing or extra entries."""
    members = _members(data)
    op = rng.randrange(8)
    compressed = frozenset()
    if op == 0:  # an entry with an escaping / absolute name (a copy of a real member's bytes)
        name = rng.choice(ATTACK_NAMES)
        members.insert(rng.randrange(len(members) + 1), (name, rng.choice(members)[1]))
    elif op == 1:  # a real member renamed to an escaping name
        i = rng.randrange(len(members))
        members[i] = (rng.choice(ATTACK_NAMES), members[i][1])
    elif op == 2:  # a duplicate name, with other content (an appended rewrite)
        i = rng.randrange(len(members))
        j = rng.randrange(len(members))
        members.append((members[i][0], rng.choice([members[i][1], members[j][1], b""])))
    elif op == 3:  # one entry DEFLATE-compressed
        compressed = frozenset([rng.choice(members)[0]])
    elif op == 4:  # a missing entry
        del members[rng.randrange(len(members))]
    elif op == 5:  # a folder entry, or an extra file
        members.append((rng.choice(["golden-d/", "golden-d/keys/c/0/1", "junk", ".staging/x/zarr.json",
                                    "golden-z/zarr.json"]), rng.choice([b"", b"{}", members[0][1]])))
    elif op == 6:  # a group moved under another name
        groups = sorted({n.split("/")[0] for n, _ in members if "/" in n})
        src, dst = rng.choice(groups), rng.choice(groups + ["other", "x-0000", "x-" + "0" * 32])
        members = [(dst + n[len(src):] if n.startswith(src + "/") else n, b) for n, b in members]
    else:  # members in another order
        rng.shuffle(members)
    return build_zip(members, compressed)


def m_zip_cd_field(data: bytes, rng: random.Random) -> bytes:
    """Patch a size, offset or name length in a central-directory or local header (raw, crc not fixed)."""
    sig, fields = rng.choice([(b"PK\x01\x02", {20: 4, 24: 4, 28: 2, 42: 4}), (b"PK\x03\x04", {18: 4, 22: 4, 26: 2}),
                              (b"PK\x05\x06", {8: 2, 10: 2, 12: 4, 16: 4})])
    spots = [m.start() for m in re.finditer(re.escape(sig), data)]
    if not spots:
        raise Skip
    offset = rng.choice(sorted(fields))
    at, width = rng.choice(spots) + offset, fields[offset]
    value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
    return data[:at] + value.to_bytes(width, "little") + data[at + width:]


def refix_zip_digest(data: bytes, group: str) -> bytes | None:
    """Re-fix one document's tensors_sha256 (and manifest sha256) after a chunk edit, when its arrays decode."""
    from kvforge import artifact, library

    try:
        with tempfile.NamedTemporaryFile(suffix=".zarr.zip") as fh:
            fh.write(data)
            fh.flush()
            with library.open_library(fh.name) as lib:
                manifest, meta = lib.group(group)
                _, tensors, _ = lib.read_stored(manifest["document"]["id"])
        digest = artifact.tensor_digest(tensors)
    except Exception:  # refused, or broken in a way the real read below will report
        return None
    manifest["tensors_sha256"] = digest
    text = dumps_any(manifest)
    meta["attributes"]["kvforge"].update(manifest=text, manifest_sha256=sha256_text(text))
    members = [(n, json.dumps(meta, indent=2, ensure_ascii=False).encode() if n == f"{group}/zarr.json" else b)
               for n, b in zip_members(data)]
    return build_zip(members)


ZIP_MUTATORS = {"zip_member_bytes": m_zip_member_bytes, "zip_json": m_zip_json, "zip_array_meta": m_zip_array_meta,
                "zip_manifest": m_zip_manifest, "zip_chunk_data": m_zip_chunk_data,
                "zip_chunk_frame": m_zip_chunk_frame, "zip_chunk_bomb": m_zip_chunk_bomb,
                "zip_structure": m_zip_structure, "zip_cd_field": m_zip_cd_field, "zip_claim": m_zip_claim}


def mutators_for(kind: str) -> dict:
    return {**BYTE_MUTATORS, **(ZIP_MUTATORS if kind == "zip" else KV_MUTATORS)}


def mutate(data: bytes, kind: str, rng: random.Random) -> tuple[str, bytes]:
    """(mutator names joined by '+', mutated bytes): one mutator, and a second one a fifth of the time.

    Structure-aware mutators are picked twice as often as raw byte ones; one that does
    not apply (its input no longer parses) falls back to ``overwrite``. On an intact
    golden file every mutator applies without error (tests/test_fuzz.py checks it).
    """
    table = mutators_for(kind)
    structured = sorted(set(table) - set(BYTE_MUTATORS))
    names = []
    for _ in range(2 if rng.random() < 0.2 else 1):
        name = rng.choice(structured) if rng.random() < 2 / 3 else rng.choice(sorted(BYTE_MUTATORS))
        try:
            data = table[name](data, rng)
        except Exception:  # Skip, or a second mutator tripping over what the first one broke
            name, data = "overwrite", (m_overwrite(data, rng) if data else b"\0")
        names.append(name)
    return "+".join(names), data


# --------------------------------------------------------------------------- running the readers
def read_input(path: Path, kind: str) -> list[tuple[str, object]]:
    """Call the reader(s) on one input: [(call, result or exception)], exceptions caught, ``Hang`` not."""
    from kvforge import artifact, library

    def call(label, fn, *args):
        try:
            results.append((label, fn(*args)))
        except Exception as exc:
            results.append((label, exc))

    results: list[tuple[str, object]] = []
    if kind == "kv":
        call("read", artifact.read, path)
        return results
    call("list_ids", library.list_ids, path)
    ids = results[0][1]
    if isinstance(ids, list):
        for doc_id in ids:
            call(f"read[{doc_id!r}]" if isinstance(doc_id, str) else "read[?]", library.read, path, doc_id)
    call("read[None]", library.read, path, None)
    return results


def classify(results) -> tuple[str, list]:
    """('loaded' | 'refused' | 'unexpected', [(call, exception)] of the unexpected ones).

    The ``read[None]`` of a library is expected to be refused when it holds several
    documents, so only the other calls decide between loaded and refused.
    """
    from kvforge import artifact
    from kvforge.errors import KvforgeError

    bad, refused = [], False
    for label, value in results:
        if isinstance(value, KvforgeError) and _caused_by(value, MemoryError):
            bad.append((label, value))  # refused, but only after asking for more memory than there is
        elif isinstance(value, KvforgeError):
            refused = refused or label != "read[None]"
        elif isinstance(value, BaseException):
            bad.append((label, value))
        elif label == "list_ids":
            if not (isinstance(value, list) and all(isinstance(i, str) for i in value)):
                bad.append((label, TypeError(f"list_ids returned {value!r}")))
        elif not isinstance(value, artifact.Artifact):
            bad.append((label, TypeError(f"{label} returned {type(value).__name__}, not an Artifact")))
    return ("unexpected" if bad else "refused" if refused else "loaded"), bad


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class PeakRss:
    """Peak resident memory of this process since :meth:`reset`, in KiB.

    On Linux the high-water mark is reset through ``/proc/self/clear_refs``, so each
    input's own peak is seen, not hidden under an earlier one; elsewhere this falls
    back to ``ru_maxrss``, which only shows new all-time peaks.
    """

    def __init__(self):
        self.exact = Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def reset(self) -> None:
        if self.exact:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
                self.base = self._status("VmRSS")
                return
            except (OSError, KeyError):
                self.exact = False
        self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def growth(self) -> int:
        if self.exact:
            return max(0, self._status("VmHWM") - self.base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base)

    @staticmethod
    def total() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _on_alarm(signum, frame):
    raise Hang


def input_for(seed: int, index: int, sources: dict[str, bytes]) -> tuple[str, str, bytes]:
    """(golden name, mutator, bytes) of input ``index``: a function of (seed, index) only."""
    rng = random.Random(f"kvforge-fuzz/{seed}/{index}")
    kv_names = sorted(n for n in sources if kind_of(n) == "kv")
    zip_names = sorted(n for n in sources if kind_of(n) == "zip")
    golden = rng.choice(zip_names) if zip_names and rng.random() < 0.5 else rng.choice(kv_names)
    mutator, data = mutate(sources[golden], kind_of(golden), rng)
    return golden, mutator, data


MEMORY_FACTOR = 256  # bytes a reader may allocate per input byte, beyond MEMORY_SLACK
MEMORY_SLACK = 16 * 1024 * 1024


def memory_budget(size: int) -> int:
    """What reading a ``size``-byte input may allocate, in bytes.

    kvforge decodes at most 64x the stored bytes plus 1 MiB of a library document, and
    a .kv file holds its tensors raw; a few copies (decoded chunk, assembled array,
    tensors, dequantized floats) and allocator noise stay well inside this.
    """
    return MEMORY_FACTOR * size + MEMORY_SLACK


_PEAK = PeakRss()


def check_input(path: Path, kind: str, *, timeout: float = 10.0, trace: bool = False) -> dict:
    """Read one input under a time limit and a memory watch: outcome, unexpected calls, memory used.

    Unexpected: an exception other than ``KvforgeError``, no result within ``timeout``
    seconds, or a peak-RSS growth (and, with ``trace``, a tracemalloc peak: Python and
    numpy allocations; tracemalloc must be started) beyond :func:`memory_budget`.
    """
    size = path.stat().st_size
    if trace:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    _PEAK.reset()
    if timeout:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome, bad = classify(read_input(path, kind))
    except Hang:
        outcome, bad = "unexpected", [("read", TimeoutError(f"no result after {timeout} s (hang)"))]
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
    rss = _PEAK.growth() * 1024
    traced = tracemalloc.get_traced_memory()[1] - base if trace else 0
    for what, used in (("peak RSS grew by", rss), ("tracemalloc saw a peak of", traced)):
        if used > memory_budget(size):
            bad = bad + [("read", MemoryError(f"{what} {used / 2**20:.1f} MiB reading a {size} byte input, "
                                              f"beyond its budget of {memory_budget(size) / 2**20:.1f} MiB"))]
    return {"outcome": "unexpected" if bad else outcome, "bad": bad, "rss": rss, "traced": traced}


def run(n: int, seed: int = 0, *, start: int = 0, timeout: float = 10.0, trace: bool = False,
        out: Path | None = None, progress: bool = False) -> dict:
    """Fuzz inputs ``start .. start + n - 1`` of ``seed``; the summary as a dict (see ``render``).

    Each input is judged by :func:`check_input`. With ``out``, the bytes of every
    unexpected input go to ``out/unexpected/``.
    """
    sources = goldens()
    outcomes = Counter()
    by_mutator: dict[str, Counter] = defaultdict(Counter)
    by_golden: dict[str, Counter] = defaultdict(Counter)
    unexpected = []
    worst = {"rss": (0, None), "traced": (0, None), "ratio": (0.0, None)}
    tracing = trace and not tracemalloc.is_tracing()
    with tempfile.TemporaryDirectory(prefix="kvforge-fuzz-") as tmp:
        # warm up: imports, lazily built validators and first-use allocations are not the inputs' doing
        for name, data in sources.items():
            warm = Path(tmp) / f"warm{suffix_of(kind_of(name))}"
            warm.write_bytes(data)
            classify(read_input(warm, kind_of(name)))
        rss_start = PeakRss.total()
        old = signal.signal(signal.SIGALRM, _on_alarm) if timeout else None
        if tracing:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            for index in range(start, start + n):
                golden, mutator, data = input_for(seed, index, sources)
                kind = kind_of(golden)
                path = Path(tmp) / f"input{suffix_of(kind)}"
                path.write_bytes(data)
                result = check_input(path, kind, timeout=timeout, trace=trace)
                outcome, bad = result["outcome"], result["bad"]
                used = max(result["rss"], result["traced"])
                for key, value in (("rss", result["rss"]), ("traced", result["traced"]),
                                   ("ratio", used / max(1, len(data)))):
                    if value > worst[key][0]:
                        worst[key] = (value, index)
                outcomes[outcome] += 1
                by_golden[golden][outcome] += 1
                for part in set(mutator.split("+")):
                    by_mutator[part][outcome] += 1
                if bad:
                    unexpected.append({
                        "index": index, "golden": golden, "mutator": mutator, "bytes": len(data),
                        "calls": [{"call": label, "type": type(exc).__name__, "message": str(exc)[:500],
                                   "traceback": "".join(traceback.format_exception(exc))[-3000:]}
                                  for label, exc in bad]})
                    if out is not None:
                        folder = Path(out) / "unexpected"
                        folder.mkdir(parents=True, exist_ok=True)
                        (folder / f"{seed}-{index}{suffix_of(kind)}").write_bytes(data)
                if progress and (index - start + 1) % 1000 == 0:
                    print(f"  {index - start + 1}/{n} inputs, {outcomes['unexpected']} unexpected", file=sys.stderr)
        finally:
            if tracing:
                tracemalloc.stop()
            if timeout:
                signal.signal(signal.SIGALRM, old)
        seconds = time.perf_counter() - t0
    return {
        "n": n, "seed": seed, "start": start, "seconds": round(seconds, 2),
        "inputs_per_second": round(n / seconds, 1) if seconds else None,
        "outcomes": {k: outcomes[k] for k in ("loaded", "refused", "unexpected")},
        "by_mutator": {k: dict(v) for k, v in sorted(by_mutator.items())},
        "by_golden": {k: dict(v) for k, v in sorted(by_golden.items())},
        "rss_start_kib": rss_start, "rss_end_kib": PeakRss.total(), "exact_peak_rss": _PEAK.exact, "traced": trace,
        "max_rss_growth_bytes": worst["rss"][0], "max_rss_growth_index": worst["rss"][1],
        "max_traced_bytes": worst["traced"][0], "max_traced_index": worst["traced"][1],
        "max_bytes_per_input_byte": round(worst["ratio"][0], 1), "max_bytes_per_input_byte_index": worst["ratio"][1],
        "unexpected": unexpected,
    }


def render(summary: dict) -> str:
    o = summary["outcomes"]
    lines = [f"kvforge reader fuzz: {summary['n']} inputs (seed {summary['seed']}, from index {summary['start']}) "
             f"in {summary['seconds']} s ({summary['inputs_per_second']}/s)",
             f"  loaded {o['loaded']}, refused with KvforgeError {o['refused']}, UNEXPECTED {o['unexpected']}",
             f"  process peak RSS {summary['rss_start_kib'] // 1024} MiB after warm-up, "
             f"{summary['rss_end_kib'] // 1024} MiB at the end",
             f"  largest peak-RSS growth on one input: {summary['max_rss_growth_bytes'] / 2**20:.2f} MiB "
             f"(index {summary['max_rss_growth_index']}; {'exact' if summary['exact_peak_rss'] else 'ru_maxrss'})"
             + (f"; largest tracemalloc peak {summary['max_traced_bytes'] / 2**20:.2f} MiB "
                f"(index {summary['max_traced_index']})" if summary["traced"] else ""),
             f"  most bytes per input byte: {summary['max_bytes_per_input_byte']} "
             f"(index {summary['max_bytes_per_input_byte_index']}; budget {MEMORY_FACTOR} + "
             f"{MEMORY_SLACK // 2**20} MiB)",
             "", f"  {'mutator':<20} {'loaded':>7} {'refused':>8} {'unexpected':>11}"]
    for name, counts in summary["by_mutator"].items():
        lines.append(f"  {name:<20} {counts.get('loaded', 0):>7} {counts.get('refused', 0):>8} "
                     f"{counts.get('unexpected', 0):>11}")
    lines += ["", f"  {'golden':<40} {'loaded':>7} {'refused':>8} {'unexpected':>11}"]
    for name, counts in summary["by_golden"].items():
        lines.append(f"  {name:<40} {counts.get('loaded', 0):>7} {counts.get('refused', 0):>8} "
                     f"{counts.get('unexpected', 0):>11}")
    for record in summary["unexpected"][:20]:
        call = record["calls"][0]
        lines += ["", f"  UNEXPECTED index {record['index']}: {record['golden']} via {record['mutator']}: "
                      f"{call['call']} raised {call['type']}: {call['message'][:200]}"]
    if len(summary["unexpected"]) > 20:
        lines.append(f"  ... and {len(summary['unexpected']) - 20} more")
    return "\n".join(lines)


def replay(seed: int, index: int, out: Path | None, timeout: float = 10.0) -> int:
    """Run input ``index`` of ``seed`` alone: what each reader call gave, with tracebacks of unexpected ones."""
    golden, mutator, data = input_for(seed, index, goldens())
    kind = kind_of(golden)
    print(f"input {index} of seed {seed}: {golden} via {mutator}, {len(data)} bytes")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out or tmp) / f"fuzz-{seed}-{index}{suffix_of(kind)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        for label, value in read_input(path, kind):
            print(f"--- {label}: {type(value).__name__}" + (f": {value}" if isinstance(value, BaseException) else ""))
        old = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            result = check_input(path, kind, timeout=timeout)
        finally:
            signal.signal(signal.SIGALRM, old)
        for label, exc in result["bad"]:
            print(f"=== UNEXPECTED in {label}:")
            traceback.print_exception(exc)
        print(f"outcome: {result['outcome']}; peak RSS growth {result['rss'] / 2**20:.2f} MiB"
              + (f"; input kept at {path}" if out else ""))
    return 1 if result["bad"] else 0

