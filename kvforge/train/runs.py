"""What every ``kvforge train`` run shares: its corpus, its checkpoint, its loss log and its plot.

A run directory holds ``checkpoint.pt`` (written atomically every few steps: weights, optimizer, step,
history, settings, the corpus's sha256), ``losses.jsonl`` and ``loss.png``, beside what the run writes
when it ends (an adapter, a CAT model).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..containers import atomic_file
from ..corpus import load_corpus
from ..errors import ConfigError, TrainingError

CHECKPOINT = "checkpoint.pt"


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """The learning rate at ``step``: a linear warm-up, then a cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def log_uniform(u: float, lo: float, hi: float) -> float:
    """``u`` in [0, 1) mapped log-uniformly onto [lo, hi] (a keep drawn so that small keeps get their share)."""
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def training_corpus(sources) -> tuple[list[tuple[str, str]], str]:
    """(name, text) of every document in ``sources`` and the corpus's sha256; refuses an empty corpus."""
    docs, _ = load_corpus(sources)
    if not docs:
        raise ConfigError("the training corpus is empty: pass folders or files with .txt / .md documents")
    digest = hashlib.sha256("".join(d.sha256 for d in sorted(docs, key=lambda d: d.id)).encode()).hexdigest()
    return [(d.id, d.text) for d in docs], digest


def training_model(model, device: str | None, compute_dtype: str | None):
    """The model a run trains: :func:`kvforge.model.load_model` on the resolved device, an auto dtype resolved by
    :func:`kvforge.devices.training_compute_dtype` (bfloat16 on a CPU with native bfloat16; what is trained stays
    float32)."""
    from ..devices import resolve_device, training_compute_dtype
    from ..model import load_model

    device = resolve_device(device)
    return load_model(model, device=device, compute_dtype=training_compute_dtype(compute_dtype, device))


def check_run_dir(out: Path, resume: bool, final_file: str, what: str) -> Path:
    """The checkpoint path of a run into ``out``; refuses to overwrite a run or its result, or to resume nothing."""
    checkpoint = Path(out) / CHECKPOINT
    if checkpoint.exists() and not resume:
        raise ConfigError(f"{out} holds a training run (checkpoint.pt); pass --resume to continue it, "
                          "or choose another -o")
    if not resume and (Path(out) / final_file).exists():
        raise ConfigError(f"{out} already holds a trained {what}; choose another -o")
    if resume and not checkpoint.exists():
        raise ConfigError(f"--resume: {out} has no checkpoint.pt to resume from")
    return checkpoint


def save_checkpoint(out: Path, state: dict) -> None:
    with atomic_file(Path(out) / CHECKPOINT) as fh:
        torch.save(state, fh)


def load_checkpoint(checkpoint: Path, settings: dict, corpus_sha: str, added: dict | None = None) -> dict:
    """The checkpoint's state; refuses one written with other settings or on another corpus. ``added``:
    settings introduced since older checkpoints were written, with the value those runs had."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["settings"] = {**(added or {}), **state["settings"]}
    if state["settings"] != settings or state["corpus_sha256"] != corpus_sha:
        saved = state["settings"]
        keys = sorted(saved.keys() | settings.keys())
        differ = [f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in keys
                  if saved.get(k) != settings.get(k)]
        if state["corpus_sha256"] != corpus_sha:
            differ.append("the corpus (its sha256)")
        raise TrainingError(f"{checkpoint} is a run with other settings or another corpus ({'; '.join(differ)}); "
                            "resume with the same ones, or choose another -o")
    return state


def nonfinite(loss: torch.Tensor, step: int, where: str, saved_step: int | None, checkpoint: Path) -> TrainingError:
    """The error of a step whose loss is NaN or inf (the last good checkpoint stays)."""
    last = f"the last good checkpoint (step {saved_step}) is kept in {checkpoint}" \
        if saved_step is not None else "no checkpoint was written yet"
    return TrainingError(f"the loss became {float(loss.detach())} at step {step + 1} ({where}); {last}. "
                         "Lower the learning rate (--lr) and --resume, or start again")


def mean_last(history: list, key: str, n: int = 25) -> float | None:
    tail = [h[key] for h in history[-n:]]
    return round(sum(tail) / len(tail), 5) if tail else None


def write_losses(out: Path, history: list) -> None:
    with atomic_file(Path(out) / "losses.jsonl") as fh:
        fh.write("".join(json.dumps(h) + "\n" for h in history).encode())


def plot_losses(out: Path, history: list, keys: tuple[str, ...], title: str) -> None:
    """loss.png: ``keys`` of every step and their running means, on a log scale."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for key, color in zip(keys, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ys = [h[key] for h in history]
        ax.plot(steps, ys, color=color, alpha=0.25, lw=0.8)
        w = max(1, min(25, len(ys) // 5))
        run = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(steps, run, color=color, lw=1.8, label=f"{key} (running mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_file(Path(out) / "loss.png") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
