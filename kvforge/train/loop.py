"""``kvforge train distill``: train a KV-Distill adapter on a corpus, with checkpoints, resume and a loss plot.

With an entry scorer (the default), the scorer is fitted first: the replay's attribution of ``targets``
training windows is computed (cached in the run directory until the run ends) and the scorer regressed on
it (:mod:`kvforge.train.targets`); it then stays fixed while the LoRA adapter learns. One step is one
example (a document window and a probe, :mod:`kvforge.train.data`) at one keep drawn log-uniformly from
the keep range; every example is trained at ``reuse`` keeps in consecutive steps, so that its teacher pass
(the dense cache's answer distribution) is computed once and reused. The adapter (LoRA, and a token
scorer) is the only thing that learns; AdamW, a short linear warm-up, then a cosine decay to a
tenth of the learning rate. Everything random is a function of the seed and the step, so a resumed
run continues the same run.

The run directory is the adapter: its files, ``checkpoint.pt`` (adapter, optimizer, step, history:
written atomically every ``checkpoint_every`` steps), ``losses.jsonl`` and ``loss.png``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .adapter import (CONFIG_FILE, SCORERS, DistillModel, default_config, load_adapter, read_config, read_meta,
                      resolve_adapter)
from .data import ExampleMaker, make_windows, parse_mix
from .runs import (check_run_dir, load_checkpoint, log_uniform, mean_last, nonfinite, plot_losses, save_checkpoint,
                   training_corpus, training_model, warmup_cosine, write_losses)
from .student import FITS, install, student_loss, teacher_pass
from .targets import TARGETS_FILE, compute_targets, fit_scorer


@dataclass
class TrainConfig:
    """One run's settings; all of them are recorded in the adapter and checked on resume.

    steps:        optimizer steps (one example at one keep each)
    context:      document-window tokens per example (template prefix included)
    keep_range:   (lo, hi): every step's keep is drawn log-uniformly from it; 0 < lo <= hi <= 1
    lr:           AdamW's peak learning rate
    rank_weight:  weight of the ranking term (the scorer towards the teacher's answer attention)
    reuse:        consecutive steps that train one example (at different keeps) on one teacher pass
    rank:         LoRA rank (rank-stabilized)
    mix:          probe kinds and weights (kvforge.train.data.MIX)
    seed:         examples, keeps and the initial weights
    scorer:       "entry" (one score per layer, head and token, fitted to the replay) or "token" (the paper's)
    targets:      windows whose replay attribution the entry scorer is fitted to; 0 with ``init``: the
                  initial adapter's scorer is kept as it is (only the LoRA trains)
    fit:          what the student's kept entries get (entry scorer; kvforge.train.student): "build" the
                  matched beta and the values refitted under it, the cache a default ``distill`` build writes;
                  "match" the matched beta only; "head" one mass beta per head (the v2 adapter's training)
    scorer_epochs, scorer_lr: the entry scorer's fit
    """

    steps: int = 200
    context: int = 1024
    keep_range: tuple[float, float] = (0.03, 0.3)
    lr: float = 5e-4
    rank_weight: float = 0.1
    reuse: int = 2
    rank: int = 8
    mix: dict = field(default_factory=lambda: parse_mix(None))
    seed: int = 0
    warmup: int = 10
    checkpoint_every: int = 25
    scorer: str = "entry"
    targets: int = 64
    scorer_epochs: int = 60
    scorer_lr: float = 2e-3
    fit: str = "build"

    def __post_init__(self) -> None:
        lo, hi = (float(x) for x in self.keep_range)
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"--keep-range {lo},{hi}: need 0 < LO <= HI <= 1 (fractions of the document kept)")
        self.keep_range = (lo, hi)
        if self.steps < 1 or self.reuse < 1 or self.checkpoint_every < 1:
            raise ConfigError("--steps, reuse and checkpoint_every must be >= 1")
        if self.context < 128:
            raise ConfigError(f"--context {self.context}: use at least 128 tokens")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"--scorer {self.scorer!r}: one of {', '.join(SCORERS)}")
        if self.scorer == "entry" and (self.targets < 2 and self.targets != 0):
            raise ConfigError(f"--targets {self.targets}: the entry scorer is fitted to at least 2 windows "
                              "(or 0 with --init: keep the initial adapter's scorer)")
        if self.fit not in FITS:
            raise ConfigError(f"--fit {self.fit!r}: one of {', '.join(FITS)}")
        self.mix = parse_mix(self.mix)

    def keep_at(self, step: int) -> float:
        lo, hi = self.keep_range
        return log_uniform(random.Random(f"keep:{self.seed}:{step}").random(), lo, hi)

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.lr, self.warmup, self.steps)

    def resumable(self) -> dict:
        """What a resumed run must share with the checkpoint (steps may grow)."""
        d = asdict(self)
        d.pop("steps")
        d["keep_range"] = list(self.keep_range)
        return d


def distill(sources, out, *, model=None, init: str | None = None, resume: bool = False, progress: bool = True,
            device: str | None = None, compute_dtype: str | None = None, **settings) -> dict:
    """Train a distill adapter on ``sources`` into the directory ``out``; returns the run's record.

    ``settings`` are :class:`TrainConfig` fields (steps, context, keep_range, lr, mix, seed, ...).
    ``init``: an adapter to start from ("shipped" or a directory: domain fine-tuning). ``resume``: continue
    the run whose checkpoint is in ``out`` (the same settings; ``steps`` may be raised).
    ``device`` / ``compute_dtype``: as :func:`kvforge.train.runs.training_model` (an auto dtype is bfloat16 on a
    CPU with native bfloat16).
    Raises KvforgeError on bad input before the first step, and TrainingError at a step whose loss is not
    finite (the last good checkpoint is kept).
    """
    if init is not None:  # an unknown --init fails before the model loads; its rank and scorer are the run's
        settings = {**_init_shape(init, settings), **settings}
    cfg = TrainConfig(**settings)
    if cfg.scorer == "entry" and cfg.targets == 0 and init is None:
        raise ConfigError("--targets 0 keeps the --init adapter's scorer: pass --init, or fit a scorer (--targets 64)")
    out = Path(out)
    lm = training_model(model, device, compute_dtype)
    texts, corpus_sha = training_corpus(sources)
    windows, short = make_windows(lm, texts, cfg.context)
    checkpoint = check_run_dir(out, resume, CONFIG_FILE, "adapter")

    torch.manual_seed(cfg.seed)
    if init is not None:
        dm, init_sha = load_adapter(init, lm, trainable=True)
    else:
        dm, init_sha = DistillModel(lm, default_config(lm, rank=cfg.rank, scorer=cfg.scorer), trainable=True), None
    install(dm.model)
    entry = dm.cfg.scorer == "entry"
    params = dm.lora_parameters() if entry else dm.parameters()  # an entry scorer is fitted first, then fixed
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, history, scorer_fit = 0, [], None
    if resume:
        state = load_checkpoint(checkpoint, cfg.resumable(), corpus_sha, added={"fit": "head"})
        dm.load_state(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, scorer_fit = state["step"], state["history"], state.get("scorer_fit")
    make = ExampleMaker(lm, windows, cfg.seed, cfg.mix)
    record = {"settings": cfg.resumable() | {"steps": cfg.steps}, "corpus_sha256": corpus_sha, "documents": len(texts),
              "windows": len(windows), "too_short": short, "init": init_sha, "device": lm.device,
              "compute_dtype": lm.compute_dtype, "base_model": lm.info.name}
    t_fit = time.perf_counter()
    if entry and scorer_fit is None:  # phase 1: the scorer, fitted to the replay's attribution (resumable targets)
        if cfg.targets == 0:  # a fine-tune that keeps its initial adapter's scorer, and the record of its fit
            scorer_fit = {"kept_from": init_sha, **adapter_record(resolve_adapter(init)).get("scorer_fit", {})}
        else:
            items = compute_targets(lm, make, cfg.targets, dm.cfg.first_layer, cfg.seed, out, progress)
            scorer_fit = fit_scorer(dm.scorer, items, epochs=cfg.scorer_epochs, lr=cfg.scorer_lr, seed=cfg.seed,
                                    sink=dm.cfg.sink, recent=dm.cfg.recent, progress=progress)
            scorer_fit["seconds"] = round(time.perf_counter() - t_fit, 1)
            del items
        _checkpoint(out, dm, optimizer, 0, history, cfg, corpus_sha, scorer_fit)
    if entry:
        for p in dm.scorer.parameters():
            p.requires_grad_(False)
        record["scorer_fit"] = scorer_fit

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not progress, dynamic_ncols=True)
    teacher_of: tuple[int, object] | None = None
    saved_step = start if resume or entry else None  # the step of the checkpoint on disk (None: none written yet)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        index = step // cfg.reuse
        ex = make(index)
        if teacher_of is None or teacher_of[0] != index:
            teacher_of = (index, teacher_pass(dm, ex))
        keep = cfg.keep_at(step)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = student_loss(dm, ex, teacher_of[1], keep, cfg.rank_weight, cfg.fit)
        if not torch.isfinite(loss):
            bar.close()
            _plot(out, history)
            raise nonfinite(loss, step, f"{ex.kind} example, keep {keep:.3f}", saved_step, checkpoint)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append({"step": step + 1, "kind": ex.kind, **{k: round(v, 6) for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", kl=f"{parts['kl']:.3f}", keep=f"{keep:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _checkpoint(out, dm, optimizer, step + 1, history, cfg, corpus_sha, scorer_fit)
            saved_step = step + 1
    bar.close()
    record.update(seconds=round(time.perf_counter() - t0, 1), steps_run=cfg.steps - start,
                  final_loss=mean_last(history, "loss"), final_kl=mean_last(history, "kl"))
    if cfg.steps > start:
        record["seconds_per_step"] = round(record["seconds"] / (cfg.steps - start), 3)
    digest = dm.save(out, record)
    write_losses(out, history)
    _plot(out, history)
    (out / TARGETS_FILE).unlink(missing_ok=True)  # the scorer's teacher, cached for a killed run only
    return {"adapter": str(out), "adapter_sha256": digest, **record}


def _init_shape(init: str, settings: dict) -> dict:
    """The ``--init`` adapter's rank and scorer, which a fine-tune keeps; a clear error if ``settings`` differ."""
    got = read_config(resolve_adapter(init))
    shape = {"rank": got.rank, "scorer": got.scorer}
    clash = [f"{k} {settings[k]!r} (it has {v!r})" for k, v in shape.items() if k in settings and settings[k] != v]
    if clash:
        raise ConfigError(f"--init {init}: a fine-tune keeps the adapter's shape, but asked for {', '.join(clash)}; "
                          "leave those out, or train a new adapter without --init")
    return shape


def _checkpoint(out: Path, dm, optimizer, step: int, history: list, cfg: TrainConfig, corpus_sha: str,
                scorer_fit: dict | None = None) -> None:
    save_checkpoint(out, {"step": step, "history": history, "adapter": {k: v.detach().cpu() for k, v in dm.state().items()},
                          "optimizer": optimizer.state_dict(), "settings": cfg.resumable(), "corpus_sha256": corpus_sha,
                          "scorer_fit": scorer_fit})


def _plot(out: Path, history: list) -> None:
    plot_losses(out, history, ("loss", "kl"), "kvforge train distill")


def adapter_record(path) -> dict:
    """The training record stored in an adapter (for reports)."""
    return read_meta(Path(path)).get("training", {})
