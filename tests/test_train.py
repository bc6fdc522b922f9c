"""kvforge train distill and the distill method, on the tiny model (real optimizer, real peft, real builds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="kvforge train needs peft: pip install 'kvforge[train]'")

from conftest import kill_at_first_checkpoint, write_training_corpus  # noqa: E402
from kvforge.errors import ConfigError, IncompatibleModelError, InputError, KvforgeError, TrainingError
from kvforge.train import distill
from kvforge.train.adapter import load_adapter
from kvforge.train.data import ExampleMaker, make_windows
from kvforge.train.loop import TrainConfig
from kvforge.train.student import (install, mass_beta, select_entries, select_per_head, select_tokens, student_loss,
                                   teacher_pass)

# the entry scorer's phase, kept short on the tiny model: replay targets of 4 windows, 3 epochs of fit
FAST = dict(targets=4, scorer_epochs=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_training_corpus(tmp_path_factory.mktemp("train") / "corpus")


def _held_loss(adapter, lm, examples, fit: str) -> tuple[float, float]:
    """The KL and ranking parts of the loss, summed over ``examples``."""
    dm, _ = load_adapter(adapter, lm, trainable=True)
    install(dm.model)
    with torch.no_grad():
        parts = [student_loss(dm, ex, teacher_pass(dm, ex), keep, 0.1, fit)[1] for ex, keep in examples]
    return sum(p["kl"] for p in parts), sum(p["rank"] for p in parts)


# "build" (the default) is not here: on the tiny model the value refit alone leaves a KL of ~0.014 over these
# examples, too little for the LoRA to lower measurably; its training runs in every test that trains with the
# defaults (tiny_adapter), and test_the_training_beta_and_refit_are_the_builds checks its attention.
@pytest.mark.parametrize("scorer,fit", [("entry", "match"), ("token", "build"), ("entry", "head")])
def test_training_lowers_the_loss_on_fixed_examples(tiny_llama, corpus, tmp_path, scorer, fit):
    from kvforge.model import load_model

    lm = load_model(tiny_llama)
    first = tmp_path / "first"
    common = dict(model=str(tiny_llama), context=128, scorer=scorer, fit=fit, progress=False, **FAST)
    distill([str(corpus)], first, steps=1, lr=1e-9, **common)
    trained = tmp_path / "trained"
    distill([str(corpus)], trained, steps=40, lr=3e-3, reuse=4, **common)
    windows, _ = make_windows(lm, [(p.name, p.read_text()) for p in sorted(corpus.iterdir())], 128)
    make = ExampleMaker(lm, windows, seed=0)
    examples = [(make(i), keep) for i in range(8) for keep in (0.1, 0.3)]  # the examples the run trained on
    before, after = _held_loss(first, lm, examples, fit), _held_loss(trained, lm, examples, fit)
    # the tiny random model barely depends on its context (KL ~0.002 per example), so the margin is modest;
    # the token scorer learns in the same loss (its ranking term), the entry scorer before it (fixed here)
    assert after[0] < 0.95 * before[0], (before, after)
    assert after[1] < before[1] if scorer == "token" else after[1] == before[1] == 0.0, (before, after)
    record = json.loads((trained / "kvforge-distill.json").read_text())["training"]
    assert record["steps_run"] == 40 and record["final_loss"] is not None
    assert (trained / "loss.png").stat().st_size > 1000
    assert len((trained / "losses.jsonl").read_text().splitlines()) == 40


def test_a_killed_run_resumes_into_the_same_adapter(tiny_llama, corpus, tmp_path):
    args = dict(model=str(tiny_llama), steps=60, context=128, checkpoint_every=5, progress=False, **FAST)
    whole = tmp_path / "whole"
    distill([str(corpus)], whole, **args)
    killed = tmp_path / "killed"
    kill_at_first_checkpoint("distill", corpus, killed, args, "kvforge-distill.json")
    with pytest.raises(ConfigError, match="--resume"):
        distill([str(corpus)], killed, **args)
    distill([str(corpus)], killed, resume=True, **args)
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "scorer.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainingError, match="other settings.*context: 128 there, 160 now"):
        distill([str(corpus)], killed, resume=True, **(args | {"context": 160}))


def test_adapter_round_trip_and_foreign_model_refusal(tiny_llama, other_llama, tiny_adapter):
    from kvforge.model import load_model

    lm = load_model(tiny_llama)
    dm, digest = load_adapter(tiny_adapter, lm, trainable=True)
    again, digest2 = load_adapter(tiny_adapter, lm, trainable=True)
    assert digest == digest2
    for k, v in dm.state().items():
        assert torch.equal(v, again.state()[k]), k
    assert any(v.abs().sum() > 0 for k, v in dm.state().items() if "lora_B" in k)  # trained, not the zero init
    with pytest.raises(IncompatibleModelError, match="trained on"):
        load_adapter(tiny_adapter, load_model(other_llama))


@pytest.mark.parametrize("lo_hi", [(0.0, 0.5), (0.2, 1.5), (0.4, 0.2), (-0.1, 0.3)])
def test_keep_range_is_checked(lo_hi):
    with pytest.raises(ConfigError, match="keep-range"):
        TrainConfig(keep_range=lo_hi)


def test_keeps_stay_in_range_and_selection_keeps_the_budget():
    cfg = TrainConfig(keep_range=(0.05, 0.2))
    keeps = [cfg.keep_at(s) for s in range(500)]
    assert min(keeps) >= 0.05 and max(keeps) <= 0.2 and max(keeps) - min(keeps) > 0.1
    scores = torch.randn(300)
    for k in (1, 12, 30, 299):
        kept = select_tokens(scores, k, sink=4, recent=4)
        assert int(kept.sum()) == max(k, 8) and kept[:4].all() and kept[-4:].all()


def test_entry_selection_mass_beta_and_routes():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 40, generator=g)
    for total in (1, 60, 100, 240):
        kept = select_entries(scores, total, sink=2, recent=3)
        assert int(kept.sum()) == max(total, 3 * 2 * 5) and kept[:, :, :2].all() and kept[:, :, -3:].all()
    kept = select_entries(scores, 60, sink=2, recent=3)
    free = kept[:, :, 2:-3]
    assert free.sum(dim=2).unique().numel() > 1  # heads get ragged shares of one top-k
    counts = torch.tensor([[5, 9], [12, 6], [7, 8]])
    assert torch.equal(select_per_head(scores, counts, sink=2, recent=3).sum(dim=2), counts)
    q, k = torch.randn(4, 6, 8, generator=g), torch.randn(2, 40, 8, generator=g)  # 4 query heads over 2 KV heads
    assert torch.equal(mass_beta(q, k, torch.ones(2, 40, dtype=torch.bool), 0.3), torch.zeros(2))
    half = torch.zeros(2, 40, dtype=torch.bool)
    half[:, ::2] = True
    beta = mass_beta(q, k, half, 0.3)
    logits = torch.einsum("hrd,htd->hrt", q, k.repeat_interleave(2, dim=0)) * 0.3  # explicit, query head by head
    explicit = (logits.logsumexp(-1) - logits[:, :, ::2].logsumexp(-1)).view(2, 2, 6).mean(dim=(1, 2))
    torch.testing.assert_close(beta, explicit)
    assert (beta > 0).all()


def test_the_entry_scorer_fits_the_replay_and_its_targets_resume(tiny_llama, corpus, tmp_path, monkeypatch):
    from kvforge.model import load_model
    from kvforge.train import targets as T
    from kvforge.train.adapter import DistillModel, default_config

    lm = load_model(tiny_llama)
    windows, _ = make_windows(lm, [(p.name, p.read_text()) for p in sorted(corpus.iterdir())], 128)
    make = ExampleMaker(lm, windows, seed=0)
    items = T.compute_targets(lm, make, 6, 1, 0, tmp_path, progress=False)
    L, H = lm.info.num_layers, lm.info.num_kv_heads
    assert [tuple(x["target"].shape) for x in items] == [(L, H, 128)] * 6 and (tmp_path / "targets.pt").exists()
    monkeypatch.setattr(T, "window_target", lambda *a: pytest.fail("a cached window was computed again"))
    again = T.compute_targets(lm, make, 6, 1, 0, tmp_path, progress=False)
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(items, again))
    dm = DistillModel(lm, default_config(lm), trainable=True)
    untrained = [dm.scorer(x["hidden"]).detach() for x in items]
    record = T.fit_scorer(dm.scorer, items, epochs=30, lr=3e-3, seed=0, sink=4, recent=4, progress=False)
    mse = [float(((p - x["target"].float()) ** 2).mean()) for p, x in zip(untrained, items)]
    assert record["train_mse"] < 0.5 * sum(mse[:-1]) / 5, (record, mse)
    assert set(record["validation_recall"]) == {"0.05", "0.1", "0.25"}


def test_a_format_1_adapter_still_reads_as_a_token_scorer(tiny_llama, corpus, tmp_path):
    from kvforge.model import load_model
    from kvforge.train.adapter import CONFIG_FILE

    out = tmp_path / "v1"
    distill([str(corpus)], out, model=str(tiny_llama), steps=2, context=128, scorer="token", progress=False)
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["format_version"] = 1
    for key in ("scorer", "layers", "heads", "reference"):
        del meta["config"][key]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    dm, _ = load_adapter(out, load_model(tiny_llama))
    assert dm.cfg.scorer == "token" and dm.scorer.shape is None
    meta["format_version"] = 3
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    from kvforge.errors import FormatError

    with pytest.raises(FormatError, match="version"):
        load_adapter(out, load_model(tiny_llama))


def test_bad_input_is_refused_before_training(tiny_llama, corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KvforgeError):
        distill([str(empty)], tmp_path / "a", model=str(tiny_llama), steps=1, progress=False)
    short = tmp_path / "short"
    short.mkdir()
    (short / "tiny.txt").write_text("A short note about nothing much.")
    with pytest.raises(InputError, match="training context"):
        distill([str(short)], tmp_path / "b", model=str(tiny_llama), steps=1, context=128, progress=False)
    with pytest.raises(ConfigError, match="not a kvforge distill adapter"):
        distill([str(corpus)], tmp_path / "c", model=str(tiny_llama), steps=1, context=128, init=str(tmp_path),
                progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_fine_tune_keeps_the_init_adapters_shape(tiny_llama, tiny_adapter, corpus, tmp_path):
    for asked in ({"rank": 16}, {"scorer": "token"}):
        with pytest.raises(ConfigError, match=f"keeps the adapter's shape.*{next(iter(asked))}"):
            distill([str(corpus)], tmp_path / "d", model=str(tiny_llama), steps=1, context=128,
                    init=str(tiny_adapter), progress=False, **asked)
    assert not (tmp_path / "d").exists()
    run = distill([str(corpus)], tmp_path / "e", model=str(tiny_llama), steps=1, context=128, targets=3,
                  scorer_epochs=1, init=str(tiny_adapter), rank=8, progress=False)
    assert run["settings"]["rank"] == 8 and run["settings"]["scorer"] == "entry"


def test_targets_0_keeps_the_init_adapters_scorer_and_trains_the_lora(tiny_llama, tiny_adapter, corpus, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(ConfigError, match="--targets 0 keeps the --init adapter's scorer"):
        distill([str(corpus)], tmp_path / "f", model=str(tiny_llama), steps=1, context=128, targets=0, progress=False)
    with pytest.raises(ConfigError, match="--fit 'mass'"):
        distill([str(corpus)], tmp_path / "f", model=str(tiny_llama), steps=1, context=128, fit="mass",
                progress=False)
    assert not (tmp_path / "f").exists()
    run = distill([str(corpus)], tmp_path / "g", model=str(tiny_llama), steps=3, context=128, targets=0, fit="match",
                  lr=3e-3, init=str(tiny_adapter), progress=False)
    init_fit = json.loads((Path(tiny_adapter) / "kvforge-distill.json").read_text())["training"]["scorer_fit"]
    assert run["scorer_fit"] == {"kept_from": run["init"], **init_fit} and run["settings"]["fit"] == "match"
    for name, same in (("scorer.safetensors", True), ("adapter_model.safetensors", False)):
        before, after = load_file(Path(tiny_adapter) / name), load_file(tmp_path / "g" / name)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before) == same, name  # the init's scorer; a new LoRA


def test_the_training_beta_and_refit_are_the_builds(tiny_llama):
    from kvforge.methods.base import gather
    from kvforge.methods.distill import MATCH_SAMPLES, REFIT_RIDGE
    from kvforge.methods.fit import reference
    from kvforge.methods.select_fit import matched_beta, refit_values
    from kvforge.model import load_model
    from kvforge.prefill import attention_scale, prefill
    from kvforge.train.student import matched_bias, reference_queries, refit_kept_values

    lm = load_model(str(tiny_llama))
    ids = lm.encode_document("The assert statement checks a condition and raises AssertionError. " * 30)
    kv = prefill(lm.model, ids, queries=True)
    L, H, T = kv.shape[:3]
    assert T > MATCH_SAMPLES  # the reference is a sample, the same one in both
    kept = select_entries(torch.randn(L, H, T, generator=torch.Generator().manual_seed(0)), L * H * T // 5, 4, 4)
    out = gather(kv, kept)
    out.beta = matched_beta(kv, out, reference(kv, lm.model, MATCH_SAMPLES, "end", 0))
    built = refit_values(kv, out, reference(kv, lm.model, MATCH_SAMPLES, "end", 0), REFIT_RIDGE)
    scale = attention_scale(lm.model, kv.keys.shape[-1])
    for layer in range(L):
        ref = reference_queries(kv.queries[layer], H, lm.model)
        bias = matched_bias(ref, kv.keys[layer], kept[layer], scale)
        assert torch.isinf(bias[~kept[layer]]).all()
        torch.testing.assert_close(bias[kept[layer]], out.beta[layer], atol=1e-4, rtol=1e-4)
        values = kv.values[layer].clone().requires_grad_()
        fitted = refit_kept_values(ref, kv.keys[layer], values, bias, scale, REFIT_RIDGE)  # (H, T, D)
        torch.testing.assert_close(fitted[kept[layer]].detach(), built.values[layer].float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(fitted[~kept[layer]].detach(), kv.values[layer][~kept[layer]])  # not read
        fitted[kept[layer]].sum().backward()  # the student's gradient reaches the document's values
        assert values.grad.abs().sum() > 0


def test_a_loss_that_becomes_nan_stops_at_that_step_and_keeps_the_checkpoint(tiny_llama, corpus, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="the loss became") as info:
        distill([str(corpus)], out, model=str(tiny_llama), steps=50, context=128, lr=1e30, warmup=1,
                checkpoint_every=1, progress=False, scorer="token")  # its scorer's weights overflow first
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in state["adapter"].values())
    assert f"step {state['step']}" in str(info.value)
    assert not (out / "kvforge-distill.json").exists()  # no adapter from a broken run


def test_distill_builds_artifacts_that_answer(tiny_llama, tiny_adapter, docs, tmp_path):
    import kvforge
    from kvforge.artifact import read as read_artifact

    spec = f"distill:adapter={tiny_adapter}"
    for allocate in ("uniform", "pilot"):
        out = tmp_path / allocate
        kvforge.build([docs], out, method=spec, keep=0.25, model=tiny_llama, allocate=allocate, progress=False)
        art = read_artifact(out / "assert.kv")
        assert art.kv.beta is not None
        assert 0.2 <= art.manifest["compression"]["keep_achieved"] <= 0.3
        cfg = art.manifest["compression"]["method"]["config"]
        assert len(cfg["adapter_sha256"]) == 64 and cfg["adapter_config"]["first_layer"] == 1
        doc = kvforge.load(out / "assert.kv", model=tiny_llama)
        assert isinstance(doc.answer("What does assert do?", max_new_tokens=4), str)
    plain = tmp_path / "refit0"  # the value refit (on by default) changes values only
    kvforge.build([docs], plain, method=spec + ":refit=0", keep=0.25, model=tiny_llama, progress=False)
    fitted, unfitted = read_artifact(tmp_path / "uniform" / "assert.kv").kv, read_artifact(plain / "assert.kv").kv
    for layer in range(len(fitted.keys)):
        assert torch.equal(fitted.positions[layer], unfitted.positions[layer])
        assert torch.equal(fitted.keys[layer], unfitted.keys[layer])
    assert any(not torch.equal(a, b) for a, b in zip(fitted.values, unfitted.values))
    per_head = tmp_path / "match0"  # one mass beta per head instead of the default's per-entry one, the same entries
    kvforge.build([docs], per_head, method=spec + ":match=0", keep=0.25, model=tiny_llama, progress=False)
    head = read_artifact(per_head / "assert.kv").kv
    assert all(torch.equal(a, b) for a, b in zip(head.positions, fitted.positions))
    spans = [(layer, o[h], o[h + 1]) for layer in range(len(fitted.keys))
             for o in [fitted.layer_offsets(layer)] for h in range(len(o) - 1)]  # (layer, start, end) of every head
    assert all(len(set(head.beta[layer][a:b].tolist())) <= 1 for layer, a, b in spans)
    assert any(len(set(fitted.beta[layer][a:b].tolist())) > 1 for layer, a, b in spans)
    kvforge.build([docs], tmp_path / "nobeta", method=spec + ":beta=0", keep=0.25, model=tiny_llama, progress=False)
    assert read_artifact(tmp_path / "nobeta" / "assert.kv").kv.beta is None
    out = tmp_path / "auto"
    kvforge.build([docs], out, method=spec, keep="auto", model=tiny_llama, progress=False)
    assert (out / "assert.kv").exists()


def test_the_one_pass_build_equals_scoring_then_the_adapted_prefill(tiny_llama, tiny_adapter):
    from kvforge.methods import Budget, CompressionContext, get_method
    from kvforge.model import load_model
    from kvforge.prefill import prefill

    lm = load_model(str(tiny_llama))
    ids = lm.encode_document("The assert statement checks a condition and raises AssertionError. " * 12)
    method, ctx, budget = get_method("distill", adapter=str(tiny_adapter)), CompressionContext(model=lm), Budget(0.25)
    one = method.compress_ids(lm, ids, budget, ctx)  # scored inside the adapted prefill
    two = method.compress(prefill(lm.model, ids), budget, ctx)  # the scorer's own pass, then the adapted prefill
    assert torch.equal(one.lengths, two.lengths)
    for layer in range(len(one.keys)):
        assert torch.equal(one.positions[layer], two.positions[layer])
        torch.testing.assert_close(one.keys[layer], two.keys[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one.values[layer], two.values[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one.beta[layer], two.beta[layer], atol=1e-4, rtol=1e-4)


def test_a_build_refuses_an_adapter_other_than_the_one_asked_for(tiny_llama, tiny_adapter, docs, tmp_path):
    import kvforge

    with pytest.raises(ConfigError, match="not the"):
        kvforge.build([docs], tmp_path / "x", method=f"distill:adapter={tiny_adapter}:adapter_sha256={'0' * 64}",
                      keep=0.25, model=tiny_llama, progress=False)


def test_the_runtime_never_loads_peft_or_the_training_side():
    code = "import sys, kvforge.runtime, kvforge.serve; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if m == "peft" or m.startswith(("peft.", "kvforge.train"))] == []


def test_the_cli_trains_and_refuses_clearly(tiny_llama, corpus, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from kvforge.cli import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["train", "distill", str(corpus), "-o", str(out), "--model", str(tiny_llama),
                                      "--steps", "2", "--context", "128", "--targets", "3", "--json",
                                      "--compute-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["steps_run"] == 2 and record["compute_dtype"] == "bfloat16"
    for name in ("adapter_model.safetensors", "scorer.safetensors"):  # the model computed in bfloat16, not these
        assert {v.dtype for v in load_file(str(out / name)).values()} == {torch.float32}, name
    bad = CliRunner().invoke(cli, ["train", "distill", str(corpus), "-o", str(tmp_path / "bad"), "--model",
                                   str(tiny_llama), "--keep-range", "0.5,2"])
    assert bad.exit_code == 2 and "keep-range" in bad.output
    unknown = CliRunner().invoke(cli, ["train", "distill", str(corpus), "-o", str(tmp_path / "u"), "--init", "nowhere"])
    assert unknown.exit_code == 2 and "not a kvforge distill adapter" in unknown.output


@pytest.mark.real
def test_the_shipped_adapter_loads_and_builds_with_the_embedded_model(tmp_path):
    from click.testing import CliRunner

    from kvforge.cli import cli
    from kvforge.train.adapter import resolve_adapter

    path = resolve_adapter("shipped")
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 * 2**20  # a few MB inside the package
    examples = Path(__file__).parent.parent / "examples" / "corpus"
    out = tmp_path / "lib"
    built = CliRunner().invoke(cli, ["build", str(examples / "for-statement.txt"), "-o", str(out), "--method", "distill",
                                     "--keep", "0.1", "--no-progress", "--json"])
    assert built.exit_code == 0, built.output
    asked = CliRunner().invoke(cli, ["query", str(out / "for-statement.kv"), "What does a for statement iterate over?",
                                     "--max-new-tokens", "16", "--json"])
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.output)["answer"].strip()


@pytest.mark.parametrize("command", ["distill", "cat"])
def test_train_help_states_the_configs_defaults(command):
    """The CLI imports no torch to print --help, so its defaults are written out; they must be the config's."""
    import dataclasses
    import re

    from kvforge import cli_train
    from kvforge.train.cat_train import CatConfig
    from kvforge.train.data import parse_mix

    config = {"distill": TrainConfig, "cat": CatConfig}[command]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config)}
    checked = 0
    for param in getattr(cli_train, command).params:
        found = re.search(r"\[default: ([^\]]+)\]", getattr(param, "help", None) or "")
        if not found or param.name not in defaults:
            continue
        stated, actual = found.group(1), defaults[param.name]
        if param.name == "mix":
            assert parse_mix(stated) == actual, param.name
        elif isinstance(actual, tuple):
            assert tuple(float(x) for x in stated.split(",")) == actual, param.name
        elif isinstance(actual, (int, float)) and not isinstance(actual, bool):
            assert float(stated) == actual, param.name
        else:
            assert stated == actual, param.name
        checked += 1
    assert checked >= 5
    if command == "cat":  # the policies the CLI offers are the trainer's
        from kvforge.train.cat_policy import POLICIES

        policy = next(p for p in cli_train.cat.params if p.name == "policy")
        assert tuple(policy.type.choices) == POLICIES
