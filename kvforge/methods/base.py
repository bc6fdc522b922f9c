"""The central abstraction: a :class:`Compressor` turns a dense KV cache into a ragged one.

A method is a small dataclass with one verb, ``compress(kv, budget, ctx)``.
:class:`ScoredCompressor` narrows that to ``score(kv, ctx)`` and owns the
selection: protected sink / recent tokens, then one top-k per layer over all
(head, token) pairs, so that heads get different budgets.

Methods serialize as ``{"name": ..., "config": {...}}`` (every dataclass field
is config) and declare what they need through capability flags rather than
being special-cased by the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..errors import ConfigError
from ..options import check_keep
from ..prefill import KV
from ..ragged import CompressedKV


@dataclass
class Budget:
    """How much to keep. ``keep`` is the fraction of (layer, head, token) entries kept.

    Per-layer totals are ``round(keep * kv_heads * tokens)``; ``layer_totals`` sets them
    explicitly, ``head_totals`` (layers x kv_heads, from a pilot allocation) sets every
    head's count, overriding the method's own split.
    """

    keep: float
    layer_totals: list[int] | None = None
    head_totals: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.keep = check_keep(self.keep, auto=False)

    @staticmethod
    def uniform_heads(keep: float, layers: int, heads: int, tokens: int) -> "Budget":
        """Every (layer, head) keeps the same count: the pilot run's budget."""
        k = max(1, min(tokens, round(keep * tokens)))
        return Budget(keep=keep, head_totals=[[k] * heads for _ in range(layers)])

    def per_head(self, layers: int, heads: int, tokens: int) -> torch.Tensor:
        """(layers, heads) counts: ``head_totals`` if set, else each layer's total split evenly."""
        if self.head_totals is not None:
            t = torch.tensor(self.head_totals, dtype=torch.long)
            if tuple(t.shape) != (layers, heads):
                raise ConfigError(f"head_totals has shape {tuple(t.shape)}, expected {(layers, heads)}")
            return t.clamp(1, tokens)
        out = torch.zeros(layers, heads, dtype=torch.long)
        for layer, total in enumerate(self.totals(layers, heads, tokens)):
            base, extra = divmod(total, heads)
            out[layer] = torch.tensor([min(tokens, base + (h < extra)) for h in range(heads)])
        return out.clamp(1, tokens)

    def totals(self, layers: int, heads: int, tokens: int) -> list[int]:
        if self.layer_totals is not None:
            return [max(heads, min(heads * tokens, int(t))) for t in self.layer_totals]
        per_layer = max(heads, min(heads * tokens, round(self.keep * heads * tokens)))
        return [per_layer] * layers


@dataclass
class CompressionContext:
    """What a method may use besides the KV cache.

    model: the LoadedModel (None in tests on random tensors)
    seed:  for methods with randomness; the same seed gives the same output
    keep:  the budget's keep, for scorers whose scores depend on it
    """

    model: object | None = None
    seed: int = 0
    keep: float = 1.0


@dataclass
class Prepared:
    """What :meth:`Compressor.prepare` may return: ``budget -> CompressedKV`` for one prefill, and what a
    pilot allocation can share instead of computing again.

    pilot:     ``budget -> CompressedKV``, the pilot's compression on this prefill (None: the pilot
               method compresses on its own, or it is the method itself and calls this object)
    reference: the reference queries the method fits to (:class:`kvforge.methods.fit.Reference`), whose
               full-cache targets the pilot's difficulty measurement then reuses
    """

    compress: Callable[[Budget], CompressedKV]
    pilot: Callable[[Budget], CompressedKV] | None = None
    reference: object | None = None

    def __call__(self, budget: Budget) -> CompressedKV:
        return self.compress(budget)


_REGISTRY: dict[str, type["Compressor"]] = {}


def register(cls: type["Compressor"]) -> type["Compressor"]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, str]:
    """Registered method names with the first line of their docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in sorted(_REGISTRY.items())}


def get_method(name: str, **config) -> "Compressor":
    """The registered method ``name`` with options; also takes a spec ``name:key=value:key=value``
    (values read as JSON when they parse, else as text), as ``kvforge eval --methods`` does."""
    name, *options = name.split(":")
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key:
            raise ConfigError(f"method option {option!r} is not key=value (spec: name:key=value:key=value)")
        try:
            config[key] = json.loads(value)
        except ValueError:
            config[key] = value
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].from_dict({"name": name, "config": config})


@dataclass
class Compressor:
    """Base class: ``compress(kv, budget, ctx) -> CompressedKV``."""

    name: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False  # prefill must capture the post-RoPE queries
    needs_pre_rope_keys: ClassVar[bool] = False  # prefill must capture the keys before RoPE
    needs_surprisal: ClassVar[bool] = False  # prefill must compute every token's surprisal
    produces_beta: ClassVar[bool] = False  # output carries an attention bias
    needs_model: ClassVar[bool] = False  # runs the model itself (ctx.model, kv.input_ids): no random-tensor use
    own_prefill: ClassVar[bool] = False  # has compress_ids(lm, ids, budget, ctx): a plain keep needs no dense prefill

    @property
    def keeps_originals(self) -> bool:
        """Whether the output's keys and values are original entries (False: fitted or optimized)."""
        return True

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        raise NotImplementedError

    def prepare(self, kv: KV, ctx: CompressionContext) -> Callable[[Budget], CompressedKV]:
        """A function budget -> compressed KV for one prefill, sharing the work budgets have in common.

        Calibration calls it for several candidate keeps; methods that score once
        (:class:`ScoredCompressor`) only repeat the selection. A method may return a
        :class:`Prepared` to share its pilot and reference queries with a pilot allocation too.
        """
        return lambda budget: self.compress(kv, budget, dataclasses.replace(ctx, keep=budget.keep))

    def to_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Compressor":
        name = data.get("name")
        target = _REGISTRY.get(name) if cls is Compressor else cls
        if target is None or target.name != name:
            raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
        fields = {f.name for f in dataclasses.fields(target)}
        config = dict(data.get("config") or {})
        unknown = set(config) - fields
        if unknown:
            raise ConfigError(f"method {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
        try:
            return target(**config)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"method {name!r}: invalid config {config}: {exc}") from exc


def gather(kv: KV, keep_mask: torch.Tensor) -> CompressedKV:
    """Build the ragged cache of the entries where ``keep_mask`` (L, H, T) is true."""
    L, H, T, D = kv.shape
    lengths = keep_mask.sum(dim=2).to(torch.int32)  # (L, H)
    positions, keys, values = [], [], []
    for layer in range(L):
        head_idx, tok_idx = keep_mask[layer].nonzero(as_tuple=True)  # head-major, ascending tokens
        positions.append(tok_idx.to(torch.int32))
        keys.append(kv.keys[layer, head_idx, tok_idx])  # (N_l, D)
        values.append(kv.values[layer, head_idx, tok_idx])
    return CompressedKV(lengths=lengths, positions=positions, keys=keys, values=values)


def keep_all(kv: KV) -> CompressedKV:
    """The whole cache in the ragged layout: the lossless reference."""
    return gather(kv, torch.ones(kv.shape[:3], dtype=torch.bool))


@dataclass
class ScoredCompressor(Compressor):
    """Keep, per layer, the top-scoring (head, token) entries plus protected tokens.

    sink:   the first ``sink`` tokens of every head are always kept
    recent: the last ``recent`` tokens of every head are always kept
    scope:  "layer": one top-k per layer over its heads (every layer keeps the same share);
            "global": one top-k over all layers and heads (layers get different shares too);
            "head": one top-k per head (uniform budgets, as kvpress's ScorerPress)
    """

    sink: int = 4
    recent: int = 8
    scope: str = "layer"

    def __post_init__(self) -> None:
        if self.scope not in ("layer", "global", "head"):
            raise ValueError(f"scope must be 'layer', 'global' or 'head', got {self.scope!r}")
        if self.sink < 0 or self.recent < 0:
            raise ValueError("sink and recent must be >= 0")

    def score(self, kv: KV, ctx: CompressionContext) -> torch.Tensor:
        """Importance of every entry, (layers, kv_heads, tokens); higher is kept first."""
        raise NotImplementedError

    def scorer(self, kv: KV, ctx: CompressionContext) -> Callable[[float], torch.Tensor]:
        """Scores as a function of keep, with the expensive part computed once.

        The default scores once; a method whose scores depend on the keep (a blend
        weight, say) overrides this to compute its parts once and combine per keep.
        """
        scores = self.score(kv, ctx)
        return lambda keep: scores

    def prepare(self, kv: KV, ctx: CompressionContext) -> Callable[[Budget], CompressedKV]:
        scorer = self.scorer(kv, ctx)

        def compress_at(budget: Budget) -> CompressedKV:
            scores = scorer(budget.keep)
            if tuple(scores.shape) != tuple(kv.shape[:3]):
                raise ValueError(f"{self.name} scores have shape {tuple(scores.shape)}, expected {tuple(kv.shape[:3])}")
            return gather(kv, self.select(scores, budget))

        return compress_at

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        return self.prepare(kv, dataclasses.replace(ctx, keep=budget.keep))(budget)

    def select(self, scores: torch.Tensor, budget: Budget) -> torch.Tensor:
        """Keep mask (L, H, T) of the top ``budget`` entries of ``scores`` plus the protected tokens."""
        L, H, T = scores.shape
        scores = torch.nan_to_num(scores.to(torch.float32), nan=-torch.inf).clone()
        protected = torch.zeros(T, dtype=torch.bool)
        protected[: max(self.sink, 1)] = True  # at least one entry per head, always
        if self.recent > 0:
            protected[-self.recent:] = True
        scores[:, :, protected] = torch.inf
        keep_mask = torch.zeros(L, H, T, dtype=torch.bool)
        totals = budget.totals(L, H, T)
        floor = H * int(protected.sum())
        if budget.head_totals is not None:  # a pilot allocation fixed every head's count
            counts = budget.per_head(L, H, T).clamp_min(int(protected.sum()))
            for layer in range(L):
                for h in range(H):
                    top = torch.topk(scores[layer, h], k=int(counts[layer, h]), sorted=False).indices
                    keep_mask[layer, h, top] = True
        elif self.scope == "global":
            total = max(sum(totals), L * floor)
            top = torch.topk(scores.reshape(-1), k=min(total, L * H * T), sorted=False).indices
            keep_mask.view(-1)[top] = True
        elif self.scope == "head":
            for layer, total in enumerate(totals):
                k = min(max(total // H, floor // H), T)
                top = torch.topk(scores[layer], k=k, dim=-1, sorted=False).indices  # (H, k)
                keep_mask[layer].scatter_(1, top, True)
        else:
            for layer, total in enumerate(totals):
                top = torch.topk(scores[layer].reshape(-1), k=min(max(total, floor), H * T), sorted=False).indices
                keep_mask[layer].view(-1)[top] = True
        return keep_mask
