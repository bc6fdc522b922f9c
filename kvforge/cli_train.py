"""``kvforge train``: the training commands (parse and print; the work is in kvforge.train)."""

from __future__ import annotations

import click

from .cli_options import MODEL_HELP, TRAINING_DTYPE_HELP, device_options, emit_json
from .errors import ConfigError


def _keep_range(ctx, param, value):
    if value is None:
        return None
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: write LO,HI, for instance 0.03,0.3") from None
    return lo, hi


@click.group()
def train():
    """Train learned compressors (and compressible models) offline, on the library they will compress.

    \b
      kvforge train distill docs/ -o my-adapter/                   # a KV-Distill adapter for docs/
      kvforge train distill docs/ --init shipped -o my-adapter/    # fine-tune the shipped one
      kvforge build docs/ -o lib/ --method distill:adapter=my-adapter --keep 0.1
      kvforge train cat docs/ -o my-cat/                           # a model whose cache compresses better
      kvforge build docs/ -o lib/ --model my-cat --keep 0.1        # (or --model embedded-cat, shipped)
    """


@train.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="the adapter directory to write (with checkpoint.pt, losses.jsonl and loss.png)")
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help=MODEL_HELP)
@click.option("--steps", default=None, type=int, help="LoRA optimizer steps, one example each  [default: 200]")
@click.option("--context", default=None, type=int, help="tokens per training window  [default: 1024]")
@click.option("--scorer", default=None, type=click.Choice(["entry", "token"]),
              help="entry: a score per layer, KV head and token, fitted to the replay's attribution, one top-k over "
                   "all entries; token: the paper's one token set for every layer (with --init: the adapter's)  "
                   "[default: entry]")
@click.option("--targets", default=None, type=int,
              help="windows whose replay attribution the entry scorer is fitted to; 0 with --init: keep the "
                   "adapter's scorer, train the LoRA only  [default: 64]")
@click.option("--fit", default=None, type=click.Choice(["build", "match", "head"]),
              help="what the kept entries get while training (entry scorer): build: each its matched beta and "
                   "refitted values, as a distill build writes them; match: the matched beta only; head: one mass "
                   "beta per head (the v2 adapter's training)  [default: build]")
@click.option("--keep-range", default=None, callback=_keep_range, metavar="LO,HI",
              help="every step's keep is drawn log-uniformly from LO..HI, in (0, 1]  [default: 0.03,0.3]")
@click.option("--init", default=None, metavar="shipped|DIR",
              help="start from this adapter (domain fine-tuning; the run keeps its rank and scorer)")
@click.option("--lr", default=None, type=float, help="peak learning rate  [default: 5e-4]")
@click.option("--mix", default=None, metavar="KIND=W,...",
              help="probe kinds and weights: recall, needle, fact  [default: recall=0.4,needle=0.4,fact=0.2]")
@click.option("--seed", default=0, show_default=True, type=int, help="examples, keeps and initial weights")
@click.option("--resume", is_flag=True, help="continue the run whose checkpoint is in OUT")
@click.option("--json", "as_json", is_flag=True, help="print the run's record as JSON")
@click.option("--no-progress", is_flag=True, help="hide the progress bar")
@device_options(dtype_help=TRAINING_DTYPE_HELP)
def distill(sources, out, model, steps, context, scorer, targets, fit, keep_range, init, lr, mix, seed, resume,
            as_json, no_progress, device, compute_dtype):
    """Train a KV-Distill adapter (a scorer + LoRA routed to the kept tokens) on SOURCES.

    First the scorer: the replay's input x gradient attribution of --targets windows (the model repeating
    the text; cached in OUT) is what it learns to predict from an early layer. Then the LoRA adapter, on
    examples generated from the documents alone (recall probes, facts the text states, planted facts),
    the dense cache's answers the teacher. A checkpoint is written every 25 steps: after a kill, rerun
    with --resume. On 2 CPU cores, with the model in bfloat16 (auto on a CPU with native bfloat16), the
    default run on examples/corpus took 25 minutes and a fine-tune from the shipped adapter 27 (33 in float32).
    """
    from .train import distill as run

    settings = {k: v for k, v in dict(steps=steps, context=context, keep_range=keep_range, lr=lr, mix=mix,
                                      scorer=scorer, targets=targets, fit=fit).items() if v is not None}
    if init is not None and resume:
        raise ConfigError("--init and --resume: a resumed run continues from its checkpoint; pass one of them")
    report = run(list(sources), out, model=model, init=init, resume=resume, seed=seed, device=device,
                 compute_dtype=compute_dtype, progress=not no_progress and not as_json, **settings)
    if as_json:
        emit_json(report)
        return
    click.echo(f"adapter {report['adapter']} (sha256 {report['adapter_sha256'][:12]}...): {report['steps_run']} steps "
               f"in {report['seconds']:.0f} s, final loss {report['final_loss']} (KL {report['final_kl']}) "
               f"over {report['windows']} windows of {report['documents']} documents")
    if report["too_short"]:
        click.echo(f"skipped {len(report['too_short'])} documents shorter than the context", err=True)
    click.echo(f"loss curve: {out}/loss.png; build with: kvforge build DOCS -o LIB --method distill:adapter={out}")


@train.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="the CAT model directory to write (with checkpoint.pt, losses.jsonl and loss.png)")
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help="the base model to continue: " + MODEL_HELP)
@click.option("--policy", default=None, type=click.Choice(["random", "attention", "router", "compactor"]),
              help="which prefix slots the tokens after the split may attend to while training  [default: router]")
@click.option("--keep-range", default=None, callback=_keep_range, metavar="LO,HI",
              help="every step's keep of the prefix is drawn log-uniformly from LO..HI, in (0, 1]  [default: 0.05,0.5]")
@click.option("--scope", default=None, type=click.Choice(["head", "layer"]),
              help="the keep per KV head, or per layer with the heads' counts left to the policy's scores, as "
                   "the compactor builds (ragged across heads; the shipped embedded-cat: layer)  [default: head]")
@click.option("--steps", default=None, type=int, help="optimizer steps, one window each  [default: 600]")
@click.option("--context", default=None, type=int,
              help="tokens per training window; documents shorter are skipped (the shipped embedded-cat: 1024, "
                   "the length of the eval's documents)  [default: 512]")
@click.option("--lr", default=None, type=float, help="peak learning rate  [default: 3e-4]")
@click.option("--recall", default=None, type=float,
              help="share of steps whose tokens after the split repeat a span of the text before it (a recall "
                   "probe: the compressed prefix must still hold what is quoted) instead of continuing it  "
                   "[default: 0.0]")
@click.option("--teacher", default=None, type=click.Choice(["base", "self"]),
              help="what the compressed tokens are distilled towards: the frozen base model's dense predictions, "
                   "or the model's own (what it is measured by: its compressed cache against its own full one; "
                   "it compressed no better and lost full-cache needles, BENCHMARKS.md section 10)  [default: base]")
@click.option("--init", default=None, metavar="embedded-cat|DIR",
              help="start from this CAT model of the same base model (its LoRA continued with a fresh optimizer "
                   "and schedule; the options not given here are the ones it was trained with, --steps and --seed "
                   "excepted), e.g. the shipped embedded-cat trained further on your own library")
@click.option("--seed", default=0, show_default=True, type=int, help="windows, splits, keeps and initial weights")
@click.option("--resume", is_flag=True, help="continue the run whose checkpoint is in OUT")
@click.option("--json", "as_json", is_flag=True, help="print the run's record as JSON")
@click.option("--no-progress", is_flag=True, help="hide the progress bar")
@device_options(dtype_help=TRAINING_DTYPE_HELP)
def cat(sources, out, model, policy, keep_range, scope, steps, context, lr, recall, teacher, init, seed, resume,
        as_json, no_progress, device, compute_dtype):
    """Continue training a model on SOURCES so that its KV cache compresses better (KV-CAT).

    Each step masks most of a window's prefix for the tokens after a split (per layer and KV head, as
    compression would) and distills those tokens towards the dense model, with a next-token loss that
    keeps the uncompressed model as it was. The result (a weight delta of a few MB and the base model's
    identity) loads with --model OUT; its artifacts are refused by the base model. A checkpoint is
    written every 25 steps: after a kill, rerun with --resume. The default run takes about 30 minutes
    on 2 idle CPU cores (3.0-3.4 s a step); 900 steps compressed better than 300, 1,800 no better
    than 900, and 600 steps on 1,024-token windows as well as 900 on 512 (BENCHMARKS.md, section 10).
    """
    from .train import cat as run

    settings = {k: v for k, v in dict(steps=steps, context=context, keep_range=keep_range, lr=lr,
                                      policy=policy, recall=recall, teacher=teacher, scope=scope).items()
                if v is not None}
    report = run(list(sources), out, model=model, init=init, resume=resume, seed=seed, device=device,
                 compute_dtype=compute_dtype, progress=not no_progress and not as_json, **settings)
    if as_json:
        emit_json(report)
        return
    click.echo(f"CAT model {report['model']} (delta sha256 {report['delta_sha256'][:12]}...): {report['steps_run']} "
               f"steps in {report['seconds']:.0f} s, final KL {report['final_kl']}, next-token loss "
               f"{report['final_ntp']} over {report['windows']} windows of {report['documents']} documents")
    if report["too_short"]:
        click.echo(f"skipped {len(report['too_short'])} documents shorter than the context", err=True)
    click.echo(f"loss curve: {out}/loss.png; build with: kvforge build DOCS -o LIB --model {out}")
