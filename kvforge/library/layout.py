"""What the library spec fixes about names and the root (``formats/kvforge-library-v1.md``).

    lib.zarr/zarr.json                root group; attributes.kvforge = {format, version}
    lib.zarr/<group>/zarr.json        a document: its manifest, consolidated metadata of its arrays
    lib.zarr/<group>/<array>/...      lengths, positions, keys, values [, scales] [, beta]
    lib.zarr/.staging/                writers' private folders (never read)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..containers import check_semver
from ..errors import FormatError

LIBRARY_FORMAT = "kvforge-library"
LIBRARY_VERSION = "1.0.0"
READABLE_MAJORS = (1,)
STAGING = ".staging"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def is_library(path: str | os.PathLike) -> bool:
    """True for a zarr library folder (holding ``zarr.json``) or a ``.zip`` file."""
    p = Path(path)
    return (p.is_dir() and (p / "zarr.json").is_file()) or (p.suffix == ".zip" and not p.is_dir())


def group_name(doc_id: str) -> str:
    """The group a document lives in: its id when that is a plain name, else ``x-`` and a hash of it."""
    if not isinstance(doc_id, str) or not doc_id:
        raise FormatError(f"a document id must be a non-empty string, got {doc_id!r}")
    if _ID.match(doc_id) and not doc_id.startswith("x-"):
        return doc_id
    return "x-" + hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def root_json() -> bytes:
    """The root group's ``zarr.json``: the same bytes from every writer, so that two creators may race."""
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {"kvforge": {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION}}}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def check_root(meta: dict, where: str) -> None:
    """Refuse a root ``zarr.json`` that is not a kvforge library of a version this kvforge reads."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise FormatError(f"{where}: zarr.json: expected a zarr v3 group (zarr_format 3), found "
                          f"zarr_format {meta.get('zarr_format')!r}, node_type {meta.get('node_type')!r}")
    info = (meta.get("attributes") or {}).get("kvforge") if isinstance(meta.get("attributes"), dict) else None
    if not isinstance(info, dict) or info.get("format") != LIBRARY_FORMAT:
        raise FormatError(f"{where}: a zarr group, but not a kvforge library (attributes.kvforge.format is not "
                          f"{LIBRARY_FORMAT!r})")
    check_semver(str(info.get("version")), READABLE_MAJORS, where, field="library version",
                 what="library format version", advice="Upgrade kvforge")
