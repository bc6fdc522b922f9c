"""Runtime over artifacts built with tiny random models (Llama and Qwen2)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kvforge
from kvforge.builder import BuildConfig, build_document
from kvforge.corpus import Document
from kvforge.errors import IncompatibleModelError, ResourceLimitError
from kvforge.methods import Compressor, register
from kvforge.methods.base import _REGISTRY, gather
from kvforge.model import load_model
from kvforge import artifact

TEXT = ("The assert statement is a convenient way to insert debugging assertions into a program. "
        "The secret number is 4471. Assignments to __debug__ are illegal. " * 6)
QUESTION = "What is the secret number?"


def text_logits(lm, doc_text, question, answer_ids, mask_fn=None):
    """Reference: prefill the whole prompt as text (optionally masking dropped document tokens)."""
    d = lm.encode_document(doc_text)
    q = lm.encode_question(question)
    ids = d + q + answer_ids[:-1]
    mask = None
    if mask_fn is not None:
        n = len(ids)
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
        for col in range(len(d)):
            if not mask_fn(col):
                allowed[len(d):, col] = False
        mask = torch.where(allowed, 0.0, float("-inf"))[None, None]
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), attention_mask=mask)
    return out.logits[0, len(d) + len(q) - 1:].float()


def build_one(tmp_path, model_dir, method="full", keep=1.0, dtype="float32", text=TEXT):
    src = tmp_path / "doc.txt"
    src.write_text(text)
    kvforge.build([src], tmp_path / "out", method=method, keep=keep, model=model_dir, dtype=dtype, progress=False)
    return tmp_path / "out" / "doc.kv"


def test_keep_one_is_lossless(tmp_path, tiny_model):
    path = build_one(tmp_path, tiny_model)
    doc = kvforge.load(path, model=tiny_model)
    ids = doc.answer_ids(QUESTION, max_new_tokens=12)
    lm = doc.lm
    prompt = lm.encode_document(TEXT) + lm.encode_question(QUESTION)
    with torch.inference_mode():
        ref = lm.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                eos_token_id=sorted(lm.stop_ids), pad_token_id=0)[0, len(prompt):].tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in lm.stop_ids), len(ref))]
    assert ids == ref
    probe = ids if ids else [5, 6, 7]
    torch.testing.assert_close(doc.logits(QUESTION, probe), text_logits(lm, TEXT, QUESTION, probe),
                               atol=1e-4, rtol=1e-4)


@dataclass
class EveryThird(Compressor):
    """Test method: keep positions 0, 3, 6, ... in every layer and head (a uniform pattern)."""

    name = "every_third_test"

    def compress(self, kv, budget, ctx):
        L, H, T, _ = kv.shape
        mask = torch.zeros(L, H, T, dtype=torch.bool)
        mask[:, :, ::3] = True
        return gather(kv, mask)


@pytest.fixture
def every_third():
    register(EveryThird)
    yield EveryThird()
    _REGISTRY.pop(EveryThird.name)


def test_compressed_positions_continue_at_logical_length(tmp_path, tiny_model, every_third):
    """A compressed cache equals text prefill where the question cannot see the dropped tokens.

    This fails if the question were placed at the physical length (a third of the logical one).
    """
    path = build_one(tmp_path, tiny_model, method=every_third.name, keep=0.34)
    doc = kvforge.load(path, model=tiny_model)
    assert doc.manifest["compression"]["keep_achieved"] < 0.4
    answer = [11, 12, 13, 14]
    got = doc.logits(QUESTION, answer)
    ref = text_logits(doc.lm, TEXT, QUESTION, answer, mask_fn=lambda col: col % 3 == 0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # and the physical-position mistake would be visibly different
    assert doc.cache().get_seq_length() == doc.logical_length


def test_ragged_per_head_budgets(tmp_path, tiny_llama):
    path = build_one(tmp_path, tiny_llama, method="knorm", keep=0.5, dtype="float16")
    doc = kvforge.load(path, model=tiny_llama)
    lengths = doc.artifact.kv.lengths
    assert len(set(lengths.flatten().tolist())) > 1
    # resident bytes: what is kept, not a padded maximum
    assert abs(doc.resident_kv_bytes() - artifact.kv_bytes(doc.artifact.kv)) / doc.resident_kv_bytes() < 0.1
    assert doc.resident_kv_bytes() <= 1.1 * doc.artifact.file_bytes
    assert doc.answer(QUESTION, max_new_tokens=5) is not None


def test_questions_do_not_leak(tmp_path, tiny_llama):
    path = build_one(tmp_path, tiny_llama, method="knorm", keep=0.5)
    doc = kvforge.load(path, model=tiny_llama)
    resident = doc.resident_kv_bytes()
    first = doc.answer_ids("Tell me everything about assignments.", max_new_tokens=10)
    second = doc.answer_ids(QUESTION, max_new_tokens=10)
    fresh = kvforge.load(path, model=tiny_llama).answer_ids(QUESTION, max_new_tokens=10)
    assert second == fresh
    assert doc.answer_ids("Tell me everything about assignments.", max_new_tokens=10) == first
    assert doc.resident_kv_bytes() == resident  # the document holds no question's suffix


def test_generate_interop_matches_own_loop(tmp_path, tiny_model):
    path = build_one(tmp_path, tiny_model, method="knorm", keep=0.5)
    doc = kvforge.load(path, model=tiny_model)
    ids = doc.answer_ids(QUESTION, max_new_tokens=10)
    inputs = doc.generate_inputs(QUESTION)
    with torch.inference_mode():
        out = doc.lm.model.generate(**inputs, max_new_tokens=10, do_sample=False,
                                    eos_token_id=sorted(doc.lm.stop_ids), pad_token_id=0)
    gen = out[0, inputs["input_ids"].shape[1]:].tolist()
    gen = gen[: next((i for i, t in enumerate(gen) if t in doc.lm.stop_ids), len(gen))]
    assert gen == ids


def test_build_document_is_pure(tiny_llama):
    lm = load_model(tiny_llama)
    doc = Document.from_text("d", TEXT)
    cfg = BuildConfig.make("knorm", 0.5)
    m1, kv1 = build_document(lm, doc, cfg)
    m2, kv2 = build_document(lm, doc, cfg)
    assert m1 == m2
    assert artifact.tensor_digest(artifact.kv_to_tensors(kv1, torch.float16)) == \
        artifact.tensor_digest(artifact.kv_to_tensors(kv2, torch.float16))


def test_wrong_model_is_refused(tmp_path, tiny_llama, other_llama, tiny_qwen):
    path = build_one(tmp_path, tiny_llama, method="knorm", keep=0.5)
    with pytest.raises(IncompatibleModelError, match="weights_sha256") as info:
        kvforge.load(path, model=other_llama)
    assert "tokenizer_sha256" not in str(info.value)  # same tokenizer: only the differing fields are listed
    with pytest.raises(IncompatibleModelError, match="architecture"):
        kvforge.load(path, model=tiny_qwen)


def test_artifact_finds_its_own_model(tmp_path, tiny_llama):
    path = build_one(tmp_path, tiny_llama, method="knorm", keep=0.5)
    doc = kvforge.load(path)  # no model given: the artifact's recorded source is used
    assert doc.lm.info.source == str(tiny_llama)


def test_question_too_long_for_context(tmp_path, tiny_llama):
    path = build_one(tmp_path, tiny_llama, method="knorm", keep=0.5)
    doc = kvforge.load(path, model=tiny_llama)
    with pytest.raises(ResourceLimitError, match="does not fit"):
        doc.answer("why " * 2000)


@pytest.mark.parametrize("method, keep", [("full", 1.0), ("compactor", 0.5)])
def test_uniform_fast_path_equals_the_per_head_loop(tmp_path, tiny_model, method, keep):
    path = build_one(tmp_path, tiny_model, method=method, keep=keep)
    doc = kvforge.load(path, model=tiny_model)
    answer = doc.answer_ids(QUESTION, max_new_tokens=6) or [0]
    layers = doc.document.prefix.layers  # every question forks these layers, flags included
    assert all(layer.uniform for layer in layers) == (method == "full")  # ragged heads take the loop
    fast = doc.logits(QUESTION, answer, include_question=True)
    for layer in layers:
        layer.uniform = False
    slow = doc.logits(QUESTION, answer, include_question=True)
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)
    assert doc.answer_ids(QUESTION, max_new_tokens=6) == (answer if answer != [0] else [])
