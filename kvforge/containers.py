"""What both containers (the ``.kv`` file and the zarr library) share: JSON, versions, durable writes, the guard.

Nothing here knows a file layout; :mod:`kvforge.artifact` and :mod:`kvforge.library`
do. Every helper exists once so that the two containers cannot drift apart:

* canonical JSON (the bytes that digests are taken over) and a strict JSON reader
  that refuses ``NaN`` / ``Infinity``;
* ``MAJOR.MINOR.PATCH`` parsing against the majors this kvforge reads;
* atomic, fsynced writes: whole bytes (:func:`atomic_write_bytes`) or a stream
  (:func:`atomic_file`), a temporary file renamed into place, then the folder fsynced;
* :func:`guard`: any non-kvforge exception a hostile file provokes in a parser
  becomes a :class:`~kvforge.errors.FormatError` at the entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import FormatError, KvforgeError, UnsupportedVersionError

# what hostile bytes can make a parser raise; converted to FormatError at the boundary
FOREIGN_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, UnicodeError,
                  AttributeError, RuntimeError, MemoryError)


def canonical_json(obj) -> str:
    """Sorted keys, no spaces, UTF-8 as is, no NaN: the text manifests and config digests are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def strict_loads(text: str):
    """``json.loads`` that refuses the non-standard constants ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def check_semver(version, readable_majors: tuple[int, ...], where: str, *, field: str, what: str,
                 advice: str) -> None:
    """Refuse a version that is not ``MAJOR.MINOR.PATCH`` (FormatError) or whose major is not read here.

    field: how the message names the version's place (``field version``); what: the thing versioned
    (``format version``); advice: what to do about an unsupported major.
    """
    parts = str(version).split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise FormatError(f"{where}: {field}: expected MAJOR.MINOR.PATCH, found {version!r}")
    if int(parts[0]) not in readable_majors:
        raise UnsupportedVersionError(f"{where}: {what} {version} is not supported; this kvforge reads "
                                      f"{', '.join(f'{m}.x' for m in readable_majors)}. {advice}")


def write_fsynced(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (inside a staging folder that is renamed into place later)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename inside it is durable; a no-op where the filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a binary file that becomes ``path`` only when the block ends without an exception.

    A temporary file in the same folder, fsynced, renamed over ``path``, then the folder fsynced;
    on any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact is a normal file
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def guard(fn, what: str = "artifact"):
    """Wrap a reading entry point: any non-kvforge exception from reading becomes a FormatError."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvforgeError:
            raise
        except FOREIGN_ERRORS as exc:
            raise FormatError(f"{args[0] if args else ''}: unreadable {what} ({type(exc).__name__}: {exc})") from exc

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
