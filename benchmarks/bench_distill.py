"""What a distill build costs against a plain prefill, side by side on the same documents.

For each held-out passage (the eval's sources, cut to ``--lengths`` tokens), interleaved and repeated:

* **prefill**: ``kvforge.prefill.prefill`` of the document (what every other method starts from);
* **distill**: ``Distill.compress_ids`` at ``--keep``, what ``kvforge build --method distill`` runs for a
  plain keep (no dense prefill): the scorer's pass over the first layers, then the adapted prefill;
* **distill, refit=0**: the same without the default value refit (what the refit costs);
* **distill, match=0 / 1**: the same with the other setting of ``match`` (what the per-entry beta costs);
* **distill + dense**: the dense prefill and ``Distill.compress`` on it, the path of ``--keep auto``,
  ``--allocate pilot`` and ``kvforge eval``.

The ratio is per document (medians over ``--repeats``, the order of the five rotating from one repeat to the
next), so a noisy machine moves both sides together.

    .venv/bin/python benchmarks/bench_distill.py --out bench-out
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import environment, write_results
from kvforge.eval import sources as S
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.model import load_model
from kvforge.prefill import prefill
from kvforge.train.adapter import resolve_adapter
from kvforge.train.loop import adapter_record


def passages(lm, n: int, length: int) -> list[list[int]]:
    out = []
    for name in ("licenses", "changelogs", "manpages"):
        for key in S.SOURCES[name].keys():
            ids = lm.encode_document(S.SOURCES[name].read(key))
            if len(ids) >= length:
                out.append(ids[:length])
            if len(out) >= n * (1 + ("licenses", "changelogs", "manpages").index(name)) // 3 + 1:
                break
    return out[:n]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adapter", default="shipped")
    args = ap.parse_args()
    lm = load_model()
    method = get_method("distill", adapter=args.adapter)
    no_refit = get_method("distill", adapter=args.adapter, refit=0)
    other = f"match={1 - method.match}"
    other_match = get_method("distill", adapter=args.adapter, match=1 - method.match)
    ctx = CompressionContext(model=lm)
    budget = Budget(args.keep)
    rows = []
    method.compress_ids(lm, lm.encode_document("warm up " * 50), budget, ctx)
    for length in (int(x) for x in args.lengths.split(",")):
        for ids in passages(lm, args.docs, length):
            runs = {"prefill": lambda: prefill(lm.model, ids),
                    "distill": lambda: method.compress_ids(lm, ids, budget, ctx),
                    "distill refit=0": lambda: no_refit.compress_ids(lm, ids, budget, ctx),
                    "distill other": lambda: other_match.compress_ids(lm, ids, budget, ctx),
                    "distill + dense": lambda: method.compress(prefill(lm.model, ids), budget, ctx)}
            times = {k: [] for k in runs}
            order = list(runs)
            for r in range(args.repeats):  # the order rotates: the call right after the prefill measured slower
                for k in order[r % len(order):] + order[:r % len(order)]:
                    times[k].append(timed(runs[k]))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"tokens": length, **med, "ratio": med["distill"] / med["prefill"],
                         "ratio_no_refit": med["distill refit=0"] / med["prefill"],
                         "ratio_other": med["distill other"] / med["prefill"],
                         "ratio_dense": med["distill + dense"] / med["prefill"]})
    record = adapter_record(resolve_adapter(args.adapter))
    result = {"env": environment(lm), "keep": args.keep, "adapter": args.adapter, "rows": rows, "other": other,
              "training": {k: record.get(k) for k in ("seconds", "steps_run", "seconds_per_step", "settings")},
              "threads": torch.get_num_threads()}
    write_results(args.out, "distill-cost", result, render)


def render(r: dict) -> str:
    lines = [f"# distill build cost ({r['env']['date']}, {r['env']['machine']}, keep {r['keep']})", "",
             f"| tokens | docs | prefill s | distill s | ratio | refit=0 s | ratio | {r['other']} s | ratio | "
             "distill + dense s | ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({row["tokens"] for row in r["rows"]}):
        sub = [row for row in r["rows"] if row["tokens"] == n]
        med = lambda k: statistics.median(row[k] for row in sub)  # noqa: E731
        lines.append(f"| {n} | {len(sub)} | {med('prefill'):.3f} | {med('distill'):.3f} | {med('ratio'):.2f}x | "
                     f"{med('distill refit=0'):.3f} | {med('ratio_no_refit'):.2f}x | "
                     f"{med('distill other'):.3f} | {med('ratio_other'):.2f}x | "
                     f"{med('distill + dense'):.3f} | {med('ratio_dense'):.2f}x |")
    t = r["training"]
    lines += ["", f"training ({r['adapter']}): {t['steps_run']} steps in {t['seconds']} s, "
              f"{t['seconds_per_step']} s per step (context {t['settings'] and t['settings'].get('context')})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
