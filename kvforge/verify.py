"""``kvforge verify`` and ``kvforge inspect``: read artifacts and libraries, check them, load no model.

``verify_paths`` reads every document as the runtime would, with every check on
(structure, schema, chunk crc32c, tensor digest); one failure does not stop the
others. ``describe`` is what ``inspect`` shows of one artifact or library.
"""

from __future__ import annotations

from pathlib import Path

from . import artifact as _artifact
from . import library
from .errors import KvforgeError


def verify_paths(paths) -> list[dict]:
    """One result per document: {path, doc, ok, error, bytes}."""
    results = []
    for raw in paths:
        path = Path(raw)
        if library.is_library(path):
            try:
                checked = library.check_each(path)
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


def describe(path, doc_id: str | None = None, verify: bool = True) -> dict:
    """:func:`kvforge.artifact.summarize` of a ``.kv`` file or of one document of a zarr library.

    A library of several documents without ``doc_id`` gives ``{"library": path, "documents": [ids]}``.
    """
    if library.is_library(path):
        if doc_id is None:
            ids = library.list_ids(path)
            if len(ids) != 1:
                return {"library": str(path), "documents": ids}
        return _artifact.summarize(library.read(path, doc_id, verify=verify))
    return _artifact.summarize(_artifact.read(path, verify=verify))


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


__all__ = ["describe", "verify_paths"]
