"""``distill``: KV-Distill's learned compression (Chari, Qin and Van Durme 2025), with kvforge's ragged budgets.

A trained adapter (``kvforge train distill``; the default is the one shipped for the embedded model)
holds a scorer and LoRA adapters. Building a document:

1. the scorer rates the document from the hidden states entering the adapter's first layer (the base
   model's own: the layers before it are not adapted, and only they run for the scores);
2. the entries to keep are chosen: with an entry scorer (the default adapter's), one score per (layer,
   KV head, token), learned from the replay's input x gradient attribution, and one top-k over all the
   document's entries, so layers and heads keep ragged shares; with a token scorer (the paper's), every
   (layer, head) keeps the same top tokens;
3. the document is prefilled again with the adapter routed to the kept tokens (per layer: the tokens
   some head of it keeps; every other token runs on the base weights), so that the kept tokens' keys and
   values absorb what the dropped ones carried;
4. each kept entry gets its ``beta``: with an entry scorer, the log of the weight with which it carries
   the full cache's attention mass for the document's own queries, rotated to its end, fitted by least
   squares (:func:`kvforge.methods.fit.match_mass`; ``match=0``: one beta per head, the head's mass lost
   to the dropped entries, :func:`kvforge.train.student.mass_beta`); the kept values are then refitted
   under it (``refit``); with a token scorer, ``log sigmoid(score)``.

Budgets: the scorer's one top-k is distill's allocation (very ragged: a few layers keep a fifth to a half of
their entries, most 1-3%). ``--allocate pilot`` gives heads their counts (each keeps its top entries by score) but
measured far worse (validation: KL 0.44 against 0.11 at keep 0.1, no needle found; docs/experiments/distill.md). The
artifact is an ordinary ragged cache answered by the unmodified model; the method's config records the
adapter's sha256 and config, and a build refuses an adapter whose sha256 disagrees with the one asked for.

Cost: the build calls :meth:`Distill.compress_ids` for a plain keep, without a dense prefill: with an
entry scorer that is one forward (the scores are taken where it reaches the adapter's first layer), then
the refit and beta. ``--keep auto``, the pilot and ``kvforge eval`` start from the dense prefill and add
the scorer's pass (the first ``first_layer`` layers) once per document and one adapted prefill per budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..prefill import KV, attention_scale, prefill
from ..ragged import CompressedKV
from .base import Budget, CompressionContext, Compressor, gather, register


MATCH_SAMPLES = 256  # reference queries (document queries rotated to its end) of the matched beta and the refit
REFIT_RIDGE = 0.1  # the value refit's ridge (kvforge.methods.fit.fit_values)


class _Stop(Exception):
    pass


def _score(dm, ids: list[int]) -> torch.Tensor:
    """(T,) or (L, H, T) scores: the base model up to the adapter's first layer (stopped there), then the scorer."""
    from ..train.student import layer_input

    store: list = []

    def grab(module, args, kwargs):
        store.append(layer_input(args, kwargs))
        raise _Stop

    device = next(dm.model.parameters()).device
    with torch.inference_mode(), dm.routed(None) as model:
        hook = model.model.layers[dm.cfg.first_layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return dm.scorer(store[0][0]).float().cpu()


def _adapted_prefill(dm, ids: list[int], route: torch.Tensor, queries: bool = False) -> KV:
    """The prefill (keys and values (L, H, T, D) float32 on the CPU; the queries if asked) with the adapter on
    where ``route`` ((T,) or (L, T)) is 1."""
    device = next(dm.model.parameters()).device
    with dm.routed(route.to(device)) as model:
        return prefill(model, ids, queries=queries)


def _scored_prefill(dm, ids: list[int], pick, lora: int, queries: bool) -> tuple[torch.Tensor, KV]:
    """:func:`_score` and :func:`_adapted_prefill` in one forward: (kept (L, H, T) bool, the adapted prefill).

    The layers before the adapter's first one are the base model's, so the states entering it are the
    scorer's input in either order; a hook there scores them, lets ``pick`` choose the entries and routes
    the adapter (times ``lora``) to the tokens each layer keeps, before the adapted layers run.
    """
    from ..train.student import layer_input, route_of

    device = next(dm.model.parameters()).device
    picked: dict = {}

    def route(module, args, kwargs):
        hidden = layer_input(args, kwargs)  # (1, T, d)
        with torch.no_grad():
            picked["kept"] = pick(dm.scorer(hidden[0]).float().cpu())
        dm.routing.mask = (route_of(picked["kept"]) * lora).to(device)

    L = dm.model.config.num_hidden_layers
    with dm.routed(torch.zeros(L, len(ids), device=device)) as model:  # no layer before the hook is adapted
        hook = model.model.layers[dm.cfg.first_layer].register_forward_pre_hook(route, with_kwargs=True)
        try:
            kv = prefill(model, ids, queries=queries)
        finally:
            hook.remove()
    return picked["kept"], kv


def _pick_entries(scores: torch.Tensor, budget: Budget, cfg) -> torch.Tensor:
    """(L, H, T) bool: the pilot's count per head where it fixed them, else one top-k over all entries."""
    from ..train.student import select_entries, select_per_head

    L, H, T = scores.shape
    if budget.head_totals is not None:
        return select_per_head(scores, budget.per_head(L, H, T), cfg.sink, cfg.recent)
    return select_entries(scores, sum(budget.totals(L, H, T)), cfg.sink, cfg.recent)


def _entry_beta(dm, kv: KV, kept: torch.Tensor) -> torch.Tensor:
    """(L, H) the mass beta of every head's kept entries, from the document's last queries."""
    from ..train.student import mass_beta

    scale = attention_scale(dm.model, kv.shape[-1])
    T, R = kv.shape[2], min(dm.cfg.reference, kv.shape[2])
    return torch.stack([mass_beta(kv.queries[layer, :, T - R:], kv.keys[layer], kept[layer], scale)
                        for layer in range(kv.shape[0])])


@register
@dataclass
class Distill(Compressor):
    """Keep the tokens a trained scorer picks, their keys and values from a prefill through routed LoRA (KV-Distill)."""

    name = "distill"
    needs_model = True
    produces_beta = True
    own_prefill = True
    adapter: str = "shipped"  # "shipped" (the embedded model's) or an adapter directory
    adapter_sha256: str = ""  # filled in from the adapter; a build refuses an adapter that differs
    adapter_config: dict = field(default_factory=dict)  # the adapter's config, recorded beside the method
    lora: int = 1  # 0: keep the scorer's entries of a base-model prefill (what the LoRA adds, measured)
    beta: int = 1  # 0: no attention bias on the kept entries
    refit: int = 1  # kept values refitted by least squares to the adapted prefill's reference queries (0: off)
    # with beta=1 and an entry scorer: 1, a beta per kept entry fitted to the full cache's mass (fit.match_mass), the
    # values refitted under it; 0, one mass beta per head (a token scorer's beta is its scores'). Chosen on the
    # tuning split: KL q+a 1.71x / 1.36x lower at keeps 0.1 / 0.05 (18/18, 16/18 documents), needles 7 / 5 against
    # 8 / 6; build cost +2% (docs/experiments/distill.md)
    match: int = 1

    def __post_init__(self) -> None:
        if any(v not in (0, 1) for v in (self.lora, self.beta, self.refit, self.match)):
            raise ValueError("lora, beta, refit and match must be 0 or 1")

    @property
    def keeps_originals(self) -> bool:
        return False

    def _load(self, lm):
        from ..train.adapter import load_adapter

        dm, digest = load_adapter(self.adapter, lm)
        if self.adapter_sha256 and self.adapter_sha256 != digest:
            raise ConfigError(f"distill: the adapter {self.adapter!r} has sha256 {digest[:12]}..., not the "
                              f"{self.adapter_sha256[:12]}... asked for; rebuild with the adapter you have")
        self.adapter_sha256, self.adapter_config = digest, dm.cfg.to_dict()
        return dm

    def to_dict(self) -> dict:
        if not self.adapter_sha256:
            from ..train.adapter import adapter_sha256, read_config, resolve_adapter

            path = resolve_adapter(self.adapter)
            self.adapter_sha256 = adapter_sha256(path)
            self.adapter_config = read_config(path).to_dict()
        return super().to_dict()

    def _compressor(self, dm, ids: list[int], scores: torch.Tensor, shape, seed: int = 0):
        if dm.cfg.scorer == "entry":
            return self._entry_compressor(dm, ids, scores, seed)
        from ..train.student import protected_tokens, select_tokens

        L, H, T = shape
        cfg = dm.cfg

        def compress_at(budget: Budget) -> CompressedKV:
            counts = budget.per_head(L, H, T)  # (L, H)
            route = select_tokens(scores, int(counts.max()), cfg.sink, cfg.recent)
            adapted = _adapted_prefill(dm, ids, route.float())
            keys, values = adapted.keys, adapted.values
            order = torch.where(route, scores, -torch.inf)  # ranks inside the routed set; protected first
            protected = protected_tokens(T, cfg.sink, cfg.recent)
            order = torch.where(protected, torch.inf, order)
            beta_all = torch.nn.functional.logsigmoid(scores)
            positions, ks, vs, betas, lengths = [], [], [], [], []
            for layer in range(L):
                pos_l = []
                for h in range(H):
                    n = min(int(counts[layer, h]), int(route.sum()))
                    n = max(n, int(protected.sum()))
                    pos_l.append(torch.topk(order, k=n, sorted=False).indices.sort().values)
                heads = torch.cat([torch.full((len(p),), h) for h, p in enumerate(pos_l)])
                toks = torch.cat(pos_l)
                lengths.append([len(p) for p in pos_l])
                positions.append(toks.to(torch.int32))
                ks.append(keys[layer, heads, toks])
                vs.append(values[layer, heads, toks])
                betas.append(beta_all[toks].float())
            return CompressedKV(lengths=torch.tensor(lengths, dtype=torch.int32), positions=positions, keys=ks, values=vs, beta=betas)

        return compress_at

    def _entry_compressor(self, dm, ids: list[int], scores: torch.Tensor, seed: int = 0):
        from ..train.student import route_of

        def compress_at(budget: Budget) -> CompressedKV:
            kept = _pick_entries(scores, budget, dm.cfg)
            kv = _adapted_prefill(dm, ids, route_of(kept) * self.lora, queries=self._needs_queries)
            return self._finish(dm, kv, kept, seed)

        return compress_at

    @property
    def _needs_queries(self) -> bool:
        return bool(self.beta or self.refit)

    def _finish(self, dm, kv: KV, kept: torch.Tensor, seed: int) -> CompressedKV:
        """The kept entries (L, H, T) of the adapted prefill ``kv``, values refitted and beta set as configured."""
        from .fit import reference
        from .select_fit import matched_beta, refit_values

        out = gather(kv, kept)
        match = bool(self.beta and self.match)
        ref = reference(kv, dm.model, MATCH_SAMPLES, "end", seed) if self.refit or match else None
        if match:  # per-entry beta first: the values are then fitted under it
            out.beta = matched_beta(kv, out, ref)
        if self.refit:  # a head's constant mass beta cancels inside its kept entries' softmax: fitted without it
            out = refit_values(kv, out, ref, REFIT_RIDGE)
        if self.beta and not match:
            beta = _entry_beta(dm, kv, kept)  # (L, H)
            out.beta = [beta[layer].repeat_interleave(out.lengths[layer].long()) for layer in range(kv.shape[0])]
        return out

    def prepare(self, kv: KV, ctx: CompressionContext):
        if ctx.model is None or kv.input_ids is None:
            raise ValueError("distill needs the model and the document's token ids (a real prefill)")
        dm = self._load(ctx.model)
        return self._compressor(dm, kv.input_ids, _score(dm, kv.input_ids), kv.shape[:3], ctx.seed)

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        return self.prepare(kv, ctx)(budget)

    def compress_ids(self, lm, ids: list[int], budget: Budget, ctx: CompressionContext) -> CompressedKV:
        """Compress a document from its ids alone (no dense prefill): the build's path for a plain keep."""
        dm = self._load(lm)
        if dm.cfg.scorer == "entry":  # one pass: scored where the adapted prefill reaches the adapter's layers
            kept, kv = _scored_prefill(dm, ids, lambda scores: _pick_entries(scores, budget, dm.cfg), self.lora,
                                       self._needs_queries)
            return self._finish(dm, kv, kept, ctx.seed)
        L, H = lm.info.num_layers, lm.info.num_kv_heads
        return self._compressor(dm, ids, _score(dm, ids), (L, H, len(ids)), ctx.seed)(budget)
