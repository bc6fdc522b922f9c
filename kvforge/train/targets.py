"""The entry scorer's teacher and its fit: what the replay keeps, learned from one early layer's states.

kvforge's held-out split found the replay's input x gradient attribution (the model repeating the document,
each entry scored by its attention times what it writes times how much that matters downstream: KVgradPress's
signal, :func:`kvforge.prefill.replay_scores`) to be the question-agnostic signal that keeps needles, ranked
over all layers at once. It costs a replay forward and backward per document, about 5x a prefill. The entry
scorer learns to predict it from the hidden states entering the adapter's first layer, so that a build pays
for the first layers of a prefill instead (:mod:`kvforge.methods.distill`).

1. :func:`compute_targets`: for ``n`` training windows (every other one with a fact planted, as the probes
   plant them: :mod:`kvforge.train.data`), the hidden states entering ``first_layer`` (T, d) and the log
   attribution of every entry (L, H, T), centred per window (a window's scale is irrelevant to its top-k).
   Cached in the run directory (``targets.pt``, written atomically every few windows): a killed run resumes.
2. :func:`fit_scorer`: least squares of the scorer's (L, H, T) output on those log attributions, AdamW over
   the windows; the last tenth of the windows measure the fit (how many of the teacher's top entries at
   keep 0.1 the scorer's top-k finds).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..containers import atomic_file
from ..errors import TrainingError
from ..prefill import REPLAY_PROMPT, prefill, replay_scores
from .student import hidden_at, protected_tokens, select_entries

TARGETS_FILE = "targets.pt"


def _window_ids(maker, index: int, seed: int) -> list[int]:
    """Window ``index`` as document-segment ids; every other window gets a planted fact."""
    rng = random.Random(f"targets:{seed}:{index}")
    window = maker.windows[rng.randrange(len(maker.windows))]
    text_ids = maker.plant_fact(rng, window) if index % 2 == 0 else window.text_ids
    return maker.prefix + text_ids


def window_target(lm, ids: list[int], first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (T, d) float16, target (L, H, T) float16): the states entering ``first_layer`` and the centred
    log replay attribution of every entry."""
    store: list = []
    hook = hidden_at(lm.model, first_layer, store)
    try:
        kv = prefill(lm.model, ids)
    finally:
        hook.remove()
    prompt = lm.tokenizer(REPLAY_PROMPT, add_special_tokens=False)["input_ids"]
    scores = replay_scores(lm.model, kv, ids, prompt, attribution=True)  # (L, H, T)
    log = scores.clamp_min(1e-12).log()
    return store[0][0].cpu().half(), (log - log.mean()).half()


def compute_targets(lm, maker, n: int, first_layer: int, seed: int, out: Path, progress: bool = True) -> list[dict]:
    """The targets of ``n`` windows, resumed from and saved to ``out/targets.pt``."""
    path = Path(out) / TARGETS_FILE
    key = {"n_windows": len(maker.windows), "first_layer": first_layer, "seed": seed, "model": lm.info.weights_sha256}
    items: list[dict] = []
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            items = saved["items"][:n]
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=len(items), desc="replay targets", unit="window", disable=not progress,
               dynamic_ncols=True)
    for i in range(len(items), n):
        ids = _window_ids(maker, i, seed)
        hidden, target = window_target(lm, ids, first_layer)
        if not torch.isfinite(target.float()).all():
            raise TrainingError(f"the replay targets of training window {i} are not finite; "
                                "the model produces NaN or inf on this text")
        items.append({"hidden": hidden, "target": target})
        bar.update(1)
        if (i + 1) % 8 == 0 or i + 1 == n:
            with atomic_file(path) as fh:
                torch.save({"key": key, "items": items}, fh)
    bar.close()
    return items


def recall_at(predicted: torch.Tensor, target: torch.Tensor, keep: float, sink: int, recent: int) -> float:
    """The share of the target's top-``keep`` entries (beyond the protected ones) that ``predicted``'s top-k
    also keeps; both (L, H, T)."""
    total = round(keep * target.numel())
    a = select_entries(predicted, total, sink, recent)
    b = select_entries(target.float(), total, sink, recent)
    free = b & ~protected_tokens(b.shape[-1], sink, recent, b.device)
    return float((a & free).sum() / free.sum().clamp_min(1))


def fit_scorer(scorer, items: list[dict], *, epochs: int, lr: float, seed: int, sink: int, recent: int,
               progress: bool = True) -> dict:
    """Fit ``scorer`` (an entry scorer, (T, d) -> (L, H, T)) to the items' targets; returns the fit's record."""
    from tqdm.auto import tqdm

    if len(items) < 2:
        raise TrainingError("fitting the entry scorer needs at least 2 windows with replay targets (--targets)")
    device = next(scorer.parameters()).device
    n_val = max(1, len(items) // 10)
    train, val = items[:-n_val], items[-n_val:]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    scorer.train(True)
    losses = []
    bar = tqdm(total=epochs, desc="fit scorer", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        total = 0.0
        for j in torch.randperm(len(train), generator=gen).tolist():
            pred = scorer(train[j]["hidden"].to(device))
            loss = ((pred - train[j]["target"].to(device).float()) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / len(train))
        if not torch.isfinite(torch.tensor(losses[-1])):
            raise TrainingError(f"the scorer's fit diverged at epoch {epoch + 1} (loss {losses[-1]}); "
                                "lower the learning rate")
        bar.update(1)
        bar.set_postfix(mse=f"{losses[-1]:.3f}")
    bar.close()
    scorer.train(False)
    with torch.no_grad():
        preds = [scorer(x["hidden"].to(device)).cpu() for x in val]
        val_mse = sum(float(((p - x["target"].float()) ** 2).mean()) for p, x in zip(preds, val)) / len(val)
        recall = {str(k): round(sum(recall_at(p, x["target"], k, sink, recent) for p, x in zip(preds, val)) / len(val), 4)
                  for k in (0.05, 0.1, 0.25)}
    return {"windows": len(items), "validation_windows": n_val, "epochs": epochs,
            "train_mse": round(losses[-1], 4), "validation_mse": round(val_mse, 4), "validation_recall": recall}
