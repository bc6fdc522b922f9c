"""``distill``: KV-Distill's learned compression (Chari, Qin and Van Durme 2025), with kvforge's ragged budgets.

A trained adapter (``kvforge train distill``; the default is the one shipped for the embedded model)
holds a scorer and LoRA adapters. Building a document:

1. the scorer rates every token from the hidden states entering the adapter's first layer (the base
   model's own: the layers before it are not adapted);
2. the document is prefilled again with the adapter routed to the tokens that will be kept (every other
   token runs on the base weights), so that the kept tokens' keys and values absorb what the dropped ones
   carried;
3. every (layer, head) keeps its top tokens by score (sink and recent tokens protected) and each kept entry
   gets ``beta = log sigmoid(score)``, the attention scaling the adapter was trained with.

Budgets: a plain keep gives every head the same count (the paper's one token set for all layers);
``--allocate pilot`` gives heads different counts (each then keeps its top tokens), and the adapter is
routed to the union. The artifact is an ordinary ragged cache answered by the unmodified model; the
method's config records the adapter's sha256 and config, and a build refuses an adapter whose sha256
disagrees with the one asked for.

Cost: the scorer's pass (the first ``first_layer`` layers) once per document, one adapted prefill per
budget; the build calls :meth:`Distill.compress_ids` without a dense prefill when nothing else needs one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..prefill import KV
from ..ragged import CompressedKV
from .base import Budget, CompressionContext, Compressor, register


class _Stop(Exception):
    pass


def _score(dm, ids: list[int]) -> torch.Tensor:
    """(T,) scores: the base model up to the adapter's first layer (stopped there), then the scorer."""
    store: list = []

    def grab(module, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])
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


def _adapted_prefill(dm, ids: list[int], route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (L, H, T, D) float32 on the CPU of a prefill with the adapter on where ``route`` (T,) is 1."""
    from transformers import DynamicCache

    device = next(dm.model.parameters()).device
    cache = DynamicCache(config=dm.model.config)
    with torch.inference_mode(), dm.routed(route.to(device)) as model:
        model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float().cpu()
    values = torch.stack([layer.values[0] for layer in cache.layers]).float().cpu()
    return keys, values


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
            from ..train.adapter import AdapterConfig, adapter_sha256, read_meta, resolve_adapter

            path = resolve_adapter(self.adapter)
            self.adapter_sha256 = adapter_sha256(path)
            self.adapter_config = AdapterConfig.from_dict(read_meta(path)["config"]).to_dict()
        return super().to_dict()

    def _compressor(self, dm, ids: list[int], scores: torch.Tensor, shape):
        from ..train.student import protected_tokens, select_tokens

        L, H, T = shape
        cfg = dm.cfg

        def compress_at(budget: Budget) -> CompressedKV:
            counts = budget.per_head(L, H, T)  # (L, H)
            route = select_tokens(scores, int(counts.max()), cfg.sink, cfg.recent)
            keys, values = _adapted_prefill(dm, ids, route.float())
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

    def prepare(self, kv: KV, ctx: CompressionContext):
        if ctx.model is None or kv.input_ids is None:
            raise ValueError("distill needs the model and the document's token ids (a real prefill)")
        dm = self._load(ctx.model)
        return self._compressor(dm, kv.input_ids, _score(dm, kv.input_ids), kv.shape[:3])

    def compress(self, kv: KV, budget: Budget, ctx: CompressionContext) -> CompressedKV:
        return self.prepare(kv, ctx)(budget)

    def compress_ids(self, lm, ids: list[int], budget: Budget, ctx: CompressionContext) -> CompressedKV:
        """Compress a document from its ids alone (no dense prefill): the build's path for a plain keep."""
        dm = self._load(lm)
        L, H = lm.info.num_layers, lm.info.num_kv_heads
        return self._compressor(dm, ids, _score(dm, ids), (L, H, len(ids)))(budget)
