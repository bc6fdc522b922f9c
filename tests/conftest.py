"""Shared fixtures: tiny random models (Llama and Qwen2) with a real trained tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HERE = Path(__file__).parent


def _corpus_text() -> str:
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics)[:60])


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_corpus_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def _make_model(path: Path, arch: str, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    # larger random weights than the default init give peaked, input-sensitive attention
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _make_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return _make_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def other_llama(tmp_path_factory) -> Path:
    """Same shape as tiny_llama, other weights: a 'fine-tune' that must be refused."""
    return _make_model(tmp_path_factory.mktemp("tiny-llama-other"), "llama", seed=7)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen) -> Path:
    return tiny_llama if request.param == "llama" else tiny_qwen


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own KVFORGE_HOME, except for the shared embedded-model cache."""
    home = os.environ.get("KVFORGE_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "kvforge-home")
    monkeypatch.setenv("KVFORGE_HOME", home)
    monkeypatch.delenv("KVFORGE_MODEL", raising=False)


@pytest.fixture
def docs(tmp_path) -> Path:
    """A folder of three small real-text documents."""
    import pydoc_data.topics as topics

    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("assert", "pass", "del"):
        (folder / f"{name}.txt").write_text(topics.topics[name][:1200])
    return folder


def write_training_corpus(folder: Path, n: int = 6, chars: int = 3000) -> Path:
    """``n`` real-text documents (Python's language reference) long enough for a training window."""
    import pydoc_data.topics as topics

    folder.mkdir(parents=True, exist_ok=True)
    keys = [k for k in sorted(topics.topics) if len(topics.topics[k]) >= chars][:n]
    for k in keys:
        (folder / f"{k}.txt").write_text(topics.topics[k][:chars])
    return folder


def kill_at_first_checkpoint(train: str, corpus: Path, out: Path, args: dict, done_file: str) -> None:
    """Run ``kvforge.train.<train>(corpus, out, **args)`` in a child process and SIGKILL it as soon as its first
    checkpoint exists (skips the test when the run finished first: nothing to resume then)."""
    import signal
    import subprocess
    import sys
    import time

    code = f"from kvforge.train import {train}\n{train}([{str(corpus)!r}], {str(out)!r}, **{args!r})\n"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.pt").exists()
    if (out / done_file).exists():
        pytest.skip("the run finished before it could be killed")  # not a failure of resume


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_llama) -> Path:
    """A distill adapter for tiny_llama, trained a few real steps."""
    pytest.importorskip("peft", reason="the distill adapter needs peft: pip install 'kvforge[train]'")
    from kvforge.train import distill

    base = tmp_path_factory.mktemp("tiny-adapter")
    out = base / "adapter"
    distill([str(write_training_corpus(base / "corpus"))], out, model=str(tiny_llama), steps=4, context=128,
            targets=6, scorer_epochs=5, progress=False)
    return out
