"""The architecture matrix: every family either supported (keep 1.0 lossless, ragged per-head attention exact,
the right pre-RoPE keys, a compression round trip) or refused at load with its reason. Tiny random models
built offline from transformers' config classes (tests/tiny_families.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import kvforge
from conftest import _tokenizer
from kvforge.cli import cli
from kvforge.errors import ResourceLimitError, UnsupportedModelError
from kvforge.methods import Compressor, register
from kvforge.methods.base import _REGISTRY, gather
from kvforge.model import load_model
from kvforge.prefill import prefill
from tiny_families import FAMILIES, REFUSED, SUPPORTED, WINDOW, make_family

TEXT = ("The assert statement inserts debugging assertions into a program. The secret number is 4471. "
        "Assignments to __debug__ are illegal. " * 3)
QUESTION = "What is the secret number?"


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    tokenizer = _tokenizer(tmp_path_factory.mktemp("family-tokenizer"))
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = make_family(tmp_path_factory.mktemp(f"tiny-{family}"), family, tokenizer)
        return built[family]

    return get


def build_one(tmp_path, model_dir, method="full", keep=1.0, text=TEXT):
    src = tmp_path / "doc.txt"
    src.write_text(text)
    kvforge.build([src], tmp_path / "out", method=method, keep=keep, model=model_dir, dtype="float32", progress=False)
    return tmp_path / "out" / "doc.kv"


def greedy_text(lm, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                eos_token_id=sorted(lm.stop_ids), pad_token_id=0)[0, len(prompt):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in lm.stop_ids), len(out))]


def text_logits(lm, question, answer_ids, keep_fn=None):
    """Reference: the whole prompt as text; ``keep_fn(kv_head, col)`` False hides a document column from the
    question and answer rows of that KV head's query heads."""
    d, q = lm.encode_document(TEXT), lm.encode_question(question)
    ids = d + q + answer_ids[:-1]
    mask = None
    if keep_fn is not None:
        n, hq, hkv = len(ids), lm.info.num_attention_heads, lm.info.num_kv_heads
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat(hq, 1, 1)
        for j in range(hq):
            for col in range(len(d)):
                if not keep_fn(j // (hq // hkv), col):
                    allowed[j, len(d):, col] = False
        mask = torch.where(allowed, 0.0, float("-inf"))[None]  # (1, Hq, n, n)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), attention_mask=mask)
    return out.logits[0, len(d) + len(q) - 1:].float()


@pytest.mark.parametrize("family", SUPPORTED)
def test_keep_one_is_lossless(tmp_path, family_dir, family):
    doc = kvforge.load(build_one(tmp_path, family_dir(family)), model=family_dir(family))
    lm = doc.lm
    ids = doc.answer_ids(QUESTION, max_new_tokens=8)
    assert ids == greedy_text(lm, lm.encode_document(TEXT) + lm.encode_question(QUESTION), 8)
    probe = ids or [5, 6, 7]
    torch.testing.assert_close(doc.logits(QUESTION, probe), text_logits(lm, QUESTION, probe), atol=1e-4, rtol=1e-4)


@dataclass
class Staggered(Compressor):
    """Test method: KV head h keeps the tokens t with (t + h) % 3 == 0, and token 0: a different set per head."""

    name = "staggered_test"

    def compress(self, kv, budget, ctx):
        L, H, T, _ = kv.shape
        t = torch.arange(T)
        mask = torch.stack([((t + h) % 3 == 0) | (t == 0) for h in range(H)])[None].repeat(L, 1, 1)
        return gather(kv, mask)


@pytest.fixture
def staggered():
    register(Staggered)
    yield Staggered()
    _REGISTRY.pop(Staggered.name)


@pytest.mark.parametrize("family", SUPPORTED)
def test_ragged_per_head_attention_is_exact(tmp_path, family_dir, family, staggered):
    """Each head's own kept entries, positions at the logical length, the family's scaling and softcapping."""
    doc = kvforge.load(build_one(tmp_path, family_dir(family), method=staggered.name, keep=0.4),
                       model=family_dir(family))
    answer = [11, 12, 13, 14]
    ref = text_logits(doc.lm, QUESTION, answer, keep_fn=lambda h, col: (col + h) % 3 == 0 or col == 0)
    torch.testing.assert_close(doc.logits(QUESTION, answer), ref, atol=1e-4, rtol=1e-4)


def _rotate(model, family, layer: int, keys_pre: torch.Tensor) -> torch.Tensor:
    """The family's own RoPE applied to (H, T, D) pre-RoPE keys at positions 0..T-1."""
    mod = sys.modules[type(model.model).__module__]
    T = keys_pre.shape[1]
    pos = torch.arange(T)[None]
    rotary = model.model.rotary_emb
    if family == "gemma3":
        cos, sin = rotary(keys_pre[None], pos, model.config.layer_types[layer])
    else:
        cos, sin = rotary(keys_pre[None], pos)
    _, k = mod.apply_rotary_pos_emb(keys_pre[None], keys_pre[None], cos, sin)
    return k[0]


@pytest.mark.parametrize("family", SUPPORTED)
def test_pre_rope_keys_are_the_keys_rope_rotates(family_dir, family):
    lm = load_model(family_dir(family))
    kv = prefill(lm.model, lm.encode_document(TEXT), queries=True, pre_rope_keys=True)
    assert kv.keys_pre_rope.shape == kv.keys.shape
    with torch.inference_mode():
        for layer in range(kv.shape[0]):
            torch.testing.assert_close(_rotate(lm.model, family, layer, kv.keys_pre_rope[layer]), kv.keys[layer],
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", SUPPORTED)
def test_compression_round_trip(tmp_path, family_dir, family):
    """compactor (queries and pre-RoPE keys) at keep 0.5: written, verified, read back, answering."""
    path = build_one(tmp_path, family_dir(family), method="compactor", keep=0.5)
    doc = kvforge.load(path, model=family_dir(family))
    assert 0.45 <= doc.manifest["compression"]["keep_achieved"] <= 0.55
    assert doc.cache().get_seq_length() == doc.logical_length
    assert torch.isfinite(doc.logits(QUESTION, [5, 6, 7])).all()
    assert isinstance(doc.answer(QUESTION, max_new_tokens=4), str)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_families_are_refused_at_load(family_dir, family):
    with pytest.raises(UnsupportedModelError, match=REFUSED[family]):
        load_model(family_dir(family))


def test_refusal_is_one_clear_cli_error(tmp_path, family_dir):
    (tmp_path / "d.txt").write_text(TEXT)
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "d.txt"), "-o", str(tmp_path / "out"),
                                      "--model", str(family_dir("qwen3_next")), "--no-progress"])
    assert result.exit_code == 2
    assert "kvforge does not support Qwen3NextForCausalLM" in result.output and "linear_attention" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.kv"))


@pytest.mark.parametrize("family", [f for f in SUPPORTED if "sliding_window" in FAMILIES[f][2]])
def test_sliding_windows_cap_the_context(tmp_path, family_dir, family):
    """Within the window every layer sees the whole sequence; a document that would leave it is refused."""
    lm = load_model(family_dir(family))
    assert lm.info.max_context == WINDOW and "sliding window" in lm.context_note
    with pytest.raises(ResourceLimitError, match=f"context {WINDOW}"):
        build_one(tmp_path, family_dir(family), text=TEXT * 4)
