"""Which documents a server answers from, and an LRU of the loaded ones, bounded by resident KV bytes.

At start-up only manifests are read (one header per ``.kv`` file, one ``zarr.json`` per library
document): ids, sizes and the model each was built for. A document whose model differs from the
loaded one is refused then, with the fields that differ. A document is loaded (read, every check,
its digest) on first use; the least recently used ones are dropped when the resident bytes pass
the bound. A request's document id is only ever a key of :attr:`Registry.entries`, never a path.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .. import artifact as _artifact
from .. import library as _library
from .. import quantize as _quant
from ..doccache import DocumentCache
from ..errors import KvforgeError, ResourceLimitError
from ..runtime import check_model


@dataclass(frozen=True)
class Entry:
    """One servable document: where it lives and its checked manifest."""

    doc_id: str
    container: str  # the .kv file or the library (folder or zip)
    in_library: bool
    manifest: dict
    source: str  # the command-line argument it came from
    file_bytes: int | None = None  # the .kv file's size (a library document's is known once loaded)

    @property
    def resident_bytes(self) -> int:
        """Bytes its keys and values will hold once loaded (the LRU's unit), from the manifest alone.

        A quantized document stays quantized (its codes and scales, ``DocumentCache(resident="codes")``).
        """
        m, storage = self.manifest["model"], self.manifest["storage"]
        n, d, h = int(self.manifest["compression"]["kept_entries"]), int(m["head_dim"]), int(m["num_kv_heads"])
        beta = 4 * n if storage["has_beta"] else 0
        if storage["quantization"] != "none":
            width = d * _quant.bits_of(storage["quantization"]) // 8
            return 2 * n * width + 2 * n + int(m["num_layers"]) * 2 * h * d * 2 + beta
        item = _artifact.STORAGE_DTYPES[storage["dtype"]].itemsize
        return 2 * n * d * item + beta


def scan(sources: list[str]) -> list[Entry]:
    """Every document of ``sources``: ``.kv`` files, folders of them, zarr libraries (folder or zip)."""
    found: list[Entry] = []
    for source in sources:
        path = Path(source)
        if _library.is_library(path):
            with _library.open_library(path) as lib:
                for doc_id in lib.ids():
                    found.append(Entry(doc_id, str(path), True, lib.manifest(doc_id), source))
        elif path.is_dir():
            files = sorted(path.glob("*.kv"))
            if not files:
                raise KvforgeError(f"{source}: the folder holds no .kv files (build one with kvforge build)")
            found += [_kv_entry(f, source) for f in files]
        elif path.is_file() and path.suffix == ".kv":
            found.append(_kv_entry(path, source))
        else:
            raise KvforgeError(f"{source}: not a .kv file, a folder of .kv files, or a zarr library "
                               "(lib.zarr / lib.zarr.zip)")
    seen: dict[str, Entry] = {}
    for e in found:
        if e.doc_id in seen:
            raise KvforgeError(f"document id {e.doc_id!r} is in both {seen[e.doc_id].container} and {e.container}; "
                               "serve one of them (ids name the documents clients ask for)")
        seen[e.doc_id] = e
    return found


def _kv_entry(path: Path, source: str) -> Entry:
    manifest, _, _ = _artifact.read_header(path)
    return Entry(manifest["document"]["id"], str(path), False, manifest, source, path.stat().st_size)


class Registry:
    """The servable documents and the LRU of loaded :class:`DocumentCache` s (thread-safe).

    max_resident_bytes: the bound on the loaded documents' KV bytes; a document larger than it alone is refused.
    """

    def __init__(self, entries: list[Entry], lm, max_resident_bytes: int, *, verify: bool = True):
        self.lm = lm
        self.max_resident_bytes = int(max_resident_bytes)
        self.verify = verify
        self.entries: dict[str, Entry] = {}
        self.refused: dict[str, str] = {}  # id -> why (built for another model)
        for e in entries:
            try:
                check_model(e.manifest, lm, f"{e.container}:{e.doc_id}" if e.in_library else e.container)
                self.entries[e.doc_id] = e
            except KvforgeError as exc:
                self.refused[e.doc_id] = str(exc)
        self._loaded: OrderedDict[str, DocumentCache] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0
        self.evictions = 0

    def get(self, doc_id: str) -> tuple[DocumentCache, float]:
        """The loaded document ``doc_id`` (loading it on first use) and the seconds spent loading it now.

        Raises KeyError for an id that is not served (the caller says 404), KvforgeError otherwise.
        """
        entry = self.entries[doc_id]  # KeyError: not one of ours (never a path)
        with self._lock:
            if doc_id in self._loaded:
                self._loaded.move_to_end(doc_id)
                return self._loaded[doc_id], 0.0
            gate = self._loading.setdefault(doc_id, threading.Lock())
        with gate:  # one load per document, however many requests ask at once
            with self._lock:
                if doc_id in self._loaded:
                    self._loaded.move_to_end(doc_id)
                    return self._loaded[doc_id], 0.0
            if entry.resident_bytes > self.max_resident_bytes:
                raise ResourceLimitError(
                    f"document {doc_id!r} needs {entry.resident_bytes} resident bytes, more than the server's "
                    f"bound of {self.max_resident_bytes} (kvforge serve --max-resident-mb)")
            t0 = time.perf_counter()
            if entry.in_library:
                art = _library.read(entry.container, doc_id, verify=self.verify, keep_codes=True)
            else:
                art = _artifact.read(entry.container, verify=self.verify, keep_codes=True)
            if art.manifest != entry.manifest:
                raise KvforgeError(f"{entry.container}: document {doc_id!r} changed since the server started")
            document = DocumentCache.for_model(art, self.lm, resident="codes")  # quantized stays quantized
            seconds = time.perf_counter() - t0
            with self._lock:
                self._loaded[doc_id] = document
                self.loads += 1
                self._evict(keep=doc_id)
            return document, seconds

    def peek(self, doc_id: str) -> DocumentCache | None:
        """The document if it is resident (marked as used), else None: no I/O, safe on the event loop."""
        with self._lock:
            document = self._loaded.get(doc_id)
            if document is not None:
                self._loaded.move_to_end(doc_id)
            return document

    def _evict(self, keep: str) -> None:
        while self.resident_bytes_locked() > self.max_resident_bytes:
            victim = next((k for k in self._loaded if k != keep), None)
            if victim is None:
                break
            del self._loaded[victim]
            self.evictions += 1

    def resident_bytes_locked(self) -> int:
        return sum(d.resident_bytes() for d in self._loaded.values())

    def resident_bytes(self) -> int:
        with self._lock:
            return self.resident_bytes_locked()

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def artifact_bytes(self, doc_id: str) -> int | None:
        entry = self.entries[doc_id]
        with self._lock:
            loaded = self._loaded.get(doc_id)
        return loaded.artifact.file_bytes if loaded is not None else entry.file_bytes
