"""Read-only key/value views of a library, a folder or a zip of one, that refuse what could hang or escape.

Keys are '/'-separated paths relative to the library root. Every read is bounded
(``limit``): a store never returns more bytes than the caller's metadata allows.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ..containers import strict_loads
from ..errors import FormatError, IntegrityError
from .layout import check_root

MAX_META_BYTES = 16 * 1024 * 1024  # zarr.json documents


class Store:
    """A library's files by key: ``get`` (bounded), ``size`` (None when absent), ``children`` (document groups)."""

    where: str

    def get(self, key: str, limit: int) -> bytes:
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def children(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DirStore(Store):
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


class ZipStore(Store):
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


def open_store(path: str | os.PathLike) -> Store:
    """The store at ``path`` (a folder, or a ``.zip``), its root checked; closed again if the check fails."""
    p = Path(path)
    if p.is_dir():
        store: Store = DirStore(p)
    elif p.suffix == ".zip":
        store = ZipStore(p)
    elif not p.exists():
        raise FormatError(f"{p}: no such library")
    else:
        raise FormatError(f"{p}: not a kvforge library (a .zarr folder or a .zarr.zip file)")
    try:
        check_root(read_json(store, "zarr.json"), store.where)
    except BaseException:
        store.close()
        raise
    return store


def read_json(store: Store, key: str) -> dict:
    """A ``zarr.json`` as a dict: bounded, UTF-8, strict JSON (no NaN), an object."""
    raw = store.get(key, MAX_META_BYTES)
    try:
        obj = strict_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{store.where}: {key} is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{store.where}: {key} is not a JSON object")
    return obj
