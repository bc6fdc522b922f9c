"""Two configurations' needle answers, document by document, over saved ``kvforge eval`` runs.

Accuracy counts alone hide which documents each side answers; on a few dozen documents a gap of
a few answers can be noise. This pairs the rows of two configurations (``method@keep``; a method
matches exactly where a row names it so, else by prefix, so ``sculpt`` also finds
``sculpt:surprisal=1+pilot``) on the same tasks and reports the documents only one of them answers,
with an exact two-sided sign test on those; then the same pairing of their KL on question + answer
tokens (which side is lower, document by document, and the ratio of the means).

    .venv/bin/python benchmarks/paired_needles.py --a sculpt@0.1 --b kvpress:KVzipPress@0.25 \\
        benchmarks/results/eval-surprisal benchmarks/results/eval-surprisal-seed2 benchmarks/results/eval-surprisal-seed3

Two models (or two runs of one command) are paired the same way: ``--b-runs`` reads ``--b`` from other runs of
the same tasks, for instance a CAT model against its base, each measured against its own full cache:

    .venv/bin/python benchmarks/paired_needles.py --a compactor@0.1 --b compactor@0.1 \\
        benchmarks/results/eval-cat-model --b-runs benchmarks/results/eval-cat-base

Reads each run's rows.jsonl; needs no model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def scores(rows: list[dict], spec: str, field: str = "score") -> dict[str, float]:
    """task -> ``field`` of the rows matching ``method@keep`` (the method exactly where some row names it so,
    else by prefix); one match per task."""
    method, keep = spec.rsplit("@", 1)
    exact = any(r["method"] == method for r in rows)
    out: dict[str, float] = {}
    for r in rows:
        if (r["method"] == method if exact else r["method"].startswith(method)) and r["keep"] == float(keep):
            if r["task"] in out:
                raise SystemExit(f"{spec!r} matches two rows of task {r['task']}: name the method in full")
            out[r["task"]] = float(r[field])
    return out


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test of ``wins`` against ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="kvforge eval output directories")
    ap.add_argument("--a", required=True, help="method@keep")
    ap.add_argument("--b", required=True, help="method@keep")
    ap.add_argument("--b-runs", nargs="+", default=None,
                    help="read --b from these runs (the same tasks, another model) instead of RUNS, run for run")
    args = ap.parse_args()
    b_runs = args.b_runs or args.runs
    if len(b_runs) != len(args.runs):
        raise SystemExit(f"--b-runs: give one run per run of RUNS ({len(args.runs)}), got {len(b_runs)}")
    pairs, kls = [], []
    for run, b_run in zip(args.runs, b_runs):
        rows, b_rows = _rows(run), _rows(b_run)
        a, b = scores(rows, args.a), scores(b_rows, args.b)
        if not a or not b:
            raise SystemExit(f"{run if not a else b_run}: no rows for {args.a if not a else args.b}")
        pairs += [(a[t], b[t], t) for t in sorted(a.keys() & b.keys())]
        ka, kb = scores(rows, args.a, "kl_qa"), scores(b_rows, args.b, "kl_qa")
        kls += [(ka[t], kb[t]) for t in sorted(ka.keys() & kb.keys())]
    if not pairs:
        raise SystemExit("no task is in both: pair runs of the same eval command (split, tasks, lengths, samples, seed)")
    name_a = args.a if args.b_runs is None else f"{args.a} ({args.runs[0]})"
    name_b = args.b if args.b_runs is None else f"{args.b} ({b_runs[0]})"
    only_a = [t for x, y, t in pairs if x > y]
    only_b = [t for x, y, t in pairs if y > x]
    print(f"{len(pairs)} documents: {name_a} answers {sum(x for x, _, _ in pairs):.0f}, "
          f"{name_b} answers {sum(y for _, y, _ in pairs):.0f}")
    print(f"only {name_a}: {len(only_a)} {only_a}")
    print(f"only {name_b}: {len(only_b)} {only_b}")
    print(f"exact two-sided sign test on the {len(only_a) + len(only_b)} that differ: "
          f"p = {sign_test(len(only_a), len(only_b)):.2f}")
    lower_a = sum(x < y for x, y in kls)
    lower_b = sum(y < x for x, y in kls)
    mean_a, mean_b = sum(x for x, _ in kls) / len(kls), sum(y for _, y in kls) / len(kls)
    print(f"KL q+a, mean over the {len(kls)} documents: {name_a} {mean_a:.4f}, {name_b} {mean_b:.4f} "
          f"(b / a = {mean_b / mean_a if mean_a else float('inf'):.2f}x); lower on {lower_a} / {lower_b} documents, "
          f"sign test p = {sign_test(lower_a, lower_b):.3f}")


def _rows(run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "rows.jsonl").read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
