"""Writing a library folder: per-document atomic, safe beside other writers and after killed ones.

A document is staged in ``.staging/<group>.<pid>.<random>``, its chunks and array
metadata fsynced, its group ``zarr.json`` written last, then renamed into place
under an exclusive ``flock`` of the library folder (the old version, if any, moved
aside first and removed). A killed build therefore leaves only whole documents,
and two builds into one library never mix their files; what a dead writer left in
``.staging`` is removed by the next writer (its pid no longer runs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from ..artifact import prepare
from ..containers import atomic_write_bytes, canonical_json, fsync_dir, write_fsynced
from ..errors import FormatError, KvforgeError
from ..ragged import CompressedKV
from .arrays import encode_chunk, spec_for
from .flatten import flatten
from .layout import STAGING, check_root, group_name, root_json
from .stores import DirStore, read_json


def create(path: str | os.PathLike) -> Path:
    """Make ``path`` a library folder (idempotent, safe against a concurrent create)."""
    root = Path(path)
    if root.suffix == ".zip":
        raise FormatError(f"{root}: a zip library is read-only; build into a folder (lib.zarr), then "
                          "`kvforge convert lib.zarr lib.zarr.zip`")
    if root.exists() and not root.is_dir():
        raise FormatError(f"{root}: exists and is not a folder")
    if root.is_dir() and (root / "zarr.json").exists():
        check_root(read_json(DirStore(root), "zarr.json"), str(root))
        return root
    # hidden names are a concurrent creator's temporary file or staging folder, not foreign content
    if root.is_dir() and any(not p.name.startswith(".") and p.name != "zarr.json" for p in root.iterdir()):
        raise FormatError(f"{root}: a non-empty folder that is not a kvforge library; choose a new path")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "zarr.json", root_json())  # identical bytes if two creators race
    return root


def write_stored(path: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor],
                 build_entry: dict | None = None) -> int:
    """Write one document's group from an already checked manifest and stored tensors.

    Returns the bytes the document occupies (chunks and metadata).
    """
    root = create(path)
    doc_id = group_name(manifest["document"]["id"])
    L = manifest["model"]["num_layers"]
    arrays = flatten(tensors, L, manifest["storage"])
    _clean_stale(root / STAGING)
    stage = _make_stage(root, doc_id)
    try:
        consolidated, total = {}, 0
        for name in sorted(arrays):
            t = arrays[name].contiguous()
            spec = spec_for(t)
            adir = stage / name
            adir.mkdir()
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            flat = raw.numpy()
            for index, key in zip(spec.chunk_indices(), spec.chunk_keys()):
                sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, spec.chunks, spec.shape))
                chunk = np.zeros(spec.chunks, dtype=flat.dtype)
                part = flat[sl]
                chunk[tuple(slice(0, n) for n in part.shape)] = part
                data = encode_chunk(chunk.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes())
                cpath = adir.joinpath(*key.split("/"))
                cpath.parent.mkdir(parents=True, exist_ok=True)
                write_fsynced(cpath, data)
                total += len(data)
            meta = spec.to_json()
            raw_meta = json.dumps(meta, separators=(",", ":")).encode()
            write_fsynced(adir / "zarr.json", raw_meta)
            total += len(raw_meta)
            consolidated[name] = meta
        text = canonical_json(manifest)
        info = {"manifest": text, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
        if build_entry is not None:
            info["build"] = build_entry
        group = {"zarr_format": 3, "node_type": "group", "attributes": {"kvforge": info},
                 "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": consolidated}}
        raw_group = json.dumps(group, separators=(",", ":"), ensure_ascii=False).encode()
        write_fsynced(stage / "zarr.json", raw_group)
        total += len(raw_group)
        fsync_dir(stage)
        _swap_in(root, stage, doc_id)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return total


def write(path: str | os.PathLike, manifest: dict, kv: CompressedKV, build_entry: dict | None = None) -> int:
    """Check, quantize (per the manifest's storage) and write one document into a library folder."""
    manifest, tensors = prepare(manifest, kv, f"{path}:{manifest['document']['id']}")
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
