"""The zarr v3 library container: many artifacts in one store (spec: ``formats/kvforge-library-v1.md``).

A library is a zarr v3 hierarchy, a folder (``lib.zarr``) or a zip of one
(``lib.zarr.zip``, for shipping). Each document is a group holding the same
manifest and the same stored tensors as its ``.kv`` twin, flattened over layers.
kvforge reads and writes exactly that subset with its own small, strict code, so
that a hostile store is refused before anything is allocated for it; zarr-python
reads what it writes (tested).

One module per concern:

    layout    names, the root group, its checks              (what the spec fixes)
    stores    folder and zip key/value views, bounded reads  (what can hang or escape)
    arrays    array metadata, codecs, chunk encoding         (the zarr v3 subset)
    flatten   .kv tensors <-> the document's arrays
    reader    Library: list, read one document, check all    (bounded by stored bytes)
    writer    create, per-document atomic writes              (staging, lock, dead-writer cleanup)
    pack      folder -> zip, streamed to disk

The helpers both containers share (canonical JSON, versions, durable writes, the
error guard) live in :mod:`kvforge.containers`.
"""

from .layout import LIBRARY_FORMAT, LIBRARY_VERSION, group_name, is_library
from .pack import pack
from .reader import Library, check_each, list_ids, open_library, read, read_manifest, read_stored
from .writer import create, write, write_stored

__all__ = ["LIBRARY_FORMAT", "LIBRARY_VERSION", "Library", "check_each", "create", "group_name", "is_library",
           "list_ids", "open_library", "pack", "read", "read_manifest", "read_stored", "write", "write_stored"]
