"""The only place that runs the model over a document.

Returns the full KV cache of the document segment (template prefix + text) as
dense tensors, the input to every compression method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ResourceLimitError

# Tokens left free after a document for the question and the answer.
QUESTION_RESERVE = 256


@dataclass
class KV:
    """A dense KV cache of one document.

    keys:   (layers, kv_heads, tokens, head_dim), post-RoPE, as the model caches them
    values: (layers, kv_heads, tokens, head_dim)
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]


def check_length(n_tokens: int, max_context: int, where: str) -> None:
    """Refuse a document that leaves no room for a question in the model's context."""
    limit = max_context - QUESTION_RESERVE
    if n_tokens > limit:
        raise ResourceLimitError(
            f"{where}: {n_tokens} tokens is longer than this model allows for one document "
            f"({limit} = context {max_context} - {QUESTION_RESERVE} reserved for the question); "
            "kvforge refuses rather than truncating: split the document into smaller files"
        )


@torch.inference_mode()
def prefill(model, input_ids: list[int]) -> KV:
    """Run ``model`` over ``input_ids`` (one sequence) and return its full KV cache."""
    from transformers import DynamicCache

    ids = torch.tensor([input_ids], dtype=torch.long)  # (1, T)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (L, H, T, D)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return KV(keys=keys, values=values)
