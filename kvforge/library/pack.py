"""Zipping a library folder for shipping (``lib.zarr`` -> ``lib.zarr.zip``), streamed to disk.

Entries are stored (the chunks are zstd already), in sorted order, with a fixed
date and mode, so that the same library always gives the same zip bytes. The zip
is written through a temporary file renamed into place (:func:`~kvforge.containers.atomic_file`);
each member is copied from its file in blocks, so memory stays bounded whatever the library's size.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from ..containers import atomic_file
from .reader import open_library

COPY_BLOCK = 1024 * 1024


def pack(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Zip the library folder ``src`` into ``dst``, atomically. Returns the zip's bytes."""
    root = Path(src)
    with open_library(src) as lib:  # checks the root before anything is written
        names = ["zarr.json"] + [k for group in lib.store.children() for k in _doc_files(root, group)]
    with atomic_file(Path(dst)) as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in names:
                path = root / name
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                info.file_size = path.stat().st_size  # known up front: the same header writestr would write
                with open(path, "rb") as member, zf.open(info, "w") as out:
                    shutil.copyfileobj(member, out, COPY_BLOCK)
        size = fh.tell()
    return size


def _doc_files(root: Path, group: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / group).rglob("*") if p.is_file())
