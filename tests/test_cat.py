"""kvforge train cat and CAT models, on the tiny model (real optimizer, real peft, real builds and queries)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="kvforge train needs peft: pip install 'kvforge[train]'")

from conftest import kill_at_first_checkpoint, write_training_corpus  # noqa: E402
from kvforge import devices
from kvforge.errors import ConfigError, IncompatibleModelError, InputError, TrainingError
from kvforge.train import cat
from kvforge.train.cat_train import CatConfig, CatStudent, step_loss
from kvforge.methods.base import CompressionContext
from kvforge.methods.compactor import Compactor
from kvforge.train import cat_policy
from kvforge.train.cat_policy import POLICIES, Pass, budget_mask, forward
from kvforge.train.data import make_windows

ARGS = dict(steps=3, context=128, checkpoint_every=1, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_training_corpus(tmp_path_factory.mktemp("cat") / "corpus")


@pytest.fixture(scope="module")
def cat_model(tiny_llama, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cat-model") / "model"
    cat([str(corpus)], out, model=str(tiny_llama), steps=6, context=128, lr=3e-3, progress=False)
    return out


def _windows(lm, corpus, context=128):
    windows, _ = make_windows(lm, [(p.name, p.read_text()) for p in sorted(corpus.iterdir())], context)
    return [lm.encode_document("") + w.text_ids for w in windows]


def test_budget_mask_keeps_exactly_k_per_head_with_the_sink():
    g = torch.Generator().manual_seed(0)
    for k in (4, 9, 40, 100):
        scores = torch.randn(3, 40, generator=g)
        mask = budget_mask(scores, k, sink=4)
        assert mask.sum(dim=1).tolist() == [min(k, 40)] * 3 and bool(mask[:, :4].all())
        free = scores.masked_fill(mask, -torch.inf)[:, 4:].amax(dim=1)  # every dropped slot scores below the kept
        kept = scores.masked_fill(~mask, torch.inf)[:, 4:].amin(dim=1)
        assert bool((free <= kept).all()) or k >= 40


def test_budget_mask_with_layer_scope_keeps_k_per_head_on_average_ragged_by_score():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g)
    scores[0] += 2.0  # one head scores higher throughout: it gets more of the layer's budget
    for k in (4, 9, 20, 40):
        mask = budget_mask(scores, k, sink=4, scope="layer")
        counts = mask.sum(dim=1)
        assert int(counts.sum()) == 3 * k and bool(mask[:, :4].all())
        free = scores.masked_fill(mask, -torch.inf)[:, 4:].max()  # one ranking over the layer's heads
        kept = scores.masked_fill(~mask, torch.inf)[:, 4:].min()
        assert float(free) <= float(kept) or k == 40
        if 4 < k < 40:
            assert counts[0] > k > counts[1:].min()


@pytest.mark.parametrize("policy,scope",
                         [(p, "head") for p in POLICIES] + [("compactor", "layer"), ("random", "layer")])
def test_every_policy_keeps_the_asked_budget_in_every_layer_and_head(tiny_llama, corpus, policy, scope):
    from kvforge.model import load_model
    from kvforge.prefill import prefill

    lm = load_model(tiny_llama)
    st = CatStudent(lm, CatConfig(policy=policy, context=128))
    ids = _windows(lm, corpus)[0]
    T, n, k = len(ids), 32, 21
    record: list = []
    with torch.no_grad(), st.peft.disable_adapter():
        forward(st.model, Pass(T, T - n, k, policy, teacher=True, record=record), torch.tensor([ids]))
    sparse = Pass(T, T - n, k, policy, teacher=False, scope=scope, record=record, router=st.router,
                  generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(T), torch.arange(T - n, T)])[None]
    with torch.no_grad():
        forward(st.model, sparse, torch.tensor([ids + ids[T - n:]]), positions)
    assert cat_policy._active is None
    L, H = lm.info.num_layers, lm.info.num_kv_heads
    assert len(sparse.masks) == L and len(record) == L
    for mask in sparse.masks:
        assert tuple(mask.shape) == (H, T - n) and int(mask.sum()) == k * H and bool(mask[:, :4].all())
        if scope == "head":
            assert mask.sum(dim=1).tolist() == [k] * H
    if policy == "attention":  # the slots the dense suffix attended to most
        for layer in range(L):
            top = record[layer][:, 4:].topk(k - 4, dim=1).indices + 4
            assert bool(sparse.masks[layer].gather(1, top).all())
    if policy == "compactor":  # the slots kvforge's compactor keeps of the same prefix, on the same model
        kv = prefill(st.model, ids[:T - n], queries=True, pre_rope_keys=True)
        scores = Compactor().scorer(kv, CompressionContext(keep=k / (T - n)))(k / (T - n))
        for layer in range(L):
            assert torch.equal(sparse.masks[layer], budget_mask(scores[layer], k, sink=4, scope=scope)), layer


@pytest.mark.parametrize("scope", ["layer", "head"])
def test_the_straight_through_selection_keeps_the_hard_forward_and_gives_the_scores_a_gradient(tiny_llama, corpus,
                                                                                             scope, monkeypatch):
    """select_temp > 0: the same masks and loss as the plain compactor selection, and a gradient that differs
    from the plain one (it also flows through the compactor's scores); the weights equal the mask exactly."""
    from kvforge.model import load_model
    from kvforge.train.cat_policy import straight_through

    lm = load_model(tiny_llama)
    ids = _windows(lm, corpus)[0]
    captured: list = []  # every layer's (mask, bias, weights), as the attention got them
    original = Pass.slots

    def spy(self, *args):
        captured.append(original(self, *args))
        return captured[-1]

    monkeypatch.setattr(Pass, "slots", spy)
    loss, grads, masks = {}, {}, {}
    for temp in (0.0, 0.25):
        st = CatStudent(lm, CatConfig(policy="compactor", context=128, scope=scope, select_temp=temp))
        with torch.no_grad():
            for p in st.parameters():  # LoRA B starts at zero; make A's gradient depend on the scores too
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        captured.clear()
        value, _ = step_loss(st, ids, 32, 0.2, step=0)
        value.backward()
        loss[temp] = float(value.detach())
        grads[temp] = torch.cat([p.grad.flatten() for p in st.parameters()])
        masks[temp] = [m for m, _, _ in captured]
        weights = [w for _, _, w in captured]
        if temp == 0:
            assert all(w is None for w in weights)
        else:
            assert all(w is not None and w.requires_grad and torch.equal(w.detach(), m.float())
                       for m, _, w in captured)
    assert all(torch.equal(a, b) for a, b in zip(masks[0.0], masks[0.25]))
    assert loss[0.25] == pytest.approx(loss[0.0], rel=1e-5)
    assert bool(torch.isfinite(grads[0.25]).all())
    assert float((grads[0.25] - grads[0.0]).norm()) > 1e-3 * float(grads[0.0].norm())
    # the weights' gradient is the sigmoid's around the threshold: largest next to it, none for the protected
    z = torch.tensor([[float("inf"), 3.0, 1.1, 0.9, -2.0]], requires_grad=True)
    w = straight_through(z, torch.tensor([[True, True, True, False, False]]), 0.5, scope)
    assert w.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    w.sum().backward()
    g = z.grad[0]
    assert g[0] == 0 and g[2] > g[1] > g[4] > 0 and g[3] > g[4]
    z.grad = None  # select_grad scales that gradient and nothing else
    w = straight_through(z, torch.tensor([[True, True, True, False, False]]), 0.5, scope, scale=0.25)
    assert w.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    w.sum().backward()
    assert torch.allclose(z.grad[0], 0.25 * g)
    with pytest.raises(ConfigError, match="compactor"):
        CatConfig(policy="router", select_temp=0.25)
    with pytest.raises(ConfigError, match="select_temp -1.0"):
        CatConfig(policy="compactor", select_temp=-1.0)
    with pytest.raises(ConfigError, match="select_grad"):
        CatConfig(policy="compactor", select_temp=0.25, select_grad=float("nan"))
    with pytest.raises(ConfigError, match="select_grad 0.3 does nothing without select_temp"):
        CatConfig(policy="compactor", select_grad=0.3)  # a scale with no learned selection to scale


def test_the_sparse_copy_at_keep_one_predicts_as_the_dense_pass(tiny_llama, corpus):
    """With every prefix slot kept (and no bias), the suffix copy is the dense suffix: KL 0 at the start."""
    from kvforge.model import load_model

    lm = load_model(tiny_llama)
    st = CatStudent(lm, CatConfig(policy="random", context=128))
    ids = _windows(lm, corpus)[1]
    with torch.no_grad():
        _, parts = step_loss(st, ids, 32, 1.0, step=0)
    assert parts["kl"] < 1e-5 and parts["kept"] == 1.0
    with torch.no_grad():
        _, sparse = step_loss(st, ids, 32, 0.1, step=0)
    assert sparse["kl"] > 100 * max(parts["kl"], 1e-9)


def test_the_self_teacher_is_the_students_own_dense_pass(tiny_llama, corpus):
    """Once the LoRA has moved the model off the base, the copy kept whole still matches the model's own
    dense pass (KL 0 with ``teacher="self"``) but no longer the base's; compressed, both are far off."""
    from kvforge.model import load_model

    lm = load_model(tiny_llama)
    ids = _windows(lm, corpus)[1]
    parts = {}
    for teacher in ("base", "self"):
        st = CatStudent(lm, CatConfig(policy="compactor", context=128, teacher=teacher))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, w in st.peft.named_parameters():
                if "lora_B" in name:
                    w.copy_(0.05 * torch.randn(w.shape, generator=g))
            parts[teacher] = [step_loss(st, ids, 32, keep, step=0)[1]["kl"] for keep in (1.0, 0.1)]
    assert parts["self"][0] < 1e-5 < 1e-3 < parts["base"][0], parts
    assert parts["self"][1] > 100 * max(parts["self"][0], 1e-9), parts
    # a run from before the setting (its checkpoint has no "teacher") resumes as the base teacher
    assert "teacher" not in CatConfig().resumable() and CatConfig(teacher="self").resumable()["teacher"] == "self"
    assert "scope" not in CatConfig().resumable() and CatConfig(scope="layer").resumable()["scope"] == "layer"


def test_a_recall_probe_repeats_the_prefix_and_is_lossless_when_everything_is_kept(tiny_llama, corpus):
    """A recall step's suffix is a span of its own prefix; kept whole, the copy is the dense pass (KL 0)."""
    from kvforge.model import load_model

    lm = load_model(tiny_llama)
    st = CatStudent(lm, CatConfig(policy="attention", context=128))
    ids = _windows(lm, corpus)[1]
    with torch.no_grad():
        _, full = step_loss(st, ids, 32, 1.0, step=0, recall=0.5)
        _, sparse = step_loss(st, ids, 32, 0.1, step=0, recall=0.5)
    assert full["recall"] and full["kl"] < 1e-5
    assert sparse["kl"] > 100 * max(full["kl"], 1e-9)
    plain, probes = CatConfig(), CatConfig(recall=0.5)
    draws = [(plain.draw(i, 50), probes.draw(i, 50)) for i in range(200)]
    assert all(a[:3] == b[:3] and a[3] is None for a, b in draws)  # the same windows, splits and keeps
    assert 70 < sum(b[3] is not None for _, b in draws) < 130
    with pytest.raises(ConfigError, match="--recall"):
        CatConfig(recall=1.5)


@pytest.mark.parametrize("policy, ntp_weight, teacher", [("attention", 0.0, "base"), ("router", 0.5, "base"),
                                                         ("random", 0.0, "self")])
def test_training_lowers_the_loss_on_a_fixed_window(tiny_llama, tmp_path, policy, ntp_weight, teacher):
    """One short document (two windows), one keep, one split: the loss the run optimizes goes down on it.
    Without the next-token term that is the KL itself; with it, the random model's next-token loss
    dominates (about log V) and the total is what falls."""
    import pydoc_data.topics as topics

    from kvforge.model import load_model

    corpus = tmp_path / "one"
    corpus.mkdir()
    (corpus / "assert.txt").write_text(topics.topics["assert"][:700])
    lm = load_model(tiny_llama)
    settings = dict(policy=policy, context=128, ntp_weight=ntp_weight, keep_range=(0.2, 0.2), suffix=(32, 32),
                    teacher=teacher)
    run = tmp_path / "run"
    cat([str(corpus)], run, model=str(tiny_llama), steps=20, lr=3e-3, checkpoint_every=20, progress=False, **settings)
    cfg = CatConfig(steps=20, **settings)
    window = _windows(lm, corpus)[0]

    def held(state):
        st = CatStudent(lm, cfg)
        if state is not None:
            st.load_state(state)
        with torch.no_grad():
            return step_loss(st, window, 32, 0.2, step=0)[1]

    before, after = held(None), held(torch.load(run / "checkpoint.pt", weights_only=False)["weights"])
    assert after["loss"] < (0.5 if ntp_weight == 0 else 0.97) * before["loss"], (before, after)
    record = json.loads((run / "kvforge-cat.json").read_text())["training"]
    assert record["steps_run"] == 20 and record["final_ntp"] is not None
    assert (run / "loss.png").stat().st_size > 1000 and len((run / "losses.jsonl").read_text().splitlines()) == 20


def test_the_cat_model_loads_as_the_merged_student_and_has_its_own_identity(tiny_llama, cat_model):
    from kvforge.model import load_model

    base, merged = load_model(tiny_llama), load_model(cat_model)
    assert merged.info.weights_sha256 != base.info.weights_sha256
    assert merged.info.tokenizer_sha256 == base.info.tokenizer_sha256 and merged.info.source == str(cat_model)
    assert merged.model is not base.model  # the base model the process holds is unchanged
    # the merged weights are the trained student's: same logits as peft's LoRA forward, adapter on
    state = torch.load(cat_model / "checkpoint.pt", weights_only=False)["weights"]
    st = CatStudent(base, CatConfig(context=128))
    st.load_state(state)
    ids = torch.tensor([base.encode_document("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        want = st.model(input_ids=ids).logits
        got = merged.model(input_ids=ids).logits
        plain = base.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)


def test_cat_artifacts_answer_with_the_cat_model_and_are_refused_by_the_base(tiny_llama, cat_model, docs, tmp_path):
    import kvforge

    for model, other in ((cat_model, tiny_llama), (tiny_llama, cat_model)):
        out = tmp_path / Path(model).name
        kvforge.build([docs], out, method="compactor", keep=0.25, model=model, progress=False)
        doc = kvforge.load(out / "assert.kv")  # the artifact's own model, found from its source
        assert isinstance(doc.answer("What does assert do?", max_new_tokens=4), str)
        with pytest.raises(IncompatibleModelError, match="differing fields"):
            kvforge.load(out / "assert.kv", model=other)


def test_a_killed_run_resumes_into_the_same_model(tiny_llama, corpus, tmp_path):
    from safetensors.torch import load_file

    args = dict(model=str(tiny_llama), steps=40, context=128, checkpoint_every=4, progress=False)
    whole = tmp_path / "whole"
    cat([str(corpus)], whole, **args)
    killed = tmp_path / "killed"
    kill_at_first_checkpoint("cat", corpus, killed, args, "kvforge-cat.json")
    with pytest.raises(ConfigError, match="--resume"):
        cat([str(corpus)], killed, **args)
    cat([str(corpus)], killed, resume=True, **args)
    a, b = load_file(str(whole / "delta.safetensors")), load_file(str(killed / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(TrainingError, match="other settings"):
        cat([str(corpus)], killed, resume=True, **(args | {"context": 160}))


def test_a_run_started_from_a_cat_model_continues_it(tiny_llama, cat_model, corpus, tmp_path):
    from kvforge.catmodel import delta_sha256
    from kvforge.model import load_model

    base, merged = load_model(tiny_llama), load_model(cat_model)
    st = CatStudent(base, CatConfig(context=128))
    assert st.start_from(cat_model) == delta_sha256(cat_model)
    ids = torch.tensor([base.encode_document("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():  # the student starts as that CAT model, not as the base
        assert torch.allclose(st.model(input_ids=ids).logits, merged.model(input_ids=ids).logits, atol=1e-4)
    out = tmp_path / "continued"
    record = cat([str(corpus)], out, model=str(tiny_llama), init=str(cat_model), **ARGS)
    assert record["init"] == delta_sha256(cat_model) and record["steps_run"] == 3
    assert record["settings"]["lr"] == 3e-3  # not given: the CAT model's own (the default is 3e-4)
    other = cat([str(corpus)], tmp_path / "other", model=str(tiny_llama), init=str(cat_model), lr=1e-4,
                policy="random", **ARGS)
    assert other["settings"]["lr"] == 1e-4 and other["settings"]["policy"] == "random"  # given: the run's
    fresh = cat([str(corpus)], tmp_path / "fresh", model=str(tiny_llama), **ARGS)
    # from the CAT model's weights, the first step's loss is the CAT model's, not a fresh LoRA's (which is the base)
    first = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()][0]
    assert first["loss"] != json.loads((tmp_path / "fresh" / "losses.jsonl").read_text().splitlines()[0])["loss"]
    assert fresh["init"] is None and load_model(out).info.weights_sha256 != merged.info.weights_sha256


def test_a_killed_run_from_a_cat_model_resumes_with_its_own_command(tiny_llama, cat_model, corpus, tmp_path):
    from safetensors.torch import load_file

    args = dict(model=str(tiny_llama), init=str(cat_model), steps=40, checkpoint_every=4, progress=False)
    whole = tmp_path / "whole"
    cat([str(corpus)], whole, **args)  # the context (128) and the rest as cat_model was trained
    killed = tmp_path / "killed"
    kill_at_first_checkpoint("cat", corpus, killed, args, "kvforge-cat.json")
    with pytest.raises(TrainingError, match="another model"):
        cat([str(corpus)], killed, resume=True, **(args | {"init": str(whole)}))
    record = cat([str(corpus)], killed, resume=True, **args)
    a, b = load_file(str(whole / "delta.safetensors")), load_file(str(killed / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert record["init"] == json.loads((whole / "kvforge-cat.json").read_text())["training"]["init"]


def test_a_bad_init_is_refused_before_training(tiny_llama, cat_model, corpus, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="not a CAT model"):
        cat([str(corpus)], tmp_path / "a", model=str(tiny_llama), init=str(tmp_path / "nowhere"), **ARGS)
    with pytest.raises(ConfigError, match="no checkpoint"):
        cat([str(corpus)], tmp_path / "b", model=str(tiny_llama), init=str(cat_model), resume=True, **ARGS)
    with pytest.raises(ConfigError, match="rank"):
        cat([str(corpus)], tmp_path / "c", model=str(tiny_llama), init=str(cat_model), rank=4, **ARGS)
    other = tmp_path / "other-base"
    shutil.copytree(cat_model, other)
    meta = json.loads((other / "kvforge-cat.json").read_text())
    meta["base"]["weights_sha256"] = "0" * 64  # a CAT model of another base model
    (other / "kvforge-cat.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="trained on"):
        cat([str(corpus)], tmp_path / "d", model=str(tiny_llama), init=str(other), **ARGS)
    assert not any((tmp_path / x).exists() for x in "abcd")  # nothing written


def test_bad_input_is_refused_before_training(tiny_llama, corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .txt/.md documents"):
        cat([str(empty)], tmp_path / "a", model=str(tiny_llama), **ARGS)
    for bad in ({"policy": "oracle"}, {"teacher": "oracle"}, {"scope": "token"}, {"keep_range": (0.0, 0.5)},
                {"keep_range": (0.2, 1.5)}, {"keep_range": (0.5, 0.2)}):
        with pytest.raises(ConfigError):
            cat([str(corpus)], tmp_path / "b", model=str(tiny_llama), **(ARGS | bad))
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short to train on")
    with pytest.raises(InputError, match="context"):
        cat([str(short)], tmp_path / "c", model=str(tiny_llama), **ARGS)
    assert not any((tmp_path / x).exists() for x in "abc")  # nothing written


def test_a_loss_that_becomes_nan_stops_at_that_step_and_keeps_the_checkpoint(tiny_llama, corpus, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="the loss became") as info:
        cat([str(corpus)], out, model=str(tiny_llama), steps=50, context=128, lr=1e30, warmup=1, checkpoint_every=1,
            progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in state["weights"].values())
    assert f"step {state['step']}" in str(info.value)
    assert not (out / "kvforge-cat.json").exists()  # no model from a broken run


def test_a_cat_model_refuses_a_base_whose_weights_changed(tiny_llama, other_llama, cat_model, tmp_path):
    import shutil

    from kvforge.model import load_model

    moved = tmp_path / "cat"
    shutil.copytree(cat_model, moved)
    meta = json.loads((moved / "kvforge-cat.json").read_text())
    meta["base"]["spec"] = str(other_llama)  # same shape, other weights
    (moved / "kvforge-cat.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="retrain"):
        load_model(moved)
    with pytest.raises(ConfigError, match="plain model"):
        cat(["x"], tmp_path / "y", model=str(cat_model), **ARGS)


def test_a_changed_or_missing_delta_is_refused_by_the_loader_and_by_init(tiny_llama, cat_model, corpus, tmp_path):
    import shutil

    from kvforge.errors import FormatError
    from kvforge.model import load_model

    changed = tmp_path / "changed"
    shutil.copytree(cat_model, changed)
    raw = bytearray((changed / "delta.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one byte of the weights
    (changed / "delta.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="does not match the sha256"):
        load_model(changed)
    with pytest.raises(FormatError, match="does not match the sha256"):
        cat([str(corpus)], tmp_path / "a", model=str(tiny_llama), init=str(changed), **ARGS)
    (changed / "delta.safetensors").unlink()
    with pytest.raises(FormatError, match="is missing"):
        load_model(changed)
    assert not (tmp_path / "a").exists()


def test_the_runtime_loads_a_cat_model_without_peft_or_the_training_side(cat_model):
    code = (f"import sys, kvforge.runtime\nfrom kvforge.model import load_model\nload_model({str(cat_model)!r})\n"
            "print(' '.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if m == "peft" or m.startswith(("peft.", "kvforge.train"))] == []


def test_the_cli_trains_and_refuses_clearly(tiny_llama, corpus, tmp_path):
    from click.testing import CliRunner

    from kvforge.cli import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["train", "cat", str(corpus), "-o", str(out), "--model", str(tiny_llama),
                                      "--steps", "2", "--context", "128", "--policy", "random", "--teacher", "self",
                                      "--scope", "layer", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["steps_run"] == 2
    assert record["compute_dtype"] == devices.training_compute_dtype(None, "cpu")  # bfloat16 where the CPU has it
    settings = json.loads((out / "kvforge-cat.json").read_text())["training"]["settings"]
    assert settings["policy"] == "random" and settings["teacher"] == "self" and settings["scope"] == "layer"
    bad = CliRunner().invoke(cli, ["train", "cat", str(corpus), "-o", str(tmp_path / "bad"), "--model",
                                   str(tiny_llama), "--policy", "oracle"])
    assert bad.exit_code == 2 and "oracle" in bad.output
    unknown = CliRunner().invoke(cli, ["train", "cat", str(corpus), "-o", str(tmp_path / "bad"), "--model",
                                       str(tiny_llama), "--init", str(tmp_path / "nowhere")])
    assert unknown.exit_code != 0 and "not a CAT model" in unknown.output and not (tmp_path / "bad").exists()


@pytest.mark.real
def test_the_shipped_cat_model_builds_and_answers_and_is_kept_apart_from_the_base(tmp_path):
    from click.testing import CliRunner

    from kvforge.catmodel import shipped_cat_dir
    from kvforge.cli import cli
    from kvforge.model import load_model

    assert sum(f.stat().st_size for f in shipped_cat_dir().iterdir()) < 8 * 2**20  # a few MB inside the package
    base, merged = load_model("embedded"), load_model("embedded-cat")
    assert merged.info.weights_sha256 != base.info.weights_sha256 and merged.info.source == "embedded-cat"
    examples = Path(__file__).parent.parent / "examples" / "corpus"
    out = tmp_path / "lib"
    built = CliRunner().invoke(cli, ["build", str(examples / "for-statement.txt"), "-o", str(out), "--model",
                                     "embedded-cat", "--keep", "0.1", "--no-progress", "--json"])
    assert built.exit_code == 0, built.output
    asked = CliRunner().invoke(cli, ["query", str(out / "for-statement.kv"), "What does a for statement iterate over?",
                                     "--max-new-tokens", "16", "--json"])  # the artifact's own model: embedded-cat
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.output)["answer"].strip()
    refused = CliRunner().invoke(cli, ["query", str(out / "for-statement.kv"), "What?", "--model", "embedded"])
    assert refused.exit_code != 0 and "differing fields" in refused.output
