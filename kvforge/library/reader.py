"""Reading a library: list its documents, read one without touching the others, check them all.

Everything read is bounded by what the store holds: a document may not make the
reader allocate more than ``MAX_EXPANSION`` decoded bytes per stored byte (plus
``SLACK``), so a decompression bomb is refused before it is decoded. Every entry
point is guarded: a hostile library raises a :class:`~kvforge.errors.FormatError`,
never a stray exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..artifact import Artifact, from_tensors, stored_codes
from ..containers import guard
from ..errors import FormatError, KvforgeError
from ..manifest import parse_manifest
from .arrays import ARRAY_DTYPES, ArraySpec, array_names, code_width
from .flatten import unflatten
from .layout import group_name
from .stores import Store, open_store, read_json

MAX_EXPANSION = 64  # decoded bytes of a document per stored byte, beyond SLACK
SLACK = 1024 * 1024


@dataclass
class Library:
    """An open library: list its documents, read one without touching the others."""

    path: str
    store: Store

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
        meta = read_json(self.store, f"{name}/zarr.json")
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise FormatError(f"{where}: zarr.json is not a zarr v3 group")
        attrs = meta.get("attributes")
        info = attrs.get("kvforge") if isinstance(attrs, dict) else None
        if not isinstance(info, dict):
            raise FormatError(f"{where}: not a kvforge document group (no attributes.kvforge)")
        manifest = parse_manifest(info.get("manifest"), info.get("manifest_sha256"), where)
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
        expected = array_names(storage)
        if set(arrays_meta) != set(expected):
            raise FormatError(f"{where}: arrays {sorted(arrays_meta)[:8]} do not match the manifest's "
                              f"{sorted(expected)}")
        specs = {name: ArraySpec.parse(arrays_meta[name], f"{where}/{name}") for name in expected}
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
        width = code_width(storage, D)
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
        return manifest, unflatten(arrays, lengths, L), stored + metadata

    def _read_array(self, group: str, name: str, spec: "ArraySpec", shape: tuple) -> torch.Tensor:
        where = f"{self.path}:{group}/{name}"
        if spec.shape != tuple(shape):
            raise FormatError(f"{where}: shape {list(spec.shape)}, expected {list(shape)}")
        want = ARRAY_DTYPES.get(name)
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

    def read(self, doc_id: str, *, verify: bool = True, keep_codes: bool = False) -> Artifact:
        manifest, tensors, stored = self.read_stored(doc_id)
        kv = from_tensors(tensors, manifest, f"{self.path}:{doc_id}", verify=verify)
        return Artifact(manifest=manifest, kv=kv, path=f"{self.path}:{doc_id}", file_bytes=stored,
                        codes=stored_codes(tensors, manifest) if keep_codes else None)


def open_library(path: str | os.PathLike) -> Library:
    return Library(path=str(path), store=open_store(path))


def _guarded(fn):
    return guard(fn, "library")


@_guarded
def read(path: str | os.PathLike, doc_id: str | None = None, *, verify: bool = True,
         keep_codes: bool = False) -> Artifact:
    """Load one document of a library (folder or zip) without reading the others (``keep_codes``: see
    :func:`kvforge.artifact.read`)."""
    with open_library(path) as lib:
        return lib.read(lib.resolve(doc_id), verify=verify, keep_codes=keep_codes)


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
