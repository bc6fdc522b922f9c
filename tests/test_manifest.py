"""kvforge.manifest.make_manifest: the one place a manifest is put together."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvforge import artifact
from kvforge.errors import FormatError
from kvforge.manifest import make_manifest

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "golden"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"kvforge_{name}", GOLDEN / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _goldens():
    v10 = _module("make_golden").golden_inputs()  # complete manifests
    v11 = _module("make_golden_v1_1").golden_inputs()  # without tensors_sha256
    return v10 + v11


def _remade(m: dict, kv) -> dict:
    d, c, s = m["document"], m["compression"], m["storage"]
    return make_manifest(m["model"], m["template"], doc_id=d["id"], doc_sha256=d["sha256"],
                         logical_length=d["logical_length"], compressed=kv, method=c["method"],
                         keep_requested=c["keep_requested"], seed=c["seed"], extra=c["extra"], dtype=s["dtype"],
                         quantization=s["quantization"])


@pytest.mark.parametrize("name, golden, kv", _goldens(), ids=lambda x: x if isinstance(x, str) else "")
def test_make_manifest_gives_every_golden_manifest(name, golden, kv):
    """From the golden files' inputs, make_manifest plus the writer's part is the released manifest."""
    made, _ = artifact.prepare(_remade(golden, kv), kv, name)
    want, _ = artifact.prepare(golden, kv, name)  # fills tensors_sha256 where the maker leaves it out
    assert made.pop("created_by").startswith("kvforge ")  # informative; the goldens pin the version they had
    want.pop("created_by")
    assert made == want


def test_an_in_memory_manifest_is_refused_by_the_writer(tmp_path):
    _, golden, kv = _goldens()[0]
    m = _remade(golden, kv)
    m["compression"]["keep_requested"] = None  # what Doc.from_kv records: no keep was asked for
    with pytest.raises(FormatError):
        artifact.write(tmp_path / "x.kv", m, kv)
    assert not (tmp_path / "x.kv").exists()
