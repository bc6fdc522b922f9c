"""Documents: read .txt / .md files and folders, reject unusable input clearly."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

SUFFIXES = (".txt", ".md")
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Document:
    """One source text. ``id`` is unique in a build and safe as a file name."""

    id: str
    text: str
    sha256: str
    path: str = ""

    @staticmethod
    def from_text(doc_id: str, text: str, path: str = "") -> "Document":
        check_text(text, path or doc_id)
        return Document(id=doc_id, text=text, sha256=text_sha256(text), path=path)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_text(text: str, where: str) -> None:
    """Refuse empty and binary-looking text."""
    if not text.strip():
        raise InputError(f"{where}: the document is empty (or whitespace only); remove it or add text")
    if "\x00" in text:
        raise InputError(f"{where}: the document contains NUL bytes and looks binary; only UTF-8 text is accepted")
    control = sum(1 for c in text[:65536] if ord(c) < 32 and c not in "\n\r\t\f\v")
    if control > 0.01 * min(len(text), 65536) + 8:
        raise InputError(f"{where}: {control} control characters in the first 64 KiB: the file looks binary, not text")


def read_document(path: Path, doc_id: str) -> Document:
    """Read one file as strict UTF-8 text."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise InputError(f"{path}: {size} bytes is over the {MAX_DOCUMENT_BYTES} byte limit for one document")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc
    if b"\x00" in raw:
        raise InputError(f"{path}: the file contains NUL bytes and looks binary; only UTF-8 text is accepted")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from exc
    check_text(text, str(path))
    return Document(id=doc_id, text=text, sha256=text_sha256(text), path=str(path))


def _doc_id(rel: Path) -> str:
    stem = str(rel.with_suffix("")).replace(os.sep, "__")
    return _ID_UNSAFE.sub("_", stem).strip("._") or "doc"


def discover(sources) -> list[tuple[str, Path]]:
    """(id, path) for every .txt / .md file in ``sources`` (files or folders, recursive, sorted)."""
    found: list[tuple[str, Path]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(src).parts))
            found += [(_doc_id(p.relative_to(src)), p) for p in files]
        elif src.is_file():
            if src.suffix.lower() not in SUFFIXES:
                raise InputError(f"{src}: only {', '.join(SUFFIXES)} files are read; rename it or convert it")
            found.append((_doc_id(Path(src.name)), src))
        else:
            raise InputError(f"{src}: no such file or folder")
    if not found:
        raise InputError(f"no {'/'.join(SUFFIXES)} documents found in {', '.join(map(str, sources))}")
    seen: dict[str, Path] = {}
    for doc_id, path in found:
        if doc_id in seen:
            raise InputError(f"two documents map to the id {doc_id!r}: {seen[doc_id]} and {path}; rename one")
        seen[doc_id] = path
    return found


def load_corpus(sources, *, skip_bad: bool = False) -> tuple[list[Document], list[InputError]]:
    """Read all documents first, so that a bad one stops the build before anything is written.

    Returns the documents and the errors; raises the first error unless ``skip_bad``.
    """
    docs, errors = [], []
    for doc_id, path in discover(sources):
        try:
            docs.append(read_document(path, doc_id))
        except InputError as exc:
            errors.append(exc)
    if errors and not skip_bad:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(f"{errors[0]}{more}; nothing was written. Fix the input or pass --skip-bad")
    return docs, errors
