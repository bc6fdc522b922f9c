"""What compactor adds to a build: capture during prefill, scoring, selection; and calibration's cost.

Side by side in one run, interleaved, on real text (Python's language reference):
plain prefill, prefill capturing queries and pre-RoPE keys, compactor scoring +
selection at keep 0.5, and ``--keep auto`` calibration (tolerance 0.1).

    .venv/bin/python benchmarks/bench_compactor.py --out bench-out

Writes compactor_cost.json and compactor_cost.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import environment, write_results
from kvforge.calibrate import CalibrationConfig, calibrate
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.model import load_model
from kvforge.prefill import prefill


def make_ids(lm, n_tokens: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    prefix = lm.encode_document("")
    return prefix + lm.tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - len(prefix)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model()
    method = get_method("compactor")
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = make_ids(lm, n)
        prefill(lm.model, ids)  # warm-up
        plain, capture, score, calib = [], [], [], []
        for _ in range(args.repeats):
            _, t = timed(lambda: prefill(lm.model, ids))
            plain.append(t)
            kv, t = timed(lambda: prefill(lm.model, ids, queries=True, pre_rope_keys=True))
            capture.append(t)
            _, t = timed(lambda: method.compress(kv, Budget(0.5), CompressionContext(seed=0)))
            score.append(t)
        _, t = timed(lambda: calibrate(lm, ids, kv, method, CompressionContext(seed=0), CalibrationConfig()))
        calib.append(t)
        m = statistics.median
        row = {"tokens": len(ids), "prefill_s": m(plain), "prefill_capture_s": m(capture),
               "compactor_s": m(score), "calibration_s": m(calib),
               "overhead": (m(capture) + m(score)) / m(plain) - 1.0,
               "calibration_overhead": m(calib) / m(plain)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, "compactor_cost", environment(lm) | {"method": method.to_dict(), "rows": rows}, render)


def render(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}.", "",
             "| doc tokens | plain prefill | prefill + capture | compactor score + select | overhead vs plain |"
             " --keep auto calibration | calibration / plain prefill |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        lines.append(f"| {x['tokens']} | {x['prefill_s']:.2f} s | {x['prefill_capture_s']:.2f} s | "
                     f"{x['compactor_s']:.2f} s | {100 * x['overhead']:+.0f}% | {x['calibration_s']:.2f} s | "
                     f"{x['calibration_overhead']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
