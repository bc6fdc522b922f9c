"""--keep auto: the search, what it records, and that candidate keeps reuse one scoring pass."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import kvforge
from kvforge.calibrate import CalibrationConfig, answer_rows, calibrate, make_probes, novelty, probe_starts
from kvforge.cli import cli
from kvforge.errors import ConfigError
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.methods.compactor import Compactor
from kvforge.model import load_model
from kvforge.prefill import prefill


@pytest.fixture
def lm(tiny_llama):
    return load_model(tiny_llama)


def _prefill(lm, text):
    ids = lm.encode_document(text)
    return ids, prefill(lm.model, ids, queries=True, pre_rope_keys=True)


def test_prepare_scores_once_and_matches_compress(lm, docs, monkeypatch):
    ids, kv = _prefill(lm, (docs / "assert.txt").read_text())
    method = get_method("compactor")
    calls = []
    original = Compactor.scorer
    monkeypatch.setattr(Compactor, "scorer", lambda self, kv, ctx: calls.append(1) or original(self, kv, ctx))
    compress_at = method.prepare(kv, CompressionContext(seed=0))
    for keep in (0.2, 0.5, 0.8):
        got = compress_at(Budget(keep))
        want = method.compress(kv, Budget(keep), CompressionContext(seed=0))
        assert torch.equal(got.lengths, want.lengths)
        assert all(torch.equal(a, b) for a, b in zip(got.positions, want.positions))
    assert len(calls) == 1 + 3  # prepare once, then one per direct compress


def test_probes_quote_the_document(lm, docs):
    text = (docs / "assert.txt").read_text()
    ids = lm.encode_document(text)
    probes = make_probes(lm, ids, CalibrationConfig(probes=4, cue=8, target=16))
    assert len(probes) == 4
    for q, a in probes:
        assert len(a) == 16
        # the answer is a contiguous run of document tokens
        assert any(ids[i:i + 16] == a for i in range(len(ids) - 15))
        assert "Quote the text that follows" in lm.tokenizer.decode(q)


def test_a_probe_lands_on_the_one_distinct_passage_of_a_repetitive_document():
    unit = list(range(10, 30))                      # a 20-token paragraph, repeated
    fact = list(range(100, 112))                    # 12 tokens said once
    ids = [1, 2] + unit * 10 + fact + unit * 10     # template prefix of 2 tokens
    assert sum(novelty(ids)[2 + 200:2 + 212]) >= 9 and sum(novelty(ids)[40:200]) == 0
    cfg = CalibrationConfig(probes=6, cue=8, target=16)
    starts = probe_starts(ids, 2, cfg)
    assert len(starts) == 6 and len(set(starts)) == 6
    assert any(s <= 202 and s + 24 >= 214 for s in starts)   # one span covers the whole fact
    assert starts[0] == 2 and max(starts) + 24 <= len(ids)
    # a document with nothing repeated: every span is novel, still six distinct in-range probes
    plain = probe_starts(list(range(500)), 0, cfg)
    assert len(set(plain)) == 6 and max(plain) + 24 <= 500


@pytest.mark.parametrize("tolerance", [1e-9, 1e9])
def test_search_bounds(lm, docs, tolerance):
    ids, kv = _prefill(lm, (docs / "assert.txt").read_text())
    cfg = CalibrationConfig(tolerance=tolerance)
    keep, out, record = calibrate(lm, ids, kv, get_method("compactor"), CompressionContext(seed=0), cfg)
    if tolerance > 1:  # anything is accepted: the smallest candidate
        assert keep == min(cfg.grid)
    else:  # nothing but (nearly) lossless is accepted
        assert keep >= 0.75
    L, H, T, _ = kv.shape
    assert out.kept == pytest.approx(keep * L * H * T, rel=0.05, abs=H * 16)
    assert record.keep == keep and record.tolerance == tolerance
    assert 1 <= len(record.trace) <= 5  # bisection over a 12-point grid
    kls = {t["keep"]: t["kl"] for t in record.trace}
    assert all(v >= 0 for v in kls.values())


def test_worst_probe_aggregate_is_never_less_conservative(lm, docs):
    ids, kv = _prefill(lm, (docs / "assert.txt").read_text())
    method, ctx = get_method("compactor"), CompressionContext(seed=0)
    # the worst probe's KL bounds the mean from above, so its bisection stops at the same keep or later
    for tolerance in (0.01, 0.05, 0.2):
        keep_mean, _, _ = calibrate(lm, ids, kv, method, ctx, CalibrationConfig(tolerance=tolerance))
        keep_max, _, rec = calibrate(lm, ids, kv, method, ctx, CalibrationConfig(tolerance=tolerance, aggregate="max"))
        assert keep_max >= keep_mean and rec.proxy == "probe-recall-kl-max"
    with pytest.raises(ValueError):
        calibrate(lm, ids, kv, method, ctx, CalibrationConfig(aggregate="median"))


def test_too_short_to_probe_keeps_everything(lm):
    ids, kv = _prefill(lm, "Short.")
    keep, out, record = calibrate(lm, ids, kv, get_method("compactor"), CompressionContext(seed=0))
    assert keep == 1.0 and record.probes == 0 and record.trace == []


def test_build_auto_records_the_search(tmp_path, docs, tiny_llama):
    report = kvforge.build(docs, tmp_path / "out", method="compactor", keep="auto", tolerance=0.05,
                           model=tiny_llama, progress=False)
    for entry in report.entries:
        cal = entry["calibration"]
        assert entry["keep_requested"] == "auto"
        assert cal["tolerance"] == 0.05 and cal["keep"] in CalibrationConfig().grid
        doc = kvforge.load(tmp_path / "out" / entry["file"], model=tiny_llama)
        comp = doc.manifest["compression"]
        assert comp["keep_requested"] == cal["keep"]
        assert comp["extra"]["calibration"]["trace"] == cal["trace"]
        assert comp["keep_achieved"] == pytest.approx(cal["keep"], abs=0.05)
    # a rerun with the same tolerance is up to date; another tolerance rebuilds
    again = kvforge.build(docs, tmp_path / "out", method="compactor", keep="auto", tolerance=0.05,
                          model=tiny_llama, progress=False)
    assert again.built == [] and len(again.skipped) == 3
    other = kvforge.build(docs, tmp_path / "out", method="compactor", keep="auto", tolerance=0.5,
                          model=tiny_llama, progress=False)
    assert len(other.built) == 3


def test_cli_auto_prints_the_distribution(tmp_path, docs, tiny_llama):
    r = CliRunner().invoke(cli, ["build", str(docs), "-o", str(tmp_path / "o"), "--method", "compactor",
                                 "--keep", "auto", "--model", str(tiny_llama), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "calibrated keep (tolerance 0.1) over 3 document(s)" in r.output
    r = CliRunner().invoke(cli, ["build", str(docs), "-o", str(tmp_path / "o2"), "--keep", "auto", "--tolerance",
                                 "0.2", "--model", str(tiny_llama), "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert all(e["calibration"]["tolerance"] == 0.2 for e in json.loads(r.output)["entries"])


@pytest.mark.parametrize("keep, tolerance, match", [
    ("0.5", 0.1, "applies to --keep auto only"),
    ("auto", -1.0, "finite number > 0"),
    ("auto", "x", "tolerance must be a number"),
    ("most", None, "or 'auto'"),
])
def test_bad_keep_or_tolerance(tmp_path, docs, tiny_llama, keep, tolerance, match):
    with pytest.raises(ConfigError, match=match):
        kvforge.build(docs, tmp_path / "out", method="compactor", keep=keep, tolerance=tolerance,
                      model=tiny_llama, progress=False)
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_calibration(tmp_path, docs, tiny_llama):
    kvforge.build(docs / "pass.txt", tmp_path / "o", keep="auto", model=tiny_llama, progress=False)
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "o" / "pass.kv")])
    assert r.exit_code == 0, r.output
    assert "calibrated keep auto, tolerance 0.1" in r.output and "trace keep: KL" in r.output


def test_probe_rows_predict_the_answers(lm, docs):
    ids = lm.encode_document((docs / "del.txt").read_text())
    probes = make_probes(lm, ids, CalibrationConfig(probes=3, cue=8, target=10))
    q, a = probes[1]
    seq, rows = q + a, answer_rows(q, a)
    assert len(rows) == 10
    assert [seq[r + 1] for r in rows] == a  # row r predicts token r + 1
    # the selected rows are exactly those rows of the full logits
    from kvforge.methods.base import keep_all
    from kvforge.runtime import Doc
    kv = prefill(lm.model, ids)
    doc = Doc.from_kv(lm, keep_all(kv), len(ids))
    full = doc.continuation_logits(seq)
    assert torch.allclose(doc.continuation_logits(seq, rows=rows), full[rows], atol=1e-4)
