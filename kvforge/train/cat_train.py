"""``kvforge train cat``: continued training that makes a model's KV cache compress better (KV-CAT).

Every step takes one document window (``context`` tokens), splits it ``n`` tokens before its end and
runs (kvforge.train.cat_policy):

- the frozen base model (the LoRA switched off) over the window, dense: its predictions of the ``n``
  suffix tokens are the teacher, and its attention over the prefix is the ``attention`` policy's score;
- the model with its LoRA over the window (dense) and a copy of the suffix that sees only the prefix
  slots the policy keeps (``k = keep * s`` per layer and KV head, or ``k`` per head on average over a
  layer with ``scope`` "layer"; the keep drawn log-uniformly from ``keep_range``).

A share ``recall`` of the steps are recall probes instead: the window's suffix is replaced by a copy of
a span of its own prefix (the text repeated, as a question quotes its document), so the teacher
predicts it from the earlier occurrence and the compressed copy must find that occurrence in the kept
slots: the retrieval a compressed cache fails at, which a plain continuation rarely asks for.

loss = ``kl_weight`` * KL(teacher || student, sparse) on the suffix copy's predictions
     + ``ntp_weight`` * next-token cross-entropy of the student's dense pass (``ntp_tokens`` positions)

The teacher is ``base`` (the frozen base model's dense predictions, the issue's reading) or ``self``
(the student's own dense predictions of the same tokens, in the same forward, without gradient: the
literal self-distillation, and what a CAT model is measured by, its compressed cache against its own
full one; the base forward is then skipped unless the attention policy needs its attention).

The first term teaches the model to carry what later tokens need in fewer slots; the second keeps its
uncompressed behaviour. Only the LoRA matrices (rank-stabilized, on q/k/v/o of every layer) and, for
the ``router`` policy, the router learn. The result is a CAT model (kvforge.catmodel): the LoRA as a
weight delta plus the base model's identity, a few MB, loaded with ``--model DIR``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..catmodel import (CAT_FILE, DELTA_FILE, EMBEDDED_CAT, FORMAT, FORMAT_VERSION, delta_sha256, is_cat_dir,
                        read_cat_meta, read_delta, shipped_cat_dir)
from ..containers import atomic_file
from ..errors import ConfigError, FormatError, IncompatibleModelError, TrainingError, UnsupportedModelError
from .cat_policy import POLICIES, SCOPES, Pass, Router, forward, install
from .data import make_windows
from .runs import (check_run_dir, load_checkpoint, log_uniform, mean_last, nonfinite, plot_losses, save_checkpoint,
                   training_corpus, training_model, warmup_cosine, write_losses)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TEACHERS = ("base", "self")


@dataclass
class CatConfig:
    """One run's settings, recorded in the CAT model and checked on resume.

    policy:      one of kvforge.train.cat_policy.POLICIES (random, attention, router, compactor)
    keep_range:  (lo, hi): each step's keep of the prefix slots, drawn log-uniformly; 0 < lo <= hi <= 1
    scope:       one of kvforge.train.cat_policy.SCOPES: the keep per head ("head") or per layer, heads
                 ragged as the compactor builds ("layer")
    suffix:      (lo, hi): tokens after the split, drawn uniformly (at most half the context)
    kl_weight, ntp_weight: the two terms of the loss
    ntp_tokens:  dense positions whose next-token loss is computed (the full-vocabulary head is costly)
    recall:      share of steps whose suffix repeats a span of the prefix (a recall probe), in [0, 1]
    teacher:     one of TEACHERS: what the sparse copy is distilled towards (see the module docstring)
    select_temp: > 0 (the compactor policy only): its selection also learns, straight through, with this
                 temperature in units of the scores' std (kvforge.train.cat_policy); 0: a plain selection
    select_grad: that gradient's scale (1: as is; below 1 a weaker push on the selection)
    """

    steps: int = 600
    context: int = 512
    policy: str = "router"
    keep_range: tuple[float, float] = (0.05, 0.5)
    suffix: tuple[int, int] = (32, 96)
    lr: float = 3e-4
    kl_weight: float = 1.0
    ntp_weight: float = 0.5
    ntp_tokens: int = 128
    rank: int = 8
    alpha: float = 16.0
    sink: int = 4
    seed: int = 0
    warmup: int = 10
    checkpoint_every: int = 25
    recall: float = 0.0
    teacher: str = "base"
    scope: str = "head"
    select_temp: float = 0.0
    select_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        lo, hi = (float(x) for x in self.keep_range)
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"--keep-range {lo},{hi}: need 0 < LO <= HI <= 1 (fractions of the prefix kept)")
        self.keep_range = (lo, hi)
        a, b = (int(x) for x in self.suffix)
        if not (4 <= a <= b):
            raise ConfigError(f"suffix {a},{b}: need 4 <= LO <= HI tokens after the split")
        self.suffix = (a, b)
        if self.context < max(128, 2 * a):
            raise ConfigError(f"--context {self.context}: use at least {max(128, 2 * a)} tokens")
        if self.steps < 1 or self.checkpoint_every < 1 or self.rank < 1 or self.ntp_tokens < 1:
            raise ConfigError("--steps, checkpoint_every, rank and ntp_tokens must be >= 1")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope {self.scope!r}: choose one of {', '.join(SCOPES)}")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHERS)}")
        if not all(x >= 0 and math.isfinite(x) for x in (self.select_temp, self.select_grad)):
            raise ConfigError(f"select_temp {self.select_temp}, select_grad {self.select_grad}: need finite values >= 0")
        if self.select_temp > 0 and self.policy != "compactor":
            raise ConfigError(f"select_temp {self.select_temp}: only the compactor policy's selection is learned "
                              f"straight through, not {self.policy!r}'s; use --policy compactor or select_temp 0")
        if self.select_grad != 1 and self.select_temp == 0:
            raise ConfigError(f"select_grad {self.select_grad} does nothing without select_temp > 0; set both")
        if not 0 <= self.recall <= 1:
            raise ConfigError(f"--recall {self.recall}: a share of the steps, in [0, 1]")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.kl_weight < 0 or self.ntp_weight < 0:
            raise ConfigError(f"need a positive learning rate and weights >= 0 (lr {self.lr}, "
                              f"kl {self.kl_weight}, ntp {self.ntp_weight})")

    def draw(self, step: int, windows: int) -> tuple[int, int, float, float | None]:
        """(window index, suffix length, keep, recall) of ``step``: a function of the seed and the step.

        recall: None for a continuation step, else where the repeated span starts, as a fraction of the
        prefix room before it (the draws of a run without recall probes are those of earlier versions).
        """
        rng = random.Random(f"cat:{self.seed}:{step}")
        lo, hi = self.keep_range
        keep = log_uniform(rng.random(), lo, hi)
        index, n = rng.randrange(windows), rng.randint(self.suffix[0], min(self.suffix[1], self.context // 2))
        probe = rng.random() < self.recall if self.recall > 0 else False
        return index, n, keep, rng.random() if probe else None

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.lr, self.warmup, self.steps)

    def resumable(self) -> dict:
        d = asdict(self)
        d.pop("steps")
        d["keep_range"], d["suffix"] = list(self.keep_range), list(self.suffix)
        for key, before in (("teacher", "base"), ("scope", "head"), ("select_temp", 0.0), ("select_grad", 1.0)):
            if d[key] == before:  # the only value before it was a setting: those checkpoints still resume
                d.pop(key)
        return d


class CatStudent:
    """A private copy of the base model with peft LoRA on q/k/v/o of every layer, and the router."""

    def __init__(self, lm, cfg: CatConfig):
        from peft import LoraConfig, get_peft_model

        attn = lm.model.model.layers[0].self_attn
        missing = [t for t in TARGETS if not isinstance(getattr(attn, t, None), torch.nn.Linear)]
        if missing:
            raise UnsupportedModelError(f"{lm.info.name}: kvforge train cat adapts {list(TARGETS)}, but this "
                                        f"model's attention has no {missing} (a fused projection such as qkv_proj)")
        self.lm, self.cfg = lm, cfg
        base = copy.deepcopy(lm.model)
        for p in base.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.peft = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=True, lora_dropout=0.0,
                                                    bias="none", target_modules=list(TARGETS)))
        self.model = self.peft.base_model.model
        self.peft.train(False)
        install(self.model)
        i = lm.info
        self.router = Router(i.num_layers, i.num_kv_heads, i.head_dim, seed=cfg.seed).to(lm.device)
        for p in self.parameters():
            p.requires_grad_(True)

    @property
    def scale(self) -> float:
        return self.cfg.alpha / math.sqrt(self.cfg.rank)  # rank-stabilized LoRA

    def parameters(self) -> list[torch.nn.Parameter]:
        lora = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        return lora + (list(self.router.parameters()) if self.cfg.policy == "router" else [])

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {**{f"lora.{k}": v.detach().cpu() for k, v in get_peft_model_state_dict(self.peft).items()},
                **{f"router.{k}": v.detach().cpu() for k, v in self.router.state_dict().items()}}

    def load_state(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.router.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("router.")})

    def _lora(self):
        """(NAME, A, B) per adapted linear: NAME relative to the CausalLM, A (r, in) and B (out, r) its LoRA weights."""
        for name, module in self.model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
                yield name, lora_a["default"].weight, module.lora_B["default"].weight

    def delta(self) -> dict[str, torch.Tensor]:
        """``NAME.A`` (r, in) and ``NAME.B`` (out, r) per adapted linear, NAME relative to the CausalLM."""
        out = {}
        for name, a, b in self._lora():
            out[f"{name}.A"] = a.detach().float().cpu().contiguous()
            out[f"{name}.B"] = b.detach().float().cpu().contiguous()
        return out

    def start_from(self, directory: Path) -> str:
        """Set the LoRA to the CAT model in ``directory``'s delta; returns that delta's sha256.

        The CAT model must be trained on this base model (weights and tokenizer), with this rank, scale and
        targets: the student then equals that CAT model, and training continues it with a fresh optimizer.
        """
        meta, i = read_cat_meta(directory), self.lm.info
        base, d = meta["base"], meta["delta"]
        if (base.get("weights_sha256"), base.get("tokenizer_sha256")) != (i.weights_sha256, i.tokenizer_sha256):
            raise IncompatibleModelError(
                f"--init {directory}: that CAT model was trained on {base.get('name')!r} ({base.get('spec')}), not on "
                f"{i.name} ({i.source}); pass --model {base.get('spec')}, or start from a CAT model of this base")
        if d.get("rank") != self.cfg.rank or list(d.get("targets", ())) != list(TARGETS) \
                or not math.isclose(float(d.get("scale", 0)), self.scale, rel_tol=1e-6):
            raise ConfigError(f"--init {directory}: its LoRA (rank {d.get('rank')}, scale {d.get('scale')}, targets "
                              f"{d.get('targets')}) is not this run's (rank {self.cfg.rank}, scale {self.scale:g}, "
                              f"targets {list(TARGETS)}); train with its rank and alpha")
        delta, digest = read_delta(directory, meta)
        with torch.no_grad():
            for name, a, b in self._lora():
                got_a, got_b = delta.get(f"{name}.A"), delta.get(f"{name}.B")
                if got_a is None or got_b is None or got_a.shape != a.shape or got_b.shape != b.shape:
                    raise FormatError(f"--init {directory}: its delta for {name!r} is missing or has the wrong shape")
                a.copy_(got_a)
                b.copy_(got_b)
        return digest


def step_loss(st: CatStudent, ids: list[int], n: int, keep: float, step: int,
              recall: float | None = None) -> tuple[torch.Tensor, dict]:
    """One window's loss: (loss with its graph, its parts as floats).

    recall: None for a continuation (the suffix is the window's last ``n`` tokens), else a recall probe:
    the suffix becomes the prefix's ``n`` tokens starting at that fraction of the room after the sink
    (ids: T tokens either way).
    """
    cfg, model = st.cfg, st.model
    T, s = len(ids), len(ids) - n
    if recall is not None:
        a = cfg.sink + int(recall * max(0, s - n - cfg.sink))
        ids = ids[:s] + ids[a:a + n]
    k = max(cfg.sink, round(keep * s))
    device = next(model.parameters()).device
    window = torch.tensor([ids], device=device)
    record: list = []
    if cfg.teacher == "base" or cfg.policy == "attention":
        with torch.no_grad(), st.peft.disable_adapter():
            hidden = forward(model, Pass(T, s, k, cfg.policy, teacher=True, record=record), window)
            teacher = torch.log_softmax(model.lm_head(hidden[0, s:T - 1]).float(), dim=-1)  # (n - 1, V): x_{s+1..T-1}
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    sparse = Pass(T, s, k, cfg.policy, teacher=False, sink=cfg.sink, scope=cfg.scope, record=record,
                  router=st.router, generator=g, select_temp=cfg.select_temp, select_grad=cfg.select_grad)
    positions = torch.arange(T + n, device=device)
    positions[T:] = torch.arange(s, T, device=device)
    hidden = forward(model, sparse, torch.cat([window, window[:, s:]], dim=1), positions[None])[0]
    student = torch.log_softmax(model.lm_head(hidden[T:T + n - 1]).float(), dim=-1)  # the copy's predictions
    if cfg.teacher == "self":  # the same tokens' dense rows of this forward, a target without gradient
        teacher = torch.log_softmax(model.lm_head(hidden[s:T - 1].detach()).float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    dense_rows = T - 1 if recall is None else s - 1  # a repeated span is no text to learn from
    rows = torch.randperm(dense_rows, generator=g)[: cfg.ntp_tokens].sort().values.to(device)
    ntp = F.cross_entropy(model.lm_head(hidden[rows]).float(), window[0, rows + 1])
    loss = cfg.kl_weight * kl + cfg.ntp_weight * ntp
    kept = sum(int(m.sum()) for m in sparse.masks) / max(1, len(sparse.masks) * sparse.masks[0].shape[0] * s)
    return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "ntp": float(ntp.detach()),
                  "keep": round(keep, 4), "kept": round(kept, 4), "split": s, "recall": recall is not None}


def resolve_init(spec: str | Path) -> Path:
    """``embedded-cat`` (the shipped CAT model) or a CAT model directory to start from; a clear error otherwise."""
    path = shipped_cat_dir() if str(spec) == EMBEDDED_CAT else Path(spec).expanduser().resolve()
    if not is_cat_dir(path):
        raise ConfigError(f"--init {spec}: not a CAT model (no {CAT_FILE} there); pass a directory written by "
                          f"`kvforge train cat -o DIR`, or {EMBEDDED_CAT}")
    return path


def inherited_settings(init_dir: Path | None) -> dict:
    """The settings a run started from the CAT model in ``init_dir`` takes from it unless given: all it recorded
    (policy, context, keeps, scope, teacher, loss weights, learning rate, ...) but the steps and the seed."""
    if init_dir is None:
        return {}
    recorded = read_cat_meta(init_dir).get("training", {}).get("settings", {})
    fields = set(CatConfig.__dataclass_fields__) - {"steps", "seed"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in fields}


def train_cat(sources, out, *, model=None, init: str | Path | None = None, resume: bool = False,
              progress: bool = True, device: str | None = None, compute_dtype: str | None = None, **settings) -> dict:
    """Train a CAT model on ``sources`` into the directory ``out``; returns the run's record.

    ``settings`` are :class:`CatConfig` fields. ``init``: a CAT model of the same base model to start from
    (``embedded-cat`` or a directory: its LoRA continued, with a fresh optimizer and schedule, and the settings
    not given taken from its run, see :func:`inherited_settings`); a killed run resumes with the same
    arguments and ``resume=True``. Bad input raises KvforgeError before the first step; a loss that is not
    finite raises TrainingError at its step (the last good checkpoint is kept). ``device`` / ``compute_dtype``:
    as :func:`kvforge.train.runs.training_model` (an auto dtype is bfloat16 on a CPU with native bfloat16).
    """
    init_dir = resolve_init(init) if init is not None else None  # an unknown --init fails before the model loads
    cfg = CatConfig(**(inherited_settings(init_dir) | settings))
    out = Path(out)
    lm = training_model(model, device, compute_dtype)
    if lm.info.source == EMBEDDED_CAT or is_cat_dir(Path(lm.info.source)):
        raise ConfigError(f"--model {lm.info.source}: train cat continues a plain model; pass its base model instead")
    texts, corpus_sha = training_corpus(sources)
    windows, short = make_windows(lm, texts, cfg.context)
    checkpoint = check_run_dir(out, resume, CAT_FILE, "CAT model")
    prefix = lm.encode_document("")
    st = CatStudent(lm, cfg)
    init_sha = st.start_from(init_dir) if init_dir is not None else None
    params = st.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, history = 0, []
    if resume:
        state = load_checkpoint(checkpoint, cfg.resumable(), corpus_sha)
        st.load_state(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        if init_sha is not None and init_sha != state.get("init"):  # a killed run is resumed with its own command
            raise TrainingError(f"{checkpoint} is a run started from another model than --init {init}; resume it "
                                "with the --init it started from (or none, if it started from the base model)")
        start, history, init_sha = state["step"], state["history"], state.get("init")
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"cat ({cfg.policy})", unit="step", disable=not progress,
               dynamic_ncols=True)
    saved_step = start if resume else None
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        index, n, keep, recall = cfg.draw(step, len(windows))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = step_loss(st, prefix + windows[index].text_ids, n, keep, step, recall)
        if not torch.isfinite(loss):
            bar.close()
            _plot(out, history)
            raise nonfinite(loss, step, f"window {index}, keep {keep:.3f}", saved_step, checkpoint)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append({"step": step + 1, **{k: round(v, 6) if isinstance(v, float) else v for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix(kl=f"{parts['kl']:.3f}", ntp=f"{parts['ntp']:.2f}", keep=f"{keep:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out, {"step": step + 1, "history": history, "weights": st.state(),
                                  "optimizer": optimizer.state_dict(), "settings": cfg.resumable(),
                                  "corpus_sha256": corpus_sha, "init": init_sha})
            saved_step = step + 1
    bar.close()
    record = {"settings": cfg.resumable() | {"steps": cfg.steps}, "corpus_sha256": corpus_sha, "documents": len(texts),
              "windows": len(windows), "too_short": short, "init": init_sha, "device": lm.device,
              "compute_dtype": lm.compute_dtype, "seconds": round(time.perf_counter() - t0, 1),
              "steps_run": cfg.steps - start, **{f"final_{k}": mean_last(history, k) for k in ("loss", "kl", "ntp")}}
    if cfg.steps > start:
        record["seconds_per_step"] = round(record["seconds"] / (cfg.steps - start), 3)
    digest = save_cat(out, st, lm, record)
    write_losses(out, history)
    _plot(out, history)
    return {"model": str(out), "delta_sha256": digest, **record}


def save_cat(out: Path, st: CatStudent, lm, record: dict) -> str:
    """Write ``delta.safetensors`` then ``kvforge-cat.json`` (the file a loader looks for), each atomically."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / DELTA_FILE) as fh:
        fh.write(save(st.delta()))
    i = lm.info
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": f"{i.name}-cat",
            "base": {"spec": i.source, "name": i.name, "weights_sha256": i.weights_sha256,
                     "tokenizer_sha256": i.tokenizer_sha256, "architecture": i.architecture},
            "delta": {"file": DELTA_FILE, "sha256": delta_sha256(out), "scale": st.scale, "rank": st.cfg.rank,
                      "targets": list(TARGETS)},
            "training": record}
    with atomic_file(out / CAT_FILE) as fh:
        fh.write((json.dumps(meta, indent=2) + "\n").encode())
    return meta["delta"]["sha256"]


def _plot(out: Path, history: list) -> None:
    plot_losses(out, history, ("loss", "kl", "ntp"), "kvforge train cat")


__all__ = ["TEACHERS", "CatConfig", "CatStudent", "inherited_settings", "resolve_init", "step_loss", "train_cat"]
