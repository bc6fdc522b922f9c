"""The ``kvforge`` command line: parses and prints, holds no logic."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import KvforgeError
from .eval.phrasings import SETS as PHRASING_SETS
from .eval.sources import SPLITS
from .cli_options import MODEL_HELP, device_options as _device_options, emit_json as _emit_json
from .cli_train import train
from .options import ALLOCATIONS, AUTO, EXECUTORS, FORMATS, QUANTIZATIONS, STORAGE_DTYPES


class _Group(click.Group):
    """Turns every KvforgeError into one clear line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KvforgeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvforge")
def cli():
    """kvforge compiles documents into compressed KV-cache artifacts, once, offline,
    and answers questions from them without re-reading the text.

    \b
    Typical use:
      kvforge build docs/ -o lib/ --method compactor --keep 0.5
      kvforge query lib/notes.kv "What is the deadline?"
      kvforge inspect lib/notes.kv
      kvforge build docs/ -o lib.zarr --keep 0.25 --quant int8     # one zarr library
      kvforge query lib.zarr --doc notes "What is the deadline?"
      kvforge convert lib.zarr lib.zarr.zip && kvforge verify lib.zarr.zip
      kvforge serve lib.zarr                                        # OpenAI-compatible HTTP on 127.0.0.1:8000

    Environment: KVFORGE_HOME (model cache, default ~/.cache/kvforge),
    KVFORGE_MODEL (default model), KVFORGE_DEVICE, KVFORGE_COMPUTE_DTYPE.
    """


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="output: a folder for .kv files and library.json, or a zarr library (a path ending in .zarr)")
@click.option("--format", "fmt", default=None, type=click.Choice(FORMATS),
              help="kv: one .kv file per document; zarr: one zarr v3 library [default: zarr when OUT ends in .zarr]")
@click.option("--quant", default="none", show_default=True, type=click.Choice(QUANTIZATIONS),
              help="store keys and values as int8 / int4 codes (per-channel keys, per-token values), "
                   "applied after compression")
@click.option("--method", default="compactor", show_default=True,
              help="compression method (see `kvforge methods`), optionally with options: select_fit:blend=1")
@click.option("--keep", default="0.5", show_default=True,
              help="fraction of (layer, head, token) entries to keep, in (0, 1]; or 'auto': per document, the "
                   "smallest keep (0.1 to 1) whose recall of the document stays within --tolerance of the "
                   "full cache")
@click.option("--tolerance", default=None, type=float,
              help="with --keep auto: the largest mean KL (nats per token) on recall probes accepted "
                   "[default: 0.1]; smaller keeps more")
@click.option("--allocate", default="uniform", show_default=True, type=click.Choice(ALLOCATIONS),
              help="per-head budgets: the method's own split, or redistributed toward hard heads from a "
                   "cheap pilot run (same total; not for distill, whose scorer's own split measured far better)")
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help=MODEL_HELP)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(STORAGE_DTYPES),
              help="storage dtype of keys and values")
@click.option("--seed", default=0, show_default=True, type=int, help="seed for methods with randomness")
@click.option("--skip-bad", is_flag=True,
              help="skip unusable documents (empty, binary, too long, refused while building) instead of stopping")
@click.option("--force", is_flag=True, help="rebuild documents even when their artifact is current")
@click.option("--executor", default="local", show_default=True, type=click.Choice(EXECUTORS),
              help="local: one document after the other in this process; ray: a pool of Ray workers, each "
                   "loading the model once (needs `pip install 'kvforge[ray]'`); this process writes the library "
                   "either way")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="with --executor ray: the cluster to join ('auto': the one `ray start` runs on this machine); "
                   "default: start a local Ray runtime of --workers x --threads-per-worker CPUs for this build")
@click.option("--workers", default=None, type=int,
              help="with --executor ray: how many workers (Ray actors), each with its own copy of the model "
                   "[default: as many as the runtime's CPUs allow]")
@click.option("--threads-per-worker", default=None, type=int,
              help="torch threads (and Ray CPUs) of each worker [default: 1 with ray; torch's own with local]; "
                   "workers x threads above the cores slows every worker down (see BENCHMARKS.md)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report instead of a summary")
@click.option("--no-progress", is_flag=True, help="hide progress bars")
@_device_options
def build(sources, out, fmt, quant, method, keep, tolerance, allocate, model, dtype, seed, skip_bad, force,
          executor, ray_address, workers, threads_per_worker, as_json, no_progress, device, compute_dtype):
    """Compile .txt / .md files and folders into OUT/<doc-id>.kv and OUT/library.json,
    or into one zarr library (-o lib.zarr; ship it zipped with `kvforge convert`).

    Every document is read and checked first: an empty, binary, non-UTF-8 or
    too long document stops the build before anything is written (or is
    skipped with --skip-bad). A rerun skips documents whose text, method,
    keep and model are unchanged; an interrupted build resumes.

    \b
    On a Ray cluster (same artifacts, byte for byte):
      kvforge build docs/ -o lib/ --executor ray --workers 2 --threads-per-worker 1
      kvforge build docs/ -o lib/ --executor ray --ray-address auto
    """
    from .builder import build as run_build

    report = run_build(list(sources), out, method=method, keep=keep, model=model, dtype=dtype, seed=seed,
                       tolerance=tolerance, quant=quant, allocate=allocate, format=fmt, skip_bad=skip_bad,
                       force=force, executor=executor, workers=workers, threads_per_worker=threads_per_worker,
                       ray_address=ray_address, device=device, compute_dtype=compute_dtype,
                       progress=not no_progress and not as_json)
    if as_json:
        _emit_json(report.to_dict())
        return
    for err in report.errors:
        click.echo(f"skipped: {err}", err=True)
    for e in report.entries:
        click.echo(f"{e['id']}: {e['logical_tokens']} tokens, keep {e['keep_achieved']:.3f}, "
                   f"{e['bytes'] / 1024:.0f} KiB -> {report.out}/{e['file']}")
    ex = report.executor
    how = ""
    if ex.get("name") == "ray" and ex.get("start_seconds"):
        start = sum(ex["start_seconds"].values())
        how = (f" (ray: {ex['workers']} worker(s) x {ex['threads_per_worker']} thread(s), "
               f"{start:.1f} s of it starting them)")
    click.echo(f"built {len(report.built)}, up to date {len(report.skipped)}, "
               f"refused {len(report.errors)} in {report.seconds:.1f} s{how}")
    summary = report.keep_summary()
    if summary:
        click.echo(summary)


DOC_HELP = "with a zarr library: the document to use (optional when the library holds one)"


@cli.command()
@click.argument("artifact", type=click.Path())
@click.argument("question")
@click.option("--doc", "doc_id", default=None, help=DOC_HELP)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help=MODEL_HELP + " (default: the artifact's own)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with the answer, timings and sizes")
@click.option("--no-verify", is_flag=True, help="skip the tensor checksum (faster load of trusted files)")
@_device_options
def query(artifact, question, doc_id, max_new_tokens, model, as_json, no_verify, device, compute_dtype):
    """Answer QUESTION from ARTIFACT (a .kv file, or a lib.zarr / lib.zarr.zip library with --doc), streaming.

    The question continues at the document's logical position; the source
    text is not read or re-encoded.
    """
    from .runtime import load

    t0 = time.perf_counter()
    doc = load(artifact, model=model, verify=not no_verify, doc=doc_id, device=device, compute_dtype=compute_dtype)
    if as_json:
        result = doc.run(question, max_new_tokens=max_new_tokens)
        _emit_json(doc.answer_report(result, source=str(artifact), started=t0, question=question))
    else:
        doc.answer(question, max_new_tokens=max_new_tokens,
                   on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        click.echo()


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--doc", "doc_id", default=None, help=DOC_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the full summary as JSON")
@click.option("--no-verify", is_flag=True, help="skip the tensor checksum")
def inspect(artifact, doc_id, as_json, no_verify):
    """Show an artifact's header, kept counts per layer and head, bytes and achieved keep.

    Reads and verifies the file only; no model is loaded. For a zarr library
    without --doc, lists its documents.
    """
    from .verify import describe

    info = describe(artifact, doc_id, verify=not no_verify)
    if as_json:
        _emit_json(info)
        return
    if "library" in info:
        click.echo(f"{artifact}: kvforge library, {len(info['documents'])} document(s); inspect one with --doc ID")
        for i in info["documents"]:
            click.echo(f"  {i}")
        return
    d, m = info["document"], info["model"]
    click.echo(f"{info['path']}: {info['format']}")
    click.echo(f"  model     {m['name']} ({m['architecture']}, {m['num_layers']} layers x {m['num_kv_heads']} KV heads"
               f" x {m['head_dim']}), weights {m['weights_sha256']}..., tokenizer {m['tokenizer_sha256']}...")
    click.echo(f"  document  {d['id']}: {d['logical_length']} tokens, sha256 {d['sha256'][:16]}...")
    click.echo(f"  method    {info['method']['name']} {json.dumps(info['method']['config'])}")
    click.echo(f"  keep      requested {info['keep_requested']:.3f}, achieved {info['keep_achieved']:.4f} "
               f"({info['kept_entries']} of {info['total_entries']} entries)")
    cal = info["extra"].get("calibration")
    if cal:
        steps = ", ".join(f"{t['keep']:g}: {t['kl']:.3g}" for t in cal["trace"])
        click.echo(f"  calibrated keep auto, tolerance {cal['tolerance']:g} ({cal['proxy']}, {cal['probes']} probes): "
                   f"chose {cal['keep']:g}; trace keep: KL {steps or '(too short to probe)'}")
    alloc = info["extra"].get("allocation")
    if alloc:
        flat = [c for row in alloc["head_totals"] for c in row]
        click.echo(f"  allocate  pilot ({alloc['pilot']} at {alloc['uniform_per_head']} per head, rule "
                   f"{alloc['rule']}): per-head counts {min(flat)}..{max(flat)}")
    click.echo(f"  storage   {info['storage']['dtype']}, quantization {info['storage']['quantization']}, "
               f"beta {'yes' if info['storage']['has_beta'] else 'no'}")
    click.echo(f"  bytes     {info['artifact_bytes']} ({info['bytes_per_token']:.0f} per token; "
               f"{info['ratio_to_fp16_full']:.3f} x an fp16 full cache)")
    click.echo("  kept per layer (one column per KV head):")
    for layer, row in enumerate(info["kept_per_layer_head"]):
        click.echo(f"    {layer:3d}  " + " ".join(f"{c:6d}" for c in row))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per checked document")
def verify(paths, as_json):
    """Check artifacts and libraries end to end: structure, schema, chunk checksums, tensor digests.

    PATHS are .kv files, folders of them, lib.zarr folders or lib.zarr.zip files.
    Exit status 0 when everything holds, 1 when any document fails.
    """
    from .verify import verify_paths

    results = verify_paths(paths)
    if as_json:
        _emit_json({"ok": all(r["ok"] for r in results), "documents": results})
    else:
        for r in results:
            click.echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['path']}" + ("" if r["ok"] else f": {r['error']}"))
        bad = sum(not r["ok"] for r in results)
        click.echo(f"{len(results) - bad} ok, {bad} failed")
    if not all(r["ok"] for r in results):
        sys.exit(1)


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--doc", "doc_id", default=None, help="with a library SOURCE: convert only this document")
@click.option("--overwrite", is_flag=True, help="replace DEST if it exists")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report")
def convert(source, dest, doc_id, overwrite, as_json):
    """Convert losslessly between .kv files and zarr libraries.

    \b
      kvforge convert out/ lib.zarr            .kv folder -> zarr library folder
      kvforge convert lib.zarr lib.zarr.zip    zip a library for shipping
      kvforge convert lib.zarr.zip out/        library -> .kv files (byte-identical to the originals)
    """
    from .convert import convert as run_convert

    report = run_convert(source, dest, doc_id=doc_id, overwrite=overwrite)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(f"{len(report.documents)} document(s): {report.source} ({report.bytes_in} bytes) -> "
                   f"{report.dest} ({report.bytes_out} bytes)")


@cli.command()
@click.argument("libraries", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything beyond loopback needs --api-key")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="KVFORGE_API_KEY", default=None, show_envvar=True,
              help="clients send Authorization: Bearer KEY on every route but /healthz (prefer the environment "
                   "variable: a command line is visible to other users)")
@click.option("--max-resident-mb", default=1024.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="bound on the loaded documents' KV bytes; the least recently used are dropped past it")
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help=MODEL_HELP + " (default: the documents' own)")
@click.option("--max-concurrent", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="requests generating at once (decoded together, one batch per step); more get 429")
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="the largest max_tokens a request may ask for")
@click.option("--max-question-tokens", default=2048, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--max-body-kb", default=256, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--no-batch", is_flag=True, help="feed concurrent requests one at a time per step instead of batched")
@click.option("--no-verify", is_flag=True, help="skip the tensor checksum when a document loads")
def serve(libraries, host, port, api_key, max_resident_mb, model, max_concurrent, max_tokens, max_question_tokens,
          max_body_kb, no_batch, no_verify):
    """Answer from LIBRARIES (.kv files or folders, lib.zarr, lib.zarr.zip) over HTTP, OpenAI-compatible.

    \b
      kvforge serve examples/out
      curl localhost:8000/v1/models
      curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "for-statement", "messages": [{"role": "user", "content": "What starts a loop?"}]}'

    Each document is a "model" (its id); documents load on first use into an LRU bounded by
    --max-resident-mb. Routes: /v1/models, /v1/chat/completions (stream or not),
    /v1/documents/ID/answer (kvforge query --json's fields), /healthz, /metrics.
    """
    from .serve.schema import Limits
    from .serve.server import serve as run_serve

    limits = Limits(max_body_bytes=max_body_kb * 1024, max_question_tokens=max_question_tokens,
                    max_tokens=max_tokens, default_max_tokens=min(256, max_tokens), max_concurrent=max_concurrent)
    run_serve(list(libraries), host=host, port=port, api_key=api_key, model=model,
              max_resident_bytes=int(max_resident_mb * 1024 * 1024), limits=limits, batch=not no_batch,
              verify=not no_verify,
              on_ready=lambda p: click.echo(f"serving {len(p.registry.entries)} document(s) on http://{host}:{port}"
                                            + (" (API key required)" if api_key else ""), err=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json):
    """List the registered compression methods."""
    from .methods import available_methods

    found = available_methods()
    if as_json:
        _emit_json(found)
        return
    for name, description in found.items():
        click.echo(f"{name:12s} {description}")


@cli.command(name="eval")
@click.option("--methods", default="compactor,knorm", show_default=True,
              help="kvforge methods, comma-separated; a method may carry options: sculpt:steps=20:blend=0.5")
@click.option("--keep", "keeps", default="0.5,0.25,0.1", show_default=True,
              help="keep ratios, comma-separated; 'auto' for the per-document calibrated keep")
@click.option("--tolerance", default=0.1, show_default=True, type=float, help="the tolerance of --keep auto")
@click.option("--allocate", "allocations", default="uniform", show_default=True,
              help=f"per-head budget allocations to compare, comma-separated: {', '.join(ALLOCATIONS)}")
@click.option("--tasks", default=None, help="task kinds, comma-separated (default: all)")
@click.option("--lengths", default="1024,2048", show_default=True, help="document lengths in tokens")
@click.option("--samples", default=2, show_default=True, type=click.IntRange(1, 1000), help="samples per task kind and length")
@click.option("--sources", default=None,
              help="haystack texts, comma-separated (default: python-reference); see kvforge/eval/sources.py")
@click.option("--split", type=click.Choice(SPLITS), default=None,
              help="every text source of a split, each with its split's needle wordings: choose defaults on "
                   "tuning, choose among trained models on validation (text no shipped model trained on), report "
                   "on heldout")
@click.option("--phrasings", type=click.Choice(list(PHRASING_SETS)), default=None,
              help="needle wording set (default: classic on python-reference alone, else each source's split)")
@click.option("--against", default="", help="'kvpress' for its five presses, or kvpress:Press1,Press2 (needs the bench extra)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1, 512))
@click.option("--model", envvar="KVFORGE_MODEL", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for rows.jsonl, report.md, summary.json, plots")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@_device_options
def eval_(methods, keeps, tolerance, allocations, tasks, lengths, samples, sources, split, phrasings, against, seed,
          max_new_tokens, model, out, no_progress, as_json, device, compute_dtype):
    """Evaluate methods side by side on generated long-context tasks.

    Every method (and the full cache, the ceiling) sees the same model, tasks
    and prefill; the question is appended after compression. Reports accuracy,
    KL to the full cache on question + answer tokens and on continuations,
    bytes per token, build time and time to first token. Rows go to
    OUT/rows.jsonl as they are made: rerun the same command to resume.
    """
    from .eval.session import eval_config, evaluate
    from .model import load_model

    cfg = eval_config(methods=methods, keeps=keeps, tolerance=tolerance, allocations=allocations, tasks=tasks,
                      lengths=lengths, samples=samples, against=against, seed=seed, max_new_tokens=max_new_tokens,
                      sources=sources, split=split, phrasings=phrasings)
    lm = load_model(model, device=device, compute_dtype=compute_dtype)
    summary = evaluate(cfg, out, model=lm, progress=not no_progress and not as_json)
    if as_json:
        _emit_json(summary)
    else:
        click.echo(Path(out, "report.md").read_text())
        click.echo(f"rows: {Path(out, 'rows.jsonl')}; plots: {', '.join(summary['plots']) or 'none (no matplotlib)'}")


cli.add_command(train)


def main() -> None:
    cli(prog_name="kvforge")
