"""Lossless conversion between ``.kv`` files and zarr libraries (folder or zip).

The stored tensors move as they are (quantized codes stay codes), so a ``.kv``
file converted into a library and back is the same file, byte for byte.

    .kv file(s) or a folder of them  ->  lib.zarr  or  lib.zarr.zip
    lib.zarr or lib.zarr.zip          ->  a folder of .kv files (or a single .kv with ``doc_id``)
    lib.zarr                          <-> lib.zarr.zip
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import artifact as _artifact
from . import library
from .containers import atomic_write_bytes
from .errors import ConfigError, FormatError


@dataclass
class ConvertReport:
    source: str
    dest: str
    documents: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _kv_files(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(src.glob("*.kv"))
        if not files:
            raise FormatError(f"{src}: no .kv files in this folder")
        return files
    if src.suffix != ".kv":
        raise FormatError(f"{src}: expected a .kv file, a folder of them, or a zarr library")
    return [src]


def convert(src: str | os.PathLike, dst: str | os.PathLike, doc_id: str | None = None,
            overwrite: bool = False) -> ConvertReport:
    """Convert ``src`` into ``dst`` (see the module docstring); every document is fully verified on the way."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise ConfigError(f"{dst} exists; remove it or pass --overwrite")
    report = ConvertReport(source=str(src), dest=str(dst))
    if library.is_library(src):
        ids = [doc_id] if doc_id else library.list_ids(src)
        if dst.suffix in (".zarr", ".zip"):
            stored = [library.read_stored(src, i) for i in ids]
            _write_library(dst, stored, report)
        else:
            for i in ids:
                manifest, tensors, nbytes = library.read_stored(src, i)
                _artifact.from_tensors(tensors, manifest, f"{src}:{i}")  # verify before writing anything
                target = dst if dst.suffix == ".kv" else dst / f"{library.group_name(i)}.kv"
                if dst.suffix == ".kv" and len(ids) != 1:
                    raise ConfigError(f"{src} holds {len(ids)} documents; convert into a folder, or pass --doc")
                data = _artifact.encode(manifest, tensors)
                atomic_write_bytes(target, data)
                report.documents.append(i)
                report.bytes_in += nbytes
                report.bytes_out += len(data)
        return report
    if doc_id is not None:
        raise ConfigError("--doc selects a document of a zarr library source")
    if dst.suffix not in (".zarr", ".zip"):
        raise ConfigError(f"{dst}: convert .kv files into a zarr library (lib.zarr or lib.zarr.zip)")
    _write_library(dst, [_artifact.read_stored(p) for p in _kv_files(src)], report)
    return report


def _write_library(dst: Path, stored: list[tuple[dict, dict, int]], report: ConvertReport) -> None:
    for manifest, tensors, _ in stored:
        _artifact.from_tensors(tensors, manifest, manifest["document"]["id"])  # verify before writing
    if dst.suffix == ".zip":
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
            folder = Path(tmp) / "lib.zarr"
            _write_library(folder, stored, ConvertReport(source=report.source, dest=str(folder)))
            report.documents = library.list_ids(folder)
            report.bytes_in = sum(n for _, _, n in stored)
            report.bytes_out = library.pack(folder, dst)
        return
    if dst.exists() and library.is_library(dst):
        shutil.rmtree(dst)  # overwrite was asked for
    for manifest, tensors, nbytes in stored:
        report.bytes_out += library.write_stored(dst, manifest, tensors)
        report.bytes_in += nbytes
        report.documents.append(manifest["document"]["id"])
