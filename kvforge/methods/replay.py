"""``replay``: keep what the model attends to while it repeats the document (KVzip's signal, inside kvforge).

After the document's prefill, the model is asked to repeat it: the instruction
(:data:`kvforge.prefill.REPLAY_PROMPT`) and the document's own tokens are run over
its cache, chunk by chunk, and every cached entry is scored by the largest attention
weight a replayed token gives it (:func:`kvforge.prefill.replay_scores`; Kim et al.
2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction").
An entry nothing needs to reconstruct the text is unlikely to be needed by a question
about it. The selection is kvforge's: one top-k over all layers and heads (ragged
per-layer and per-head budgets, as KVzip ranks; ``replay:scope=layer`` for one top-k
per layer), sink and recent tokens protected; ``--allocate pilot`` and the value
refit of ``select_fit`` (``replay=W``) build on the same scores.

Cost: one more forward over the document (the replay), plus the replay's attention
weights computed per layer, chunk by chunk. ``replay:grad=1`` weights each replayed
token's attention by input x gradient attribution, the signal of kvpress's KVgradPress
(one backward pass per chunk more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prefill import KV, REPLAY_PROMPT, replay_scores
from .base import CompressionContext, ScoredCompressor, register


def replay_signal(kv: KV, ctx: CompressionContext, chunk: int = 512, attribution: bool = False) -> torch.Tensor:
    """(L, H, T) replay attention of a prefilled document; needs the model and the document's ids."""
    lm = ctx.model
    if lm is None or kv.input_ids is None:
        raise ValueError("the replay signal needs the model and the document's token ids (a real prefill)")
    prompt = lm.tokenizer(REPLAY_PROMPT, add_special_tokens=False)["input_ids"]
    return replay_scores(lm.model, kv, kv.input_ids, prompt, chunk=chunk, attribution=attribution)


@register
@dataclass
class Replay(ScoredCompressor):
    """Keep the entries the model attends to most while repeating the document (context reconstruction)."""

    name = "replay"
    needs_model = True
    chunk: int = 512  # replayed tokens per forward
    # one top-k over all layers, as KVzip ranks: per-layer budgets lost the needles at keep 0.1 (tuning split:
    # 9/18 needles global against 1/18 for replay + pilot, p = 0.01; held out 14/36 against 3/36;
    # docs/experiments/heldout.md). --allocate pilot still sets every head's count when asked.
    scope: str = "global"
    grad: int = 0  # 1: weight the replay's attention by input x gradient attribution (KVgradPress's signal)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")
        if self.grad not in (0, 1):
            raise ValueError("grad must be 0 or 1")

    def score(self, kv: KV, ctx: CompressionContext) -> torch.Tensor:
        return replay_signal(kv, ctx, self.chunk, attribution=bool(self.grad))
