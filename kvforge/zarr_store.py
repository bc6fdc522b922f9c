"""The zarr v3 library container: many artifacts in one store (spec: ``formats/kvforge-library-v1.md``).

A library is a zarr v3 hierarchy, a folder (``lib.zarr``) or a zip of one
(``lib.zarr.zip``, for shipping). Each document is a group holding the same
manifest and the same stored tensors as its ``.kv`` twin, flattened over layers:

    lib.zarr/zarr.json                root group; attributes.kvforge = {format, version}
    lib.zarr/<doc-id>/zarr.json       group: the manifest, consolidated metadata of its arrays
    lib.zarr/<doc-id>/<array>/...     lengths, positions, keys, values [, scales] [, beta]

This module is a small, strict zarr v3 reader and writer of exactly that subset
(regular chunk grid, ``bytes`` + ``zstd`` + ``crc32c`` codecs, a fixed dtype
allow-list), so that a hostile store is refused before anything is allocated
for it; zarr-python reads what it writes (tested). Writes are per-document
atomic: a document is staged in ``.staging/`` and renamed into place, its
``zarr.json`` written last, so a killed build leaves only whole documents and
two builds into one library never mix their files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from . import artifact as _artifact
from .errors import FormatError, IntegrityError, KvforgeError, UnsupportedVersionError
from .ragged import CompressedKV

LIBRARY_FORMAT = "kvforge-library"
LIBRARY_VERSION = "1.0.0"
READABLE_MAJORS = (1,)
STAGING = ".staging"
CHUNK_BYTES = 4 * 1024 * 1024  # decoded bytes per chunk the writer aims at
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # the reader refuses larger decoded chunks
MAX_META_BYTES = 16 * 1024 * 1024  # zarr.json documents
MAX_EXPANSION = 64  # decoded bytes of a document per stored byte, beyond SLACK
SLACK = 1024 * 1024
ZSTD_LEVEL = 3
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

# zarr v3 data types the reader accepts, and the torch dtype each holds (bfloat16 travels as uint16 bits)
_DTYPES = {"int32": (np.int32, torch.int32), "uint8": (np.uint8, torch.uint8), "uint16": (np.uint16, torch.bfloat16),
           "float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}
_ZARR_DTYPE = {torch.int32: "int32", torch.uint8: "uint8", torch.bfloat16: "uint16", torch.float16: "float16",
               torch.float32: "float32"}
# arrays flattened over layers along their first axis, and arrays stacked per layer
_FLAT = ("positions", "keys", "values", "value_scale", "beta")
_STACKED = ("key_scale", "key_min")


def is_library(path: str | os.PathLike) -> bool:
    """True for a zarr library folder (holding ``zarr.json``) or a ``.zip`` file."""
    p = Path(path)
    return (p.is_dir() and (p / "zarr.json").is_file()) or (p.suffix == ".zip" and not p.is_dir())


def group_name(doc_id: str) -> str:
    """The group a document lives in: its id when that is a plain name, else ``x-`` and a hash of it."""
    if not isinstance(doc_id, str) or not doc_id:
        raise FormatError(f"a document id must be a non-empty string, got {doc_id!r}")
    if _ID.match(doc_id) and not doc_id.startswith("x-"):
        return doc_id
    return "x-" + hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# --------------------------------------------------------------------------- stores
class _Store:
    """Read-only key/value view of a library: keys are '/'-separated paths relative to its root."""

    where: str

    def get(self, key: str, limit: int) -> bytes:
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def children(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DirStore(_Store):
    def __init__(self, root: Path):
        self.root, self.where = root, str(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def size(self, key):
        try:
            st = self._path(key).stat()
        except OSError:
            return None
        return st.st_size if os.path.isfile(self._path(key)) else None

    def get(self, key, limit):
        path = self._path(key)
        try:
            # non-blocking open and a regular-file check: a FIFO or a device planted in a library cannot hang us
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise FormatError(f"{self.where}: {key} is not a regular file; refused")
                data = fh.read(limit + 1)
        except FileNotFoundError:
            raise FormatError(f"{self.where}: {key} is missing; the library is incomplete") from None
        except OSError as exc:
            raise FormatError(f"{self.where}: cannot read {key}: {exc.strerror or exc}") from exc
        if len(data) > limit:
            raise FormatError(f"{self.where}: {key} is larger than the {limit} bytes its metadata allows")
        return data

    def children(self):
        try:
            return sorted(p.name for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").is_file())
        except OSError as exc:
            raise FormatError(f"{self.where}: cannot list: {exc.strerror or exc}") from exc


class _ZipStore(_Store):
    """A zip of a library folder: stored (uncompressed) entries, no duplicates, no path tricks."""

    def __init__(self, path: Path):
        self.where = str(path)
        try:
            size = path.stat().st_size
            self.zf = zipfile.ZipFile(path)
            infos = self.zf.infolist()
        except FileNotFoundError:
            raise FormatError(f"{path}: no such library") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise FormatError(f"{path}: not a readable zip library ({exc})") from exc
        self.entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if (name.startswith("/") or "\\" in name or ".." in parts or ":" in name or not name
                    or any(p in (".", "") for p in name.rstrip("/").split("/"))):
                raise FormatError(f"{path}: zip entry {name!r} has an absolute or escaping path; refused")
            if name in self.entries:
                raise FormatError(f"{path}: zip entry {name!r} appears twice (an appended rewrite?); refused")
            if info.compress_type != zipfile.ZIP_STORED and not name.endswith("/"):
                raise FormatError(f"{path}: zip entry {name!r} is compressed; kvforge libraries store entries "
                                  "uncompressed (their chunks are zstd already). Repack with `kvforge convert`")
            if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
                raise FormatError(f"{path}: zip entry {name!r} claims {info.compress_size} stored bytes for "
                                  f"{info.file_size} (or more than the {size}-byte file holds); the zip is corrupt")
            self.entries[name] = info

    def size(self, key):
        info = self.entries.get(key)
        return None if info is None else info.file_size

    def get(self, key, limit):
        info = self.entries.get(key)
        if info is None:
            raise FormatError(f"{self.where}: {key} is missing; the library is incomplete")
        if info.file_size > limit:
            raise FormatError(f"{self.where}: {key} is larger than the {limit} bytes its metadata allows")
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise IntegrityError(f"{self.where}: zip entry {key} is corrupt ({exc})") from exc

    def children(self):
        names = {k.split("/")[0] for k in self.entries if k.count("/") >= 1}
        return sorted(n for n in names if not n.startswith(".") and f"{n}/zarr.json" in self.entries)

    def close(self):
        self.zf.close()


def _open_store(path: str | os.PathLike) -> _Store:
    p = Path(path)
    if p.is_dir():
        store: _Store = _DirStore(p)
    elif p.suffix == ".zip":
        store = _ZipStore(p)
    elif not p.exists():
        raise FormatError(f"{p}: no such library")
    else:
        raise FormatError(f"{p}: not a kvforge library (a .zarr folder or a .zarr.zip file)")
    try:
        _check_root(_json(store, "zarr.json"), store.where)
    except BaseException:
        store.close()
        raise
    return store


def _json(store: _Store, key: str) -> dict:
    raw = store.get(key, MAX_META_BYTES)
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{store.where}: {key} is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{store.where}: {key} is not a JSON object")
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def _check_root(meta: dict, where: str) -> None:
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise FormatError(f"{where}: zarr.json: expected a zarr v3 group (zarr_format 3), found "
                          f"zarr_format {meta.get('zarr_format')!r}, node_type {meta.get('node_type')!r}")
    info = (meta.get("attributes") or {}).get("kvforge") if isinstance(meta.get("attributes"), dict) else None
    if not isinstance(info, dict) or info.get("format") != LIBRARY_FORMAT:
        raise FormatError(f"{where}: a zarr group, but not a kvforge library (attributes.kvforge.format is not "
                          f"{LIBRARY_FORMAT!r})")
    version = str(info.get("version"))
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise FormatError(f"{where}: library version: expected MAJOR.MINOR.PATCH, found {version!r}")
    if int(parts[0]) not in READABLE_MAJORS:
        raise UnsupportedVersionError(f"{where}: library format version {version} is not supported; this kvforge "
                                      f"reads {', '.join(f'{m}.x' for m in READABLE_MAJORS)}. Upgrade kvforge")


# --------------------------------------------------------------------------- reading
@dataclass
class Library:
    """An open library: list its documents, read one without touching the others."""

    path: str
    store: _Store

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.store.close()

    def ids(self) -> list[str]:
        """Document ids, sorted (reads a manifest only for ids that are not plain names)."""
        return sorted(self._groups())

    def _groups(self) -> dict[str, str]:
        found = {}
        for name in self.store.children():
            found[self.group(name)[0]["document"]["id"] if name.startswith("x-") else name] = name
        return found

    def resolve(self, doc_id: str | None) -> str:
        """The document to read: the one named, or the only one."""
        if doc_id is None:
            ids = self.ids()
            if len(ids) == 1:
                return ids[0]
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            raise KvforgeError(f"{self.path} holds {len(ids)} documents; name one with --doc ID "
                               f"({shown or 'none built yet'})")
        if self.store.size(f"{group_name(doc_id)}/zarr.json") is None:
            ids = self.ids()
            raise KvforgeError(f"{self.path}: no document {doc_id!r}; it holds {', '.join(ids[:10]) or 'none'}")
        return doc_id

    def group(self, name: str) -> tuple[dict, dict]:
        """(checked manifest, group metadata) of the group ``name``."""
        where = f"{self.path}:{name}"
        meta = _json(self.store, f"{name}/zarr.json")
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise FormatError(f"{where}: zarr.json is not a zarr v3 group")
        attrs = meta.get("attributes")
        info = attrs.get("kvforge") if isinstance(attrs, dict) else None
        if not isinstance(info, dict):
            raise FormatError(f"{where}: not a kvforge document group (no attributes.kvforge)")
        manifest = _artifact.parse_manifest(info.get("manifest"), info.get("manifest_sha256"), where)
        if group_name(manifest["document"]["id"]) != name:
            raise FormatError(f"{where}: the group's manifest names document {manifest['document']['id']!r}, "
                              f"which belongs in group {group_name(manifest['document']['id'])!r}")
        return manifest, meta

    def manifest(self, doc_id: str) -> dict:
        return self.group(group_name(doc_id))[0]

    def manifest_and_build(self, doc_id: str) -> tuple[dict, dict | None]:
        """The checked manifest and what the build recorded (informative; not covered by the digest)."""
        manifest, meta = self.group(group_name(doc_id))
        entry = meta["attributes"]["kvforge"].get("build")
        return manifest, entry if isinstance(entry, dict) else None

    def read_stored(self, doc_id: str) -> tuple[dict, dict[str, torch.Tensor], int]:
        """The manifest and the stored tensors, named as in a ``.kv`` file, and the document's bytes."""
        where = f"{self.path}:{doc_id}"
        group = group_name(doc_id)
        manifest, meta = self.group(group)
        consolidated = meta.get("consolidated_metadata")
        arrays_meta = consolidated.get("metadata") if isinstance(consolidated, dict) else None
        if not isinstance(arrays_meta, dict):
            raise FormatError(f"{where}: zarr.json has no inline consolidated_metadata")
        m, storage = manifest["model"], manifest["storage"]
        L, H, D = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        expected = _array_names(storage)
        if set(arrays_meta) != set(expected):
            raise FormatError(f"{where}: arrays {sorted(arrays_meta)[:8]} do not match the manifest's "
                              f"{sorted(expected)}")
        specs = {name: _ArraySpec.parse(arrays_meta[name], f"{where}/{name}") for name in expected}
        # lengths is read first (it sizes everything else): bound it by its own stored bytes
        spec = specs["lengths"]
        stored_lengths = sum(self.store.size(f"{group}/lengths/{key}") or 0 for key in spec.chunk_keys())
        if spec.nbytes > MAX_EXPANSION * stored_lengths + SLACK:
            raise FormatError(f"{where}/lengths: {spec.nbytes} decoded bytes from {stored_lengths} stored bytes is "
                              f"beyond the {MAX_EXPANSION}x expansion kvforge accepts; refused as a decompression bomb")
        lengths = self._read_array(group, "lengths", spec, expected["lengths"](L, H, D, 0, 0))
        if bool((lengths < 0).any()) or bool((lengths > manifest["document"]["logical_length"]).any()):
            raise FormatError(f"{where}: lengths out of [0, logical_length]")
        N = int(lengths.sum())
        width = D * _quant_bits(storage) // 8
        shapes = {name: shape(L, H, D, N, width) for name, shape in expected.items()}
        # bound what the document may make us allocate by what it occupies on disk
        stored = 0
        for array, spec in specs.items():
            if spec.shape != shapes[array]:
                raise FormatError(f"{where}/{array}: shape {list(spec.shape)}, the manifest and lengths imply "
                                  f"{list(shapes[array])}")
            for key in spec.chunk_keys():
                size = self.store.size(f"{group}/{array}/{key}")
                if size is None:
                    raise FormatError(f"{where}/{array}: chunk {key} is missing; the library is incomplete")
                stored += size
        decoded = sum(spec.nbytes for spec in specs.values())
        metadata = sum(self.store.size(k) or 0 for k in [f"{group}/zarr.json"] +
                       [f"{group}/{array}/zarr.json" for array in specs])
        if decoded > MAX_EXPANSION * stored + SLACK:
            raise FormatError(f"{where}: {decoded} decoded bytes from {stored} stored bytes is beyond the "
                              f"{MAX_EXPANSION}x expansion kvforge accepts; refused as a decompression bomb")
        arrays = {"lengths": lengths}
        for array, spec in specs.items():
            if array != "lengths":
                arrays[array] = self._read_array(group, array, spec, shapes[array])
        return manifest, _unflatten(arrays, lengths, L), stored + metadata

    def _read_array(self, group: str, name: str, spec: "_ArraySpec", shape: tuple) -> torch.Tensor:
        where = f"{self.path}:{group}/{name}"
        if spec.shape != tuple(shape):
            raise FormatError(f"{where}: shape {list(spec.shape)}, expected {list(shape)}")
        want = _ARRAY_DTYPES.get(name)
        if want is not None and spec.data_type not in want:
            raise FormatError(f"{where}: data type {spec.data_type}, expected one of {sorted(want)}")
        out = np.empty(spec.shape, dtype=spec.np_dtype)
        for index, key in zip(spec.chunk_indices(), spec.chunk_keys()):
            raw = self.store.get(f"{group}/{name}/{key}", spec.chunk_nbytes + 1024 + 4)
            data = spec.decode(raw, f"{where}/{key}")
            chunk = np.frombuffer(data, dtype=spec.np_dtype).reshape(spec.chunks)
            sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, spec.chunks, spec.shape))
            out[sl] = chunk[tuple(slice(0, s.stop - s.start) for s in sl)]
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if spec.data_type == "uint16" else t

    def read(self, doc_id: str, *, verify: bool = True) -> _artifact.Artifact:
        manifest, tensors, stored = self.read_stored(doc_id)
        kv = _artifact.from_tensors(tensors, manifest, f"{self.path}:{doc_id}", verify=verify)
        return _artifact.Artifact(manifest=manifest, kv=kv, path=f"{self.path}:{doc_id}", file_bytes=stored)


def open_library(path: str | os.PathLike) -> Library:
    return Library(path=str(path), store=_open_store(path))


def _guarded(fn):
    return _artifact.guard(fn, "library")


@_guarded
def read(path: str | os.PathLike, doc_id: str | None = None, *, verify: bool = True) -> _artifact.Artifact:
    """Load one document of a library (folder or zip) without reading the others."""
    with open_library(path) as lib:
        return lib.read(lib.resolve(doc_id), verify=verify)


@_guarded
def read_manifest(path: str | os.PathLike, doc_id: str | None = None) -> tuple[str, dict]:
    """(document id, checked manifest) of one document: cheap, reads one zarr.json."""
    with open_library(path) as lib:
        doc_id = lib.resolve(doc_id)
        return doc_id, lib.manifest(doc_id)


@_guarded
def read_stored(path: str | os.PathLike, doc_id: str) -> tuple[dict, dict[str, torch.Tensor], int]:
    with open_library(path) as lib:
        return lib.read_stored(lib.resolve(doc_id))


def check_each(path: str | os.PathLike) -> list[tuple[str, object]]:
    """(group, loaded Artifact or the KvforgeError it raised) for every document group, all checks on.

    Walks groups rather than ids, so that a document whose manifest is damaged is reported, not hidden.
    """
    results = []
    with _guarded(open_library)(path) as lib:
        for name in _guarded(lambda p: lib.store.children())(path):
            def one(p, name=name):
                return lib.read(lib.group(name)[0]["document"]["id"], verify=True)
            try:
                results.append((name, _guarded(one)(path)))
            except KvforgeError as exc:
                results.append((name, exc))
    return results


@_guarded
def list_ids(path: str | os.PathLike) -> list[str]:
    with open_library(path) as lib:
        return lib.ids()


# --------------------------------------------------------------------------- array metadata
_CODECS_WRITTEN = [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}},
                   {"name": "crc32c"}]
_ARRAY_DTYPES = {"lengths": {"int32"}, "positions": {"int32"}, "key_scale": {"float16"}, "key_min": {"float16"},
                 "value_scale": {"float16"}, "beta": {"float32"}}


def _quant_bits(storage: dict) -> int:
    return {"none": 16, "int8": 8, "int4": 4}[storage["quantization"]]


def _array_names(storage: dict) -> dict:
    """{array name: shape(L, H, D, N, width)} of a document group."""
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


@dataclass
class _ArraySpec:
    """A zarr v3 array's metadata, restricted to what kvforge writes."""

    shape: tuple
    chunks: tuple
    data_type: str
    codecs: list

    @property
    def np_dtype(self):
        return np.dtype(_DTYPES[self.data_type][0]).newbyteorder("<")

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
    def parse(meta, where: str) -> "_ArraySpec":
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: array metadata is not an object")
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise FormatError(f"{where}: not a zarr v3 array")
        dtype = meta.get("data_type")
        if dtype not in _DTYPES:
            raise FormatError(f"{where}: data_type {dtype!r} is not one kvforge reads ({sorted(_DTYPES)})")
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
        if not _codecs_ok(codecs, np.dtype(_DTYPES[dtype][0]).itemsize):
            raise FormatError(f"{where}: codecs {json.dumps(codecs)[:200]} are not bytes(little) + zstd + crc32c")
        spec = _ArraySpec(shape=tuple(shape), chunks=tuple(chunks), data_type=dtype, codecs=codecs)
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


# --------------------------------------------------------------------------- flatten / unflatten
def _flatten(tensors: dict[str, torch.Tensor], L: int, storage: dict) -> dict[str, torch.Tensor]:
    """Stored .kv tensors -> the document's arrays (per-layer tensors concatenated, or stacked)."""
    arrays = {"lengths": tensors["lengths"]}
    for name in _array_names(storage):
        if name in _FLAT:
            arrays[name] = torch.cat([tensors[f"layer.{l}.{name}"] for l in range(L)])
        elif name in _STACKED:
            arrays[name] = torch.stack([tensors[f"layer.{l}.{name}"] for l in range(L)])
    return arrays


def _unflatten(arrays: dict[str, torch.Tensor], lengths: torch.Tensor, L: int) -> dict[str, torch.Tensor]:
    sizes = [int(n) for n in lengths.sum(1).tolist()]
    tensors = {"lengths": lengths}
    for name, t in arrays.items():
        if name in _FLAT:
            for l, part in enumerate(torch.split(t, sizes)):
                tensors[f"layer.{l}.{name}"] = part.contiguous()
        elif name in _STACKED:
            for l in range(L):
                tensors[f"layer.{l}.{name}"] = t[l].contiguous()
    return tensors


# --------------------------------------------------------------------------- writing
def _spec_for(t: torch.Tensor) -> _ArraySpec:
    dtype = _ZARR_DTYPE[t.dtype]
    itemsize = t.element_size()
    row = itemsize * int(np.prod(t.shape[1:], dtype=np.int64)) if t.dim() > 1 else itemsize
    first = max(1, min(int(t.shape[0]) if t.dim() else 1, CHUNK_BYTES // max(1, row)))
    codecs = json.loads(json.dumps(_CODECS_WRITTEN))
    return _ArraySpec(shape=tuple(t.shape), chunks=(first, *t.shape[1:]) if t.dim() else (), data_type=dtype,
                      codecs=codecs)


def _encode_chunk(data: bytes) -> bytes:
    import google_crc32c
    import zstandard

    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    return body + google_crc32c.value(body).to_bytes(4, "little")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _root_json() -> bytes:
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {"kvforge": {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION}}}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def create(path: str | os.PathLike) -> Path:
    """Make ``path`` a library folder (idempotent, safe against a concurrent create)."""
    root = Path(path)
    if root.suffix == ".zip":
        raise FormatError(f"{root}: a zip library is read-only; build into a folder (lib.zarr), then "
                          "`kvforge convert lib.zarr lib.zarr.zip`")
    if root.exists() and not root.is_dir():
        raise FormatError(f"{root}: exists and is not a folder")
    if root.is_dir() and (root / "zarr.json").exists():
        _check_root(_json(_DirStore(root), "zarr.json"), str(root))
        return root
    # hidden names are a concurrent creator's temporary file or staging folder, not foreign content
    if root.is_dir() and any(not p.name.startswith(".") and p.name != "zarr.json" for p in root.iterdir()):
        raise FormatError(f"{root}: a non-empty folder that is not a kvforge library; choose a new path")
    root.mkdir(parents=True, exist_ok=True)
    _artifact.atomic_write_bytes(root / "zarr.json", _root_json())  # identical bytes if two creators race
    return root


def write_stored(path: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor],
                 build_entry: dict | None = None) -> int:
    """Write one document's group from an already checked manifest and stored tensors.

    Returns the bytes the document occupies (chunks and metadata).
    """
    root = create(path)
    doc_id = group_name(manifest["document"]["id"])
    L = manifest["model"]["num_layers"]
    arrays = _flatten(tensors, L, manifest["storage"])
    _clean_stale(root / STAGING)
    stage = _make_stage(root, doc_id)
    try:
        consolidated, total = {}, 0
        for name in sorted(arrays):
            t = arrays[name].contiguous()
            spec = _spec_for(t)
            adir = stage / name
            adir.mkdir()
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            flat = raw.numpy()
            for index, key in zip(spec.chunk_indices(), spec.chunk_keys()):
                sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, spec.chunks, spec.shape))
                chunk = np.zeros(spec.chunks, dtype=flat.dtype)
                part = flat[sl]
                chunk[tuple(slice(0, n) for n in part.shape)] = part
                data = _encode_chunk(chunk.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes())
                cpath = adir.joinpath(*key.split("/"))
                cpath.parent.mkdir(parents=True, exist_ok=True)
                _fsync_write(cpath, data)
                total += len(data)
            meta = spec.to_json()
            raw_meta = json.dumps(meta, separators=(",", ":")).encode()
            _fsync_write(adir / "zarr.json", raw_meta)
            total += len(raw_meta)
            consolidated[name] = meta
        text = _artifact.canonical_json(manifest)
        info = {"manifest": text, "manifest_sha256": _sha256(text)}
        if build_entry is not None:
            info["build"] = build_entry
        group = {"zarr_format": 3, "node_type": "group", "attributes": {"kvforge": info},
                 "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": consolidated}}
        raw_group = json.dumps(group, separators=(",", ":"), ensure_ascii=False).encode()
        _fsync_write(stage / "zarr.json", raw_group)
        total += len(raw_group)
        _fsync_dir(stage)
        _swap_in(root, stage, doc_id)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return total


def write(path: str | os.PathLike, manifest: dict, kv: CompressedKV, build_entry: dict | None = None) -> int:
    """Check, quantize (per the manifest's storage) and write one document into a library folder."""
    manifest, tensors = _artifact.prepare(manifest, kv, f"{path}:{manifest['document']['id']}")
    return write_stored(path, manifest, tensors, build_entry)


def _swap_in(root: Path, stage: Path, doc_id: str) -> None:
    """Rename the staged group into place under the library lock (the old version, if any, goes away)."""
    target = root / doc_id
    fd = os.open(root, os.O_RDONLY)  # the lock is the library folder itself: no lock file to litter
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        trash = None
        if target.exists():
            trash = root / STAGING / f"{doc_id}.{os.getpid()}.{secrets.token_hex(4)}.old"
            os.rename(target, trash)
        os.rename(stage, target)
        os.fsync(fd)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        try:
            (root / STAGING).rmdir()  # only when no other writer is staging
        except OSError:
            pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _make_stage(root: Path, doc_id: str) -> Path:
    """A fresh staging folder; ``.staging`` itself may vanish under a concurrent writer's cleanup."""
    for _ in range(20):
        try:
            (root / STAGING).mkdir(exist_ok=True)
            stage = root / STAGING / f"{doc_id}.{os.getpid()}.{secrets.token_hex(4)}"
            stage.mkdir()
            return stage
        except FileNotFoundError:
            continue
    raise KvforgeError(f"{root}: cannot create a staging folder in {root / STAGING}")


def _clean_stale(staging: Path) -> None:
    """Remove what killed writers left in ``.staging`` (their process is gone)."""
    try:
        found = list(staging.iterdir())
    except OSError:
        return
    for p in found:
        parts = p.name.removesuffix(".old").rsplit(".", 2)  # <group>.<pid>.<random>[.old]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pack(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Zip a library folder for shipping: stored entries in sorted order, written atomically."""
    import io

    lib = open_library(src)
    root = Path(src)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ["zarr.json"] + [k for group in lib.store.children() for k in _doc_files(root, group)]:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, (root / name).read_bytes())
    lib.store.close()
    data = buf.getvalue()
    _artifact.atomic_write_bytes(Path(dst), data)
    return len(data)


def _doc_files(root: Path, doc_id: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / doc_id).rglob("*") if p.is_file())
