"""Devices and compute dtypes: resolution and clear refusals; artifacts that do not depend on where or in
which dtype they were built (on CPU, float32 against bfloat16 both ways)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import kvforge
from kvforge import devices
from kvforge.cli import cli
from kvforge.errors import ConfigError, DeviceError, IncompatibleModelError
from kvforge.model import load_model
from kvforge.runtime import Doc

TEXT = ("The assert statement is a convenient way to insert debugging assertions into a program. "
        "The secret number is 4471. Assignments to __debug__ are illegal. " * 6)
QUESTIONS = ["What is the secret number?", "What is illegal?", "Tell me about assert."]
# bfloat16 keeps 8 bits of mantissa: a tiny model's logits move by up to a few hundredths between dtypes
LOGIT_TOLERANCE = 0.1


def test_auto_is_cpu_here_and_float32_on_cpu(monkeypatch):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    monkeypatch.delenv(devices.DTYPE_ENV, raising=False)
    assert devices.resolve_device(None) == "cpu" == devices.resolve_device("auto")
    assert devices.resolve_compute_dtype("auto", "cpu") == devices.CPU_DEFAULT_DTYPE
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    monkeypatch.setenv(devices.DTYPE_ENV, "bfloat16")
    assert devices.resolve_device(None) == "cpu" and devices.resolve_compute_dtype(None, "cpu") == "bfloat16"


@pytest.mark.parametrize("native", [True, False])
def test_training_computes_in_bfloat16_only_on_a_cpu_that_has_it(monkeypatch, native):
    monkeypatch.delenv(devices.DTYPE_ENV, raising=False)
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: native)
    assert devices.training_compute_dtype(None, "cpu") == ("bfloat16" if native else "float32")
    assert devices.training_compute_dtype("auto", "cpu") == devices.training_compute_dtype(None, "cpu")
    assert devices.training_compute_dtype("float32", "cpu") == "float32"  # asked for: kept
    monkeypatch.setenv(devices.DTYPE_ENV, "float32")
    assert devices.training_compute_dtype(None, "cpu") == "float32"
    assert devices.resolve_compute_dtype(None, "cpu") == "float32"  # answering is not training


def test_cuda_without_cuda_names_what_exists():
    with pytest.raises(DeviceError, match=r"device 'cuda' was asked but this machine has no CUDA GPU.*available: cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(DeviceError, match="no Apple MPS device"):
        devices.resolve_device("mps")
    with pytest.raises(DeviceError, match="not one of auto, cpu, cuda, cuda:N, mps"):
        devices.resolve_device("tpu")


def test_a_gpu_index_past_the_last(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("cuda") == "cuda:0"
    with pytest.raises(DeviceError, match=r"'cuda:7' was asked but this machine has 1 CUDA GPU \(cuda:0\.\.cuda:0"):
        devices.resolve_device("cuda:7")


def test_a_dtype_the_device_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DeviceError, match=r"'bfloat16' was asked but device 'cuda:0' cannot run it.*capability"):
        devices.check_runs("bfloat16", "cuda:0")
    with pytest.raises(ConfigError, match="compute dtype must be one of"):
        devices.resolve_compute_dtype("float8", "cpu")


def test_cli_refuses_a_missing_device(tmp_path, tiny_llama):
    (tmp_path / "d.txt").write_text(TEXT)
    runner = CliRunner()
    result = runner.invoke(cli, ["build", str(tmp_path / "d.txt"), "-o", str(tmp_path / "out"), "--model",
                                 str(tiny_llama), "--device", "cuda:1", "--no-progress"])
    assert result.exit_code == 2 and "error: device 'cuda:1' was asked" in result.output
    result = runner.invoke(cli, ["build", str(tmp_path / "d.txt"), "-o", str(tmp_path / "out"), "--model",
                                 str(tiny_llama), "--no-progress"], env={"KVFORGE_DEVICE": "mps"})
    assert result.exit_code == 2 and "no Apple MPS device" in result.output


def test_the_fingerprint_does_not_depend_on_the_dtype(tiny_llama):
    f32 = load_model(tiny_llama, compute_dtype="float32")
    bf16 = load_model(tiny_llama, compute_dtype="bfloat16")
    assert f32 is not bf16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert f32.info == bf16.info and bf16.device == "cpu" and bf16.compute_dtype == "bfloat16"


def _build(tmp_path, model, compute_dtype, storage="float16"):
    src = tmp_path / "doc.txt"
    src.write_text(TEXT)
    out = tmp_path / f"out-{compute_dtype}"
    kvforge.build([src], out, method="full", keep=1.0, model=model, dtype=storage, progress=False,
                  compute_dtype=compute_dtype)
    return out / "doc.kv"


def test_keep_one_is_lossless_in_bfloat16(tmp_path, tiny_model):
    """Against a text prefill in the same dtype: token for token."""
    doc = kvforge.load(_build(tmp_path, tiny_model, "bfloat16", storage="bfloat16"), model=tiny_model,
                       compute_dtype="bfloat16")
    lm = doc.lm
    assert lm.compute_dtype == "bfloat16"
    for q in QUESTIONS:
        prompt = lm.encode_document(TEXT) + lm.encode_question(q)
        with torch.inference_mode():
            ref = lm.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=sorted(lm.stop_ids), pad_token_id=0)[0, len(prompt):].tolist()
        ref = ref[: next((i for i, t in enumerate(ref) if t in lm.stop_ids), len(ref))]
        assert doc.answer_ids(q, max_new_tokens=10) == ref


@pytest.mark.parametrize("built,answered", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_artifacts_answer_in_another_dtype(tmp_path, tiny_llama, built, answered):
    """Built in one compute dtype, answered in the other: the same greedy tokens where the top-2 margin exceeds
    the dtypes' difference, and logits within LOGIT_TOLERANCE of the same-dtype answer."""
    cross = kvforge.load(_build(tmp_path, tiny_llama, built), model=tiny_llama, compute_dtype=answered)
    same = kvforge.load(_build(tmp_path, tiny_llama, answered), model=tiny_llama, compute_dtype=answered)
    for q in QUESTIONS:
        ref_ids = same.answer_ids(q, max_new_tokens=6)
        probe = ref_ids or [5, 6, 7]
        a, b = cross.logits(q, probe), same.logits(q, probe)
        assert (a - b).abs().max() <= LOGIT_TOLERANCE
        top2 = b.topk(2, dim=-1).values
        confident = next((i for i, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m < 2 * LOGIT_TOLERANCE),
                         len(probe))
        assert cross.answer_ids(q, max_new_tokens=6)[:confident] == ref_ids[:confident]


def test_a_cache_of_another_shape_is_refused(tmp_path, tiny_llama, tiny_qwen):
    path = _build(tmp_path, tiny_llama, "float32")
    with pytest.raises(IncompatibleModelError, match="head_dim|num_layers|weights_sha256"):
        kvforge.load(path, model=tiny_qwen)
    art = kvforge.load(path, model=tiny_llama).artifact
    qwen = load_model(tiny_qwen)
    if (qwen.info.num_layers, qwen.info.num_kv_heads, qwen.info.head_dim) != (2, 2, 16):
        with pytest.raises(IncompatibleModelError, match="the loaded model"):
            Doc.from_kv(qwen, art.kv, art.logical_length)
    art.kv.keys[0] = art.kv.keys[0][:, :8]  # a lying cache: head dim 8 for a model of 16
    with pytest.raises(IncompatibleModelError, match=r"head dim 8, but the loaded model .* 2 x 2 x 16"):
        Doc.from_kv(load_model(tiny_llama), art.kv, art.logical_length)


@pytest.mark.parametrize("method", ["replay", "replay:grad=1", "select_fit:replay=1"])
def test_methods_that_run_the_model_again_follow_its_dtype(tmp_path, tiny_llama, method):
    """The replay runs the model over the document's cache once more: in the model's dtype, not the KV's float32."""
    (tmp_path / "doc.txt").write_text(TEXT)
    kvforge.build([tmp_path / "doc.txt"], tmp_path / "lib", method=method, keep=0.25, model=tiny_llama,
                  compute_dtype="bfloat16", progress=False)
    doc = kvforge.load(tmp_path / "lib" / "doc.kv", model=tiny_llama, compute_dtype="bfloat16")
    assert doc.manifest["compression"]["keep_achieved"] == pytest.approx(0.25, abs=0.03)
    doc.answer_ids(QUESTIONS[0], max_new_tokens=4)  # and it answers
