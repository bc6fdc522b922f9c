"""The manifest schema is kept twice: the spec's copy in formats/ is normative, the package's is what the reader
loads (package data has to live inside kvforge/ to be installed). They must be the same bytes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SPEC_SCHEMA = Path(__file__).resolve().parent.parent / "formats" / "kvforge-artifact-v1.schema.json"
PACKAGE_SCHEMA = "schema/artifact-v1.schema.json"


def test_package_schema_is_the_spec_schema():
    package = resources.files("kvforge").joinpath(PACKAGE_SCHEMA).read_bytes()
    assert package == SPEC_SCHEMA.read_bytes(), (
        f"kvforge/{PACKAGE_SCHEMA} differs from formats/{SPEC_SCHEMA.name}, the normative copy: "
        f"edit the one in formats/ and copy it over the package's")
