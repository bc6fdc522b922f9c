"""What the fitting methods cost against a prefill, and sculpt's cost curve over document length.

Side by side in one run, interleaved, on real text (Python's language reference):
plain prefill; prefill capturing queries (and pre-RoPE keys); ``select_fit``
(attention-mass scoring + least-squares value refit) and, if asked, other
method specs; each at the given keeps with uniform allocation, and with
``--pilot`` also with pilot allocation (and ``--unshared`` with the pilot scoring and sampling
on its own, to time what sharing them saves). Medians of ``--repeats``.

    .venv/bin/python benchmarks/bench_fit_cost.py --out bench-out

A method spec is a name or ``name:key=value:key=value`` (method options as in
the artifact's config; the specs of ``kvforge build --method``). Writes
fit_cost.json and fit_cost.md.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_compactor import make_ids, timed
from common import environment, write_results
from kvforge.budget import allocate
from kvforge.builder import compress_document
from kvforge.model import load_model
from kvforge.prefill import prefill
from kvforge.methods import CompressionContext, get_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--methods", default="select_fit;sculpt:init=select_fit", help="method specs separated by ';'")
    ap.add_argument("--keeps", default="0.5,0.1")
    ap.add_argument("--pilot", action="store_true", help="also time pilot allocation")
    ap.add_argument("--unshared", action="store_true",
                    help="with --pilot, also time the pilot without what the method's prepare shares with it "
                         "(its selection and reference queries): the cost that sharing saves")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="fit_cost")
    args = ap.parse_args()
    lm = load_model()
    methods = [(spec, get_method(spec)) for spec in args.methods.split(";")]
    keeps = [float(k) for k in args.keeps.split(",")]
    allocs = ["uniform", "pilot"] + (["pilot-unshared"] if args.unshared else []) if args.pilot else ["uniform"]
    surprisal = any(m.needs_surprisal for _, m in methods)  # then also timed: a capture with token surprisal
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = make_ids(lm, n)
        prefill(lm.model, ids)  # warm-up
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            _, t = timed(lambda: prefill(lm.model, ids))
            times.setdefault("prefill", []).append(t)
            kv, t = timed(lambda: prefill(lm.model, ids, queries=True, pre_rope_keys=True))
            times.setdefault("capture", []).append(t)
            if surprisal:  # the methods that use it are charged this capture; the same KV plus surprisal
                kv, t = timed(lambda: prefill(lm.model, ids, queries=True, pre_rope_keys=True, surprisal=True))
                times.setdefault("capture_surprisal", []).append(t)
            for label, method in methods:
                for keep in keeps:
                    for alloc in allocs:
                        if alloc == "pilot-unshared":
                            _, t = timed(lambda: unshared_pilot(lm, kv, method, keep))
                        else:
                            _, t = timed(lambda: compress_document(lm, ids, kv, method, keep, allocate=alloc,
                                                                   seed=0))
                        times.setdefault(f"{label}|{keep:g}|{alloc}", []).append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        capture = {label: med["capture_surprisal" if m.needs_surprisal else "capture"] for label, m in methods}
        row = {"tokens": len(ids), "seconds": med,
               "build_over_prefill": {k: (capture[k.split("|")[0]] + v) / med["prefill"] for k, v in med.items()
                                      if "|" in k}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, args.name, environment(lm) | {"methods": [m.to_dict() for _, m in methods],
                                                         "rows": rows}, render)


def unshared_pilot(lm, kv, method, keep: float):
    """compress_document's pilot path with a bare function for ``compress_at``: the pilot then scores
    its selection and samples its reference queries on its own, as before they were shared."""
    ctx = CompressionContext(model=lm, seed=0, keep=keep)
    prepared = method.prepare(kv, ctx)
    budget, _ = allocate(kv, method, keep, ctx, compress_at=lambda b: prepared(b))
    return prepared(budget)


def render(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}. "
             "Seconds (medians); build / prefill = (prefill with capture + compression) / plain prefill, "
             "where a method with the surprisal prior is charged the capture with surprisal.", "",
             "| doc tokens | plain prefill | prefill + capture | + surprisal | method | keep | allocation | "
             "compression | build / prefill |", "| ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    for x in r["rows"]:
        s = x["seconds"]
        with_s = f"{s['capture_surprisal']:.2f}" if "capture_surprisal" in s else "-"
        for key, ratio in x["build_over_prefill"].items():
            label, keep, alloc = key.split("|")
            lines.append(f"| {x['tokens']} | {s['prefill']:.2f} | {s['capture']:.2f} | {with_s} | {label} | {keep} | "
                         f"{alloc} | {s[key]:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
