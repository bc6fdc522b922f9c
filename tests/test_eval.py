"""A seconds-long smoke run of `kvforge eval` on a tiny random model, so the harness never rots."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvforge.cli import cli
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
