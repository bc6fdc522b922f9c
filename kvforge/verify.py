"""``kvforge verify``: check artifacts and libraries end to end, document by document.

Reads every document as the runtime would, with every check on (structure,
schema, chunk crc32c, tensor digest); one failure does not stop the others.
No model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from . import artifact as _artifact
from . import zarr_store
from .errors import KvforgeError


def verify_paths(paths) -> list[dict]:
    """One result per document: {path, doc, ok, error, bytes}."""
    results = []
    for raw in paths:
        path = Path(raw)
        if zarr_store.is_library(path):
            try:
                checked = zarr_store.check_each(path)
            except KvforgeError as exc:
                results.append(_result(str(path), None, exc))
                continue
            for group, outcome in checked:
                if isinstance(outcome, KvforgeError):  # a plain group name is the document id
                    results.append(_result(f"{path}:{group}", None if group.startswith("x-") else group, outcome))
                else:
                    results.append(_ok(f"{path}:{group}", outcome))
        elif path.is_dir():
            files = sorted(path.glob("*.kv"))
            if not files:
                results.append(_result(str(path), None, KvforgeError(f"{path}: no .kv files and not a library")))
            for f in files:
                results.append(_check(str(f), None, lambda f=f: _artifact.read(f, verify=True)))
        else:
            results.append(_check(str(path), None, lambda p=path: _artifact.read(p, verify=True)))
    return results


def _check(where: str, doc_id, load) -> dict:
    try:
        art = load()
    except KvforgeError as exc:
        return _result(where, doc_id, exc)
    return _ok(where, art)


def _ok(where: str, art) -> dict:
    return {"path": where, "doc": art.manifest["document"]["id"], "ok": True, "error": None,
            "bytes": art.file_bytes, "version": art.manifest["version"]}


def _result(where: str, doc_id, exc: Exception) -> dict:
    return {"path": where, "doc": doc_id, "ok": False, "error": str(exc), "bytes": None, "version": None}


__all__ = ["verify_paths"]
