"""Foundation benchmarks: time to first token from an artifact vs. prefilling the text,
artifact bytes per token, and cold `kvforge query` start. Measured side by side in one run.

    .venv/bin/python benchmarks/bench_foundation.py --out bench-out

Writes foundation.json (raw numbers) and foundation.md (the table for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvforge
from common import environment, write_results
from kvforge.model import load_model

QUESTION = "What does the text say about exceptions raised inside a finally clause?"


def make_text(lm, n_tokens: int) -> str:
    """Real text (Python's language reference) cut to about ``n_tokens`` document tokens."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    prefix = len(lm.encode_document(""))
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - prefix]
    return lm.tokenizer.decode(ids).strip()


@torch.inference_mode()
def ttft_text(lm, doc_text: str, question: str) -> float:
    """Seconds from token ids to the first answer token when prefilling the whole prompt."""
    ids = lm.encode_document(doc_text) + lm.encode_question(question)
    t0 = time.perf_counter()
    logits = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits
    int(torch.argmax(logits[0, -1]))
    return time.perf_counter() - t0


def median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lm = load_model()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="kvforge-bench-"))
    for n in [int(x) for x in args.lengths.split(",")]:
        text = make_text(lm, n)
        src = work / f"doc{n}.txt"
        src.write_text(text)
        row = {"target_tokens": n}
        for label, method, keep in (("full", "full", 1.0), ("knorm_0.5", "knorm", 0.5)):
            t0 = time.perf_counter()
            rep = kvforge.build([src], work / label, method=method, keep=keep, model=lm, progress=False, force=True)
            row[f"build_s_{label}"] = time.perf_counter() - t0
            entry = rep.entries[0]
            row["logical_tokens"] = entry["logical_tokens"]
            row[f"bytes_{label}"] = entry["bytes"]
            row[f"bytes_per_token_{label}"] = entry["bytes"] / entry["logical_tokens"]
        art = work / "full" / f"doc{n}.kv"
        ttft_t, ttft_a, ttft_w, load_a = [], [], [], []
        ttft_text(lm, text, QUESTION)  # warm-up
        for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
            ttft_t.append(ttft_text(lm, text, QUESTION))
            t0 = time.perf_counter()
            doc = kvforge.load(art, model=lm)
            load_a.append(time.perf_counter() - t0)
            ttft_a.append(doc.run(QUESTION, max_new_tokens=1).stats.ttft_s)  # first question after the load
            ttft_w.append(doc.run(QUESTION, max_new_tokens=1).stats.ttft_s)  # a later question on the loaded document
        fp16_full = 2 * lm.info.num_layers * lm.info.num_kv_heads * lm.info.head_dim * 2
        row.update({
            "ttft_text_s": median(ttft_t),
            "ttft_artifact_s": median(ttft_a),
            "load_artifact_s": median(load_a),
            "ttft_artifact_warm_s": median(ttft_w),
            "speedup_ttft": median(ttft_t) / median(ttft_a),
            "speedup_ttft_warm": median(ttft_t) / median(ttft_w),
            "speedup_load_plus_ttft": median(ttft_t) / (median(ttft_a) + median(load_a)),
            "fp16_full_bytes_per_token": fp16_full,
        })
        rows.append(row)
        print(json.dumps(row), flush=True)

    # cold start: a new process, model cache present, one answer token
    art = work / "full" / f"doc{rows[0]['target_tokens']}.kv"
    cold, first = [], []
    exe = str(Path(sys.executable).with_name("kvforge"))
    subprocess.run([exe, "query", str(art), QUESTION, "--max-new-tokens", "1", "--json"], capture_output=True)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = subprocess.run([exe, "query", str(art), QUESTION, "--max-new-tokens", "1", "--json"],
                           capture_output=True, text=True, check=True)
        cold.append(time.perf_counter() - t0)
        first.append(json.loads(r.stdout))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
    import_s = time.perf_counter() - t0
    result = environment(lm) | {
        "rows": rows,
        "cold_query_s": median(cold),
        "cold_query_runs_s": cold,
        "cold_query_load_s": median(x["load_s"] for x in first),
        "import_torch_transformers_s": import_s,
    }
    write_results(args.out, "foundation", result, render)


def render(r: dict) -> str:
    lines = [
        f"Machine: {r['machine']}; Python {r['python']}, torch {r['torch']}; model {r['model']}; date {r['date']}.",
        "",
        "| doc tokens | TTFT text prefill | TTFT artifact, 1st question | speed-up | TTFT artifact, later question |"
        " speed-up | artifact load | speed-up incl. load | bytes/token keep 1.0 | bytes/token keep 0.5 |"
        " fp16 full cache bytes/token |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['logical_tokens']} | {x['ttft_text_s'] * 1000:.0f} ms | {x['ttft_artifact_s'] * 1000:.0f} ms | "
            f"{x['speedup_ttft']:.1f}x | "
            f"{x['ttft_artifact_warm_s'] * 1000:.0f} ms | {x['speedup_ttft_warm']:.1f}x | {x['load_artifact_s'] * 1000:.0f} ms | {x['speedup_load_plus_ttft']:.1f}x | "
            f"{x['bytes_per_token_full']:.0f} | {x['bytes_per_token_knorm_0.5']:.0f} | {x['fp16_full_bytes_per_token']} |"
        )
    lines += [
        "",
        f"Cold `kvforge query ... --max-new-tokens 1` (new process, model cache present): median "
        f"{r['cold_query_s']:.2f} s over {len(r['cold_query_runs_s'])} runs "
        f"({', '.join(f'{s:.2f}' for s in r['cold_query_runs_s'])}); of which `import torch, transformers` "
        f"alone takes {r['import_torch_transformers_s']:.2f} s and artifact + model load {r['cold_query_load_s']:.2f} s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
