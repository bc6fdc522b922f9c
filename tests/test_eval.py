"""A seconds-long smoke run of `kvforge eval` on a tiny random model, so the harness never rots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvforge.cli import cli
from kvforge.errors import ConfigError
from kvforge.eval.tasks import KINDS, generate
from kvforge.model import load_model


def test_tasks_are_seeded_and_hold_their_answers(tiny_llama):
    lm = load_model(tiny_llama)
    a = generate(lm.tokenizer, KINDS, lengths=[300], samples=1, seed=5)
    b = generate(lm.tokenizer, KINDS, lengths=[300], samples=1, seed=5)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert {t.kind for t in a} == set(KINDS)
    for t in a:
        if t.kind.startswith("niah"):
            assert all(ans in t.context for ans in t.answers), t.id
        assert t.score(" ".join(t.answers)) == 1.0 and t.score("") == 0.0


def test_eval_smoke_and_resume(tmp_path, tiny_llama):
    args = ["eval", "--methods", "compactor,knorm", "--keep", "0.5", "--tasks", "niah_number,niah_multikey",
            "--lengths", "300", "--samples", "1", "--max-new-tokens", "4", "--model", str(tiny_llama),
            "--out", str(tmp_path / "ev"), "--no-progress", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert {x["method"] for x in rows} == {"full", "compactor", "knorm"}
    full = [x for x in rows if x["method"] == "full"]
    assert full and all(x["kl_qa"] == 0.0 for x in full)  # the ceiling
    assert (tmp_path / "ev" / "report.md").read_text().count("|") > 10
    assert summary
    # rerunning the same command resumes: nothing is recomputed, the rows stay the same
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    again = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert len(again) == len(rows)
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["model"]["source"] == str(tiny_llama)
    assert (tmp_path / "ev" / "report.md").read_text().startswith(f"Model: {tiny_llama.name} (`{tiny_llama}`")


def test_eval_refuses_to_resume_another_models_rows(tmp_path, tiny_llama, other_llama):
    """A folder's rows are one model's: resuming with another model would mix them in one report."""
    args = ["eval", "--methods", "knorm", "--keep", "0.5", "--tasks", "niah_number", "--lengths", "300",
            "--samples", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "ev"), "--no-progress"]
    assert CliRunner().invoke(cli, [*args, "--model", str(tiny_llama)]).exit_code == 0
    rows = (tmp_path / "ev" / "rows.jsonl").read_text()
    r = CliRunner().invoke(cli, [*args, "--model", str(other_llama)])
    assert r.exit_code != 0 and "holds rows of model" in r.output and "another --out" in r.output
    assert (tmp_path / "ev" / "rows.jsonl").read_text() == rows
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["model"]["source"] == str(tiny_llama)


def test_eval_keep_auto(tmp_path, tiny_llama):
    r = CliRunner().invoke(cli, ["eval", "--methods", "compactor", "--keep", "auto,0.5", "--tolerance", "0.3",
                                 "--tasks", "niah_number", "--lengths", "300", "--samples", "2",
                                 "--max-new-tokens", "4", "--model", str(tiny_llama), "--out", str(tmp_path / "ev"),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    auto = [x for x in rows if x["keep"] == "auto"]
    assert len(auto) == 2 and all(0 < x["keep_achieved"] <= 1 for x in auto)
    assert "| compactor | auto |" in r.output
    assert (tmp_path / "ev" / "calibrated_keeps.png").exists()
    bad = CliRunner().invoke(cli, ["eval", "--keep", "0.5,most", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a number" in bad.output


def test_validation_text_is_neither_trained_on_nor_held_out():
    """debian-docs, the text trained models are chosen on, holds no changelog-like, copyright or license text, its
    own split only, and its html pages come as plain text."""
    from kvforge.eval import sources

    src = sources.SOURCES["debian-docs"]
    keys = src.keys()
    if not keys:
        pytest.skip("no /usr/share/doc documentation on this machine")
    assert src.split == "validation" and sources.of_split("validation") == ["debian-docs"]
    assert "debian-docs" not in sources.of_split("tuning") + sources.of_split("heldout")
    for key in keys:
        rel = key.lower()
        assert not any(word in rel for word in ("changelog", "copyright", "news", "relnotes"))
        assert not Path(key).name.startswith("API")
    html = [k for k in keys if k.endswith(".html")]
    assert html and not any(re.search(r"</?(html|body|div|p|a|span)\b", src.read(k)) for k in html[:10])
    licenses = sources.flat_text(["licenses"])
    assert sources.shares_run(sources.SOURCES["licenses"].read(sources.SOURCES["licenses"].keys()[0]), licenses)
    for key in keys[::25]:
        assert not sources.shares_run(src.read(key), licenses)
    with pytest.raises(ConfigError, match="validation"):
        sources.of_split("train")


def test_the_wider_suite_splits_text_and_wording(tiny_llama):
    from kvforge.eval import phrasings, sources

    lm = load_model(tiny_llama)
    present = [s for s in sources.SOURCES if sources.SOURCES[s].keys()]
    assert {"python-reference", "python-docstrings", "licenses"} <= set(present)  # Python and Debian base-files
    tasks = generate(lm.tokenizer, ["niah_number", "niah_multihop", "niah_multiquery"], lengths=[300], samples=2,
                     seed=1, sources=present)
    for t in tasks:
        assert t.split == sources.SOURCES[t.source].split
        assert t.phrasings == ("heldout" if t.split == "heldout" else "tuning")  # validation: tuning wordings
        assert all(a in t.context for a in t.answers), t.id
    held = [t for t in tasks if t.split == "heldout"]
    tuned = [t for t in tasks if t.split == "tuning"]
    assert held and tuned
    assert bool([t for t in tasks if t.split == "validation"]) == ("debian-docs" in present)
    # nothing held out was seen while tuning: neither a key nor a wording
    assert not {k.lower() for k in phrasings.HELDOUT_KEYS} & {k.lower() for k in phrasings.TUNING_KEYS}
    assert not {p.statement for p in phrasings.HELDOUT} & {p.statement for p in phrasings.TUNING}
    for t in held:
        assert "magic code" not in t.question and "secret number" not in t.question


def test_the_first_suite_is_unchanged(tiny_llama):
    """Without --sources / --split the tasks are the first suite's: classic wording over the language reference."""
    lm = load_model(tiny_llama)
    for t in generate(lm.tokenizer, ["niah_number", "niah_multivalue"], lengths=[300], samples=1, seed=0):
        assert t.id in ("niah_number-300-0-0", "niah_multivalue-300-0-0") and t.split == "tuning"
        assert "special magic code" in t.question


def test_eval_reports_per_split(tmp_path, tiny_llama):
    from kvforge.eval import sources

    args = ["eval", "--methods", "knorm", "--keep", "0.5", "--tasks", "niah_number", "--sources",
            "python-reference,licenses", "--lengths", "300", "--samples", "1", "--max-new-tokens", "3",
            "--model", str(tiny_llama), "--out", str(tmp_path / "ev"), "--no-progress", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert set(summary["splits"]) == {"tuning", "heldout"}
    assert set(summary["splits"]["heldout"]) == {"all", "licenses"}
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## heldout split" in report and "### tuning: python-reference" in report
    bad = CliRunner().invoke(cli, args[:-2] + ["--split", "heldout", "--json"])
    assert bad.exit_code != 0 and "not both" in bad.output
    if sources.SOURCES["debian-docs"].keys():  # the validation split, beside the tuning split
        args[args.index("--sources") + 1] = "python-reference,debian-docs"
        r = CliRunner().invoke(cli, args[:-4] + ["--out", str(tmp_path / "val"), "--no-progress", "--json"])
        assert r.exit_code == 0, r.output
        assert set(json.loads(r.output)["splits"]) == {"tuning", "validation"}
        assert "## validation split (trained models are chosen here)" in (tmp_path / "val" / "report.md").read_text()
