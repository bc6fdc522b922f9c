"""KV-Distill's learned parts: a token scorer and LoRA adapters routed to the kept tokens only.

The adapter is a directory:

    adapter_config.json, adapter_model.safetensors   peft's LoRA (rank-stabilized) on the attention projections
    scorer.safetensors                               the scorer: a two-layer MLP over one layer's input hidden states
    kvforge-distill.json                             kvforge's config, the base model's identity, the training record

Two kinds of scorer (``AdapterConfig.scorer``):

token   one score per token, the same tokens kept in every layer and head (the paper's design; format 1's
        only kind), each kept entry's attention scaled by ``sigmoid(score)`` (``beta = log sigmoid``)
entry   one score per (layer, KV head, token), distilled from the replay's input x gradient attribution
        (KVgradPress's signal, which kvforge's held-out split found to keep needles); one top-k over every
        entry of the document, so layers and heads get ragged shares; each head's kept entries get the
        attention mass the dropped ones had (``beta``: :func:`kvforge.train.student.mass_beta`)

peft owns the LoRA modules and their files. The routing is kvforge's: a forward hook on every
``lora_B`` multiplies the LoRA delta by a per-position mask (per layer with an entry scorer: the tokens
some head of that layer keeps), so that the kept tokens of a document run through the adapted
projections and every other position (dropped tokens, the question, the answer) through the frozen base
weights. The adapted model is a private copy: the shared :class:`LoadedModel` is never changed.

peft is imported in this package only; the runtime never imports it (an artifact built with an adapter is
an ordinary ragged cache, answered by the base model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..containers import atomic_file, canonical_json
from ..errors import ConfigError, FormatError, IncompatibleModelError, UnsupportedModelError

FORMAT = "kvforge-distill-adapter"
FORMAT_VERSION = 2  # 2: the entry scorer and the mass beta (a format 1 adapter reads as scorer="token")
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "kvforge-distill.json"
SCORER_FILE = "scorer.safetensors"
SHIPPED = "shipped"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SCORERS = ("token", "entry")


def shipped_path() -> Path:
    """The adapter shipped inside the package, trained for the embedded model on Python's documentation."""
    return Path(__file__).resolve().parent.parent / "adapters" / "distill-smollm2"


def resolve_adapter(spec: str | os.PathLike) -> Path:
    """``"shipped"`` or a directory holding an adapter; a clear error otherwise."""
    path = shipped_path() if str(spec) == SHIPPED else Path(spec).expanduser().resolve()
    if not (path / CONFIG_FILE).is_file():
        what = "the shipped adapter is missing from this installation" if str(spec) == SHIPPED else \
            f"{path} is not a kvforge distill adapter (no {CONFIG_FILE})"
        raise ConfigError(f"{what}; pass a directory written by `kvforge train distill -o DIR`, or 'shipped'")
    return path


@dataclass
class AdapterConfig:
    """What an adapter is; every field is recorded in ``kvforge-distill.json``.

    rank, alpha:   the LoRA rank and alpha (rank-stabilized: the delta is scaled by alpha / sqrt(rank))
    targets:       the attention projections adapted, for the kept tokens only
    first_layer:   the first adapted layer; the scorer reads the hidden states entering it (the layers
                   before it run unchanged, so the dense prefill's keys and values of those layers are reused)
    scorer_hidden: the scorer's inner width
    sink, recent:  the first / last tokens of a document, always kept
    scorer:        "token" (one score per token) or "entry" (one per layer, KV head and token): module docstring
    layers, heads: the entry scorer's output shape (the base model's layers and KV heads)
    reference:     with the entry scorer, the document's last ``reference`` queries measure each head's mass
    base_model:    the identity of the model the adapter was trained on (weights and tokenizer sha256, shape)
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    first_layer: int = 6
    scorer_hidden: int = 128
    sink: int = 4
    recent: int = 4
    scorer: str = "entry"
    layers: int = 0
    heads: int = 0
    reference: int = 64
    base_model: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ConfigError(f"adapter scorer {self.scorer!r}: one of {', '.join(SCORERS)}")

    @property
    def outputs(self) -> int:
        """Scores per token: 1 (token) or layers x heads (entry)."""
        return self.layers * self.heads if self.scorer == "entry" else 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @staticmethod
    def from_dict(d: dict, version: int = FORMAT_VERSION) -> "AdapterConfig":
        d = dict(d)
        d["targets"] = tuple(d.get("targets", TARGETS))
        if version == 1:  # format 1 had the token scorer only
            d.setdefault("scorer", "token")
        return AdapterConfig(**d)


def model_identity(lm) -> dict:
    """The base model's identity as an adapter records it."""
    i = lm.info
    return {"name": i.name, "weights_sha256": i.weights_sha256, "tokenizer_sha256": i.tokenizer_sha256,
            "architecture": i.architecture, "num_layers": i.num_layers, "hidden_size": int(lm.model.config.hidden_size)}


def default_config(lm, **overrides) -> AdapterConfig:
    """The default adapter for ``lm``: the scorer at a fifth of the depth (layer 6 of 30; the paper: 6 of 32)."""
    overrides.setdefault("scorer_hidden", 256 if overrides.get("scorer", "entry") == "entry" else 128)
    cfg = AdapterConfig(first_layer=max(1, round(lm.info.num_layers / 5)), layers=lm.info.num_layers,
                        heads=lm.info.num_kv_heads, base_model=model_identity(lm), **overrides)
    check_config(cfg, lm)
    return cfg


def check_config(cfg: AdapterConfig, lm) -> None:
    if cfg.rank < 1 or cfg.scorer_hidden < 1:
        raise ConfigError(f"adapter rank and scorer width must be >= 1, got {cfg.rank} and {cfg.scorer_hidden}")
    if not 0 < cfg.first_layer < lm.info.num_layers:
        raise ConfigError(f"first adapted layer {cfg.first_layer} is outside 1..{lm.info.num_layers - 1}")
    if cfg.scorer == "entry" and (cfg.layers, cfg.heads) != (lm.info.num_layers, lm.info.num_kv_heads):
        raise IncompatibleModelError(
            f"the adapter scores {cfg.layers} layers x {cfg.heads} KV heads, but {lm.info.name} has "
            f"{lm.info.num_layers} x {lm.info.num_kv_heads}; train an adapter for this model")
    attn = lm.model.model.layers[0].self_attn
    missing = [t for t in cfg.targets if not isinstance(getattr(attn, t, None), torch.nn.Linear)]
    if missing:
        raise UnsupportedModelError(
            f"{lm.info.name}: distill adapts the attention projections {list(cfg.targets)}, but this model's "
            f"attention has no {missing} (a fused projection such as qkv_proj); use a training-free method")


POSITION_FEATURES = 4


def position_features(T: int, device=None) -> torch.Tensor:
    """(T, 4): relative depth, log distance from the start and from the end (scaled by log T), and 1."""
    t = torch.arange(T, dtype=torch.float32, device=device)
    log_t = math.log(max(T, 2))
    return torch.stack([t / T, torch.log1p(t) / log_t, torch.log1p(T - 1 - t) / log_t, torch.ones_like(t)], dim=-1)


class Scorer(torch.nn.Module):
    """Scores from the hidden states entering ``first_layer``: (T, d) -> (T,) (token) or (L, H, T) (entry).

    The input is RMS-normalized (the residual stream's scale grows with depth). The token scorer's output
    bias starts at +2, so that sigmoid(score), the weight a kept entry's attention is scaled by, starts
    near 0.88. The entry scorer also reads each token's position (:func:`position_features`): how much the
    replay needs an entry depends on where it sits, and its output is a log attribution per (layer, head)."""

    def __init__(self, hidden: int, inner: int, cfg: "AdapterConfig | None" = None):
        super().__init__()
        self.shape = (cfg.layers, cfg.heads) if cfg is not None and cfg.scorer == "entry" else None
        extra = POSITION_FEATURES if self.shape else 0
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden + extra, inner), torch.nn.GELU(),
                                       torch.nn.Linear(inner, cfg.outputs if cfg is not None else 1))
        if not self.shape:
            torch.nn.init.constant_(self.net[2].bias, 2.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if not self.shape:
            return self.net(h).squeeze(-1)
        T = h.shape[0]
        out = self.net(torch.cat([h, position_features(T, h.device)], dim=-1))  # (T, L * H)
        return out.view(T, *self.shape).permute(1, 2, 0)  # (L, H, T)


class Routing:
    """The per-position LoRA mask the hooks read: None (adapter off), or 1 where adapted: (S,) float for every
    layer, or (L, S) float, a row per layer."""

    def __init__(self):
        self.mask: torch.Tensor | None = None


class DistillModel:
    """A private copy of the base model with the routed LoRA adapter (peft) and the scorer."""

    def __init__(self, lm, cfg: AdapterConfig, *, trainable: bool, weights: Path | None = None):
        from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

        check_config(cfg, lm)
        self.lm, self.cfg = lm, cfg
        base = copy.deepcopy(lm.model)
        for p in base.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=True, lora_dropout=0.0, bias="none",
                          target_modules=list(cfg.targets),
                          layers_to_transform=list(range(cfg.first_layer, lm.info.num_layers)))
        self.peft = get_peft_model(base, lora)
        self.model = self.peft.base_model.model  # the CausalLM, its projections wrapped by peft
        hidden = int(lm.model.config.hidden_size)
        self.scorer = Scorer(hidden, cfg.scorer_hidden, cfg).to(next(lm.model.parameters()).device)
        if weights is not None:
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.peft, load_peft_weights(str(weights)))
            self.scorer.load_state_dict(load_file(str(weights / SCORER_FILE)))
        self.routing = Routing()
        self._hooks = [m.register_forward_hook(self._router(_layer_of(name))) for name, m in self.model.named_modules()
                       if name.endswith("lora_B.default")]
        if not self._hooks:
            raise UnsupportedModelError(f"{lm.info.name}: peft found none of {list(cfg.targets)} to adapt")
        for p in self.parameters():
            p.requires_grad_(trainable)
        self.peft.train(False)

    def _router(self, layer: int):
        def route(module, args, output):
            mask = self.routing.mask
            if mask is None:
                return output * 0.0
            if mask.dim() == 2:
                mask = mask[layer]
            return output * mask.to(output.dtype)[None, :, None]
        return route

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: the LoRA matrices and the scorer."""
        return self.lora_parameters() + list(self.scorer.parameters())

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if "lora_" in n]

    @contextmanager
    def routed(self, mask: torch.Tensor | None):
        """Run the model with the adapter on where ``mask`` ((S,) or (L, S)) is 1 (None: the base model exactly)."""
        saved = self.routing.mask
        self.routing.mask = mask
        try:
            if mask is None:
                with self.peft.disable_adapter():
                    yield self.model
            else:
                yield self.model
        finally:
            self.routing.mask = saved

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {**{f"lora.{k}": v for k, v in get_peft_model_state_dict(self.peft).items()},
                **{f"scorer.{k}": v for k, v in self.scorer.state_dict().items()}}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.scorer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("scorer.")})

    def save(self, out: Path, record: dict | None = None) -> str:
        """Write the adapter files into ``out``, each atomically, ``kvforge-distill.json`` last (the file a
        reader looks for first); returns the adapter's sha256."""
        import tempfile

        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
            tmp = Path(tmp)
            self.peft.save_pretrained(str(tmp))
            save_file({k: v.detach().contiguous().cpu() for k, v in self.scorer.state_dict().items()},
                      str(tmp / SCORER_FILE))
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.cfg.to_dict(),
                    "training": record or {}}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            for name in ("adapter_config.json", "adapter_model.safetensors", SCORER_FILE, CONFIG_FILE):
                with atomic_file(out / name) as fh:
                    fh.write((tmp / name).read_bytes())
        return adapter_sha256(out)


def adapter_sha256(path: Path) -> str:
    """The adapter's identity: sha256 over its weight files and its config (not the training record)."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", SCORER_FILE):
        h.update(name.encode() + b"\0" + hashlib.sha256((path / name).read_bytes()).digest())
    h.update(canonical_json(read_meta(path)["config"]).encode())
    return h.hexdigest()


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read {CONFIG_FILE}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise FormatError(f"{path}: not a {FORMAT} of version {' or '.join(map(str, READABLE_VERSIONS))} (found "
                          f"{meta.get('format')!r} v{meta.get('format_version')!r}); retrain it with this kvforge")
    return meta


def read_config(path: Path) -> AdapterConfig:
    """The adapter's config, whatever readable format version it was written in."""
    meta = read_meta(path)
    try:
        return AdapterConfig.from_dict(meta["config"], meta["format_version"])
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{path}: {CONFIG_FILE} has an unreadable config ({exc}); retrain it with this kvforge") from exc


def _layer_of(module_name: str) -> int:
    """The decoder layer a module belongs to, from its name (``...layers.7.self_attn.q_proj.lora_B.default``)."""
    found = re.search(r"\.layers\.(\d+)\.", module_name)
    if found is None:
        raise UnsupportedModelError(f"cannot tell which decoder layer {module_name!r} belongs to")
    return int(found.group(1))


def check_base(cfg: AdapterConfig, lm, where: str) -> None:
    """Refuse an adapter trained on another base model (weights or tokenizer)."""
    mine, theirs = model_identity(lm), cfg.base_model
    for key in ("weights_sha256", "tokenizer_sha256"):
        if theirs.get(key) != mine[key]:
            raise IncompatibleModelError(
                f"{where}: the adapter was trained on {theirs.get('name')!r} ({key} {str(theirs.get(key))[:12]}...) but "
                f"the loaded model is {mine['name']!r} ({mine[key][:12]}...); train an adapter for this model "
                "with `kvforge train distill --model ...`")


_LOADED: dict[tuple, DistillModel] = {}
_LOCK = threading.Lock()


def load_adapter(spec: str | os.PathLike, lm, *, trainable: bool = False) -> tuple[DistillModel, str]:
    """The adapter ``spec`` (``"shipped"`` or a directory) on ``lm``: (model, adapter sha256). Cached when frozen."""
    path = resolve_adapter(spec)
    cfg = read_config(path)
    check_base(cfg, lm, str(path))
    digest = adapter_sha256(path)
    if trainable:
        return DistillModel(lm, cfg, trainable=True, weights=path), digest
    key = (digest, id(lm.model))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = DistillModel(lm, cfg, trainable=False, weights=path)
        return _LOADED[key], digest
