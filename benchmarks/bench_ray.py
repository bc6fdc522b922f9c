"""The Ray executor against the local one: the same corpus, side by side in one run.

    .venv/bin/python benchmarks/bench_ray.py --out bench-out

A corpus of 16 documents of 2048 tokens each (consecutive passages of Python's language
reference, ``pydoc_data.topics``, which ships with Python), built with the embedded model
(SmolLM2-135M-Instruct), compactor at keep 0.5, by each executor configuration in turn:

    local, 2 torch threads                  today's loop
    ray, 2 workers x 1 thread               two model copies, one core each
    ray, 1 worker x 2 threads               the local loop's shape, through Ray
    ray, 2 workers x 2 threads              oversubscribed: 4 threads on a 2-core machine

Each Ray build starts its own local runtime, as ``kvforge build --executor ray`` does; its
start-up (``ray.init``, then every worker loading the model) is reported apart from the build.
The artifacts of every configuration are compared with the local build's, byte for byte.
Also timed: rewriting ``library.json`` (the folder sink does it after every document) at
1k / 10k / 100k entries, the cost that grows with the library rather than with the document.

Writes ray.json (raw numbers) and ray.md (the tables for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kvforge
from common import environment, write_results
from kvforge.model import load_model

CONFIGS = [  # (label, executor, workers, threads per worker)
    ("local, 2 threads", "local", None, 2),
    ("ray, 2 workers x 1 thread", "ray", 2, 1),
    ("ray, 1 worker x 2 threads", "ray", 1, 2),
    ("ray, 2 workers x 2 threads (oversubscribed)", "ray", 2, 2),
]


def make_corpus(lm, folder: Path, docs: int, tokens: int) -> int:
    """``docs`` files of about ``tokens`` document tokens each, consecutive passages of real text; total tokens."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    body = tokens - len(lm.encode_document(""))
    if len(ids) < docs * body:
        raise SystemExit(f"the reference has {len(ids)} tokens, fewer than {docs} x {body}")
    folder.mkdir(parents=True)
    total = 0
    for i in range(docs):
        passage = lm.tokenizer.decode(ids[i * body:(i + 1) * body]).strip()
        (folder / f"ref-{i:02d}.txt").write_text(passage)
        total += len(lm.encode_document(passage))
    return total


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.kv"))}


def manifest_rewrite_seconds(entry: dict, sizes=(1_000, 10_000, 100_000)) -> dict[str, float]:
    """Seconds to rewrite library.json (atomic, fsynced) holding ``n`` entries like ``entry``."""
    from kvforge.builder import _write_library

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            entries = {f"doc-{i:06d}": dict(entry, id=f"doc-{i:06d}") for i in range(n)}
            t0 = time.perf_counter()
            _write_library(Path(tmp), entries)
            found[str(n)] = round(time.perf_counter() - t0, 3)
    return found


def summarize(config, samples: list[dict], total: int) -> dict:
    """One configuration over its rounds: the median round by wall time, and every round's raw numbers."""
    label, executor, workers, threads = config
    best = sorted(samples, key=lambda s: s["wall_s"])[len(samples) // 2]
    wall = best["wall_s"]
    start = best["start"]
    build_s = wall - sum(start.values())
    return {"label": label, "executor": executor, "workers": workers or 1, "threads": threads,
            "wall_s": round(wall, 2), "start": start, "build_s": round(build_s, 2),
            "tokens_per_s": round(total / wall, 1), "tokens_per_s_build": round(total / build_s, 1),
            "doc_s_mean": round(statistics.mean(best["doc_s"]), 3),
            "identical": all(s["identical"] for s in samples), "rounds": samples}


def render(r: dict) -> str:
    lines = [f"Ray executor against local: {r['docs']} documents x {r['tokens']} tokens "
             f"({r['total_tokens']} tokens), {r['method']} keep {r['keep']}, {r['env']['model']}, "
             f"median of {r['rounds']} round(s); "
             f"{r['env']['date']}, {r['env']['machine']}", "",
             "| executor | wall s | start-up s (runtime + workers) | build s | tokens/s (wall) | tokens/s (build) "
             "| s per document per worker | vs local | same bytes as local |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    base = r["runs"][0]["wall_s"]
    for run in r["runs"]:
        start = run["start"]
        start_txt = f"{start['runtime'] + start['workers']:.1f} ({start['runtime']:.1f} + {start['workers']:.1f})" \
            if start else "0"
        lines.append(f"| {run['label']} | {run['wall_s']:.1f} | {start_txt} | {run['build_s']:.1f} | "
                     f"{run['tokens_per_s']:.0f} | {run['tokens_per_s_build']:.0f} | {run['doc_s_mean']:.2f} | "
                     f"{base / run['wall_s']:.2f}x | {'yes' if run['identical'] else 'NO'} |")
    loads = [x for run in r["runs"] for s in run["rounds"] for x in s["load_1min"]]
    lines += ["", f"Machine load (1-minute average, before and after each build): {min(loads):.1f} to {max(loads):.1f} "
              "on 2 cores; the machine is shared."]
    lines += ["", "library.json rewrite (atomic, fsynced; the folder sink does it after every document):", "",
              "| entries | seconds |", "| ---: | ---: |"]
    lines += [f"| {n} | {s:.3f} |" for n, s in r["manifest_rewrite_s"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=1, help="builds per configuration (order reversed every other "
                    "round); the table shows the median round")
    ap.add_argument("--name", default="ray")
    args = ap.parse_args()
    lm = load_model()
    work = Path(tempfile.mkdtemp(prefix="kvforge-bench-ray-"))
    try:
        total = make_corpus(lm, work / "corpus", args.docs, args.tokens)
        # warm-up: one document, so that the first configuration does not pay first-call costs
        kvforge.build([sorted((work / "corpus").iterdir())[0]], work / "warm-up", method=args.method, keep=args.keep,
                      model=lm, progress=False)
        order = list(range(len(CONFIGS)))
        samples: dict[int, list[dict]] = {i: [] for i in order}
        reference = None
        for r in range(args.rounds):  # later rounds alternate the order: a drifting machine load evens out
            for i in (order if r % 2 == 0 else order[::-1]):
                label, executor, workers, threads = CONFIGS[i]
                out = work / f"out-{i}-{r}"
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                report = kvforge.build([work / "corpus"], out, method=args.method, keep=args.keep, model=lm,
                                       progress=False, executor=executor, workers=workers,
                                       threads_per_worker=threads)
                wall = time.perf_counter() - t0
                assert len(report.built) == args.docs and not report.errors, report.errors
                start = report.executor.get("start_seconds") or {}
                found = digests(out)
                shutil.rmtree(out)
                reference = reference or found
                samples[i].append({"wall_s": wall, "start": start, "identical": found == reference,
                                   "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                                   "doc_s": [e["build_seconds"] for e in report.entries],
                                   "workers_info": report.executor.get("workers_info")})
                sample_entry = report.entries[0]
                print(f"round {r}: {label}: {wall:.1f} s (start-up {sum(start.values()):.1f} s)", flush=True)
        runs = [summarize(CONFIGS[i], samples[i], total) for i in order]
        result = {"env": environment(lm) | {"machine": "x86_64, 2 CPU cores (AVX-512), torch "
                                            f"{torch.__version__}, ray {__import__('ray').__version__}"},
                  "docs": args.docs, "tokens": args.tokens, "total_tokens": total, "method": args.method,
                  "keep": args.keep, "rounds": args.rounds, "runs": runs, "manifest_rewrite_s": manifest_rewrite_seconds(sample_entry)}
        write_results(args.out, args.name, result, render)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
