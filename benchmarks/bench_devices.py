"""Compute dtypes and threads on this CPU: prefill, time to first token (artifact against text prefill, in the
same dtype) and decoding for float32 and bfloat16, measured side by side in one run (interleaved repeats), and
what bfloat16 costs in KL against the float32 answers.

    .venv/bin/python benchmarks/bench_devices.py --out bench-out [--lengths 2048] [--threads 2] [--repeats 3]

Writes devices.json and devices.md. Each dtype answers from an artifact built in that dtype (keep 1.0), and
the bfloat16 model also answers from the float32-built artifact (the cross-dtype row).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kvforge
from bench_foundation import QUESTION, make_text, ttft_text
from common import environment, write_results
from kvforge.model import load_model

DTYPES = ("float32", "bfloat16")
QUESTIONS = [QUESTION, "Which statement raises an exception?", "What does the text say about the with statement?"]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) in nats per row."""
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    args = ap.parse_args()
    lms = {d: load_model(None, compute_dtype=d) for d in DTYPES}
    work = Path(tempfile.mkdtemp(prefix="kvforge-bench-devices-"))
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for n in [int(x) for x in args.lengths.split(",")]:
            text = make_text(lms["float32"], n)
            (work / f"doc{n}.txt").write_text(text)
            docs, build_s = {}, {}
            for d, lm in lms.items():
                t0 = time.perf_counter()
                kvforge.build([work / f"doc{n}.txt"], work / f"{d}-{n}", method="full", keep=1.0, model=lm,
                              progress=False, force=True)
                build_s[d] = time.perf_counter() - t0
                docs[d] = kvforge.load(work / f"{d}-{n}" / f"doc{n}.kv", model=lm)
            timing = {d: {"text": [], "artifact": [], "decode": []} for d in DTYPES}
            for d in DTYPES:  # warm-up
                ttft_text(lms[d], text, QUESTION)
                docs[d].answer_ids(QUESTION, max_new_tokens=2)
            for _ in range(args.repeats):  # interleaved: machine noise hits every cell alike
                for d in DTYPES:
                    timing[d]["text"].append(ttft_text(lms[d], text, QUESTION))
                    stats = docs[d].run(QUESTION, max_new_tokens=args.decode_tokens).stats
                    timing[d]["artifact"].append(stats.ttft_s)
                    if stats.new_tokens > 1:
                        timing[d]["decode"].append(stats.decode_s / stats.new_tokens)
            # quality: bfloat16 answers (its own artifact, and the float32-built one) against float32's
            cross = kvforge.load(work / f"float32-{n}" / f"doc{n}.kv", model=lms["bfloat16"])
            kls, kls_cross, same, diff = [], [], 0, []
            for q in QUESTIONS:
                ref = docs["float32"].answer_ids(q, max_new_tokens=12)
                probe = ref or [0]
                a = docs["float32"].logits(q, probe)
                kls.append(kl(a, docs["bfloat16"].logits(q, probe)))
                kls_cross.append(kl(a, cross.logits(q, probe)))
                diff.append(float((docs["float32"].logits(q, probe) - cross.logits(q, probe)).abs().max()))
                same += docs["bfloat16"].answer_ids(q, max_new_tokens=12) == ref
            med = {d: {k: statistics.median(v) if v else float("nan") for k, v in timing[d].items()} for d in DTYPES}
            row = {"threads": threads, "tokens": docs["float32"].logical_length,
                   "kl_bf16_vs_fp32": statistics.mean(kls), "kl_bf16_on_fp32_artifact": statistics.mean(kls_cross),
                   "max_logit_diff_cross": max(diff), "same_answers_bf16": f"{same}/{len(QUESTIONS)}"}
            for d in DTYPES:
                row[d] = {"build_s": build_s[d], "ttft_text_s": med[d]["text"], "ttft_artifact_s": med[d]["artifact"],
                          "speedup": med[d]["text"] / med[d]["artifact"],
                          "decode_tok_s": 1.0 / med[d]["decode"] if med[d]["decode"] == med[d]["decode"] else 0.0,
                          "runs": timing[d]}
            rows.append(row)
            print(row, flush=True)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    write_results(args.out, "devices", environment(lms["float32"]) | {"rows": rows, "loadavg": load}, render)


def render(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; load average during the run {', '.join(r['loadavg'])}; torch {r['torch']}; "
             f"model {r['model']}; date {r['date']}.", "",
             "| threads | doc tokens | dtype | build (prefill) | TTFT text | TTFT artifact | speed-up | decode |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        for d in DTYPES:
            c = x[d]
            lines.append(f"| {x['threads']} | {x['tokens']} | {d} | {c['build_s']:.2f} s | {c['ttft_text_s'] * 1000:.0f} ms"
                         f" | {c['ttft_artifact_s'] * 1000:.0f} ms | {c['speedup']:.1f}x | {c['decode_tok_s']:.1f} tok/s |")
    lines += ["", "| threads | doc tokens | KL bf16 vs fp32 (nats/token) | KL bf16 on the fp32-built artifact | "
              "max logit diff, bf16 on fp32 artifact | same greedy answers |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        lines.append(f"| {x['threads']} | {x['tokens']} | {x['kl_bf16_vs_fp32']:.4f} | {x['kl_bf16_on_fp32_artifact']:.4f} | "
                     f"{x['max_logit_diff_cross']:.3f} | {x['same_answers_bf16']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
