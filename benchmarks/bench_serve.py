"""Load benchmark of kvforge serve on loopback: concurrent clients over the example library, bounded in time.

    python benchmarks/bench_serve.py --seconds 120 --clients 8 --out bench-out

With the embedded model over examples/corpus built into a zarr library (built once under OUT/serve-lib.zarr,
compactor, keep 0.5), questions from examples/questions.json (5 documents). The server runs in this
process on a free loopback port (uvicorn thread + the engine thread); clients are threads with their own
httpx connection, streaming every answer. Phases, in order:

    warm        time to first token in process (Decoder.start on a resident document: the floor) and over
                HTTP (one streamed request at a time), interleaved question by question
    sequential  the same questions one at a time for --seq-seconds: tokens per second of one-at-a-time
    batched     --clients concurrent clients for --seconds, decode steps batched (the default server)
    unbatched   --clients concurrent clients for --seq-seconds, each step one sequence at a time

Recorded: p50 / p99 TTFT (request sent -> first content chunk), answer tokens per second (all clients
together), errors, the process's resident memory and the LRU's KV bytes every second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
import torch  # noqa: E402

from common import environment, write_results  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def ask(client: httpx.Client, doc: str, question: str, max_tokens: int) -> tuple[float, int]:
    """One streamed chat completion: (seconds to the first content chunk, answer tokens)."""
    body = {"model": doc, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


def run_phase(url: str, questions: list[dict], clients: int, seconds: float, max_tokens: int, registry,
              count: int | None = None) -> dict:
    """``clients`` threads asking in a loop for ``seconds`` (or ``count`` requests in all)."""
    ttfts, tokens, errors, samples = [], [0], [], []
    lock = threading.Lock()
    stop = threading.Event()
    issued = [0]
    t_start = time.perf_counter()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            k = i
            while not stop.is_set():
                with lock:
                    if count is not None and issued[0] >= count:
                        return
                    issued[0] += 1
                q = questions[k % len(questions)]
                k += clients
                try:
                    ttft, n = ask(client, q["doc"], q["question"], max_tokens)
                    with lock:
                        ttfts.append(ttft)
                        tokens[0] += n
                except Exception as exc:  # noqa: BLE001 -- counted, the run goes on
                    with lock:
                        errors.append(str(exc)[:200])
                if time.perf_counter() - t_start > seconds:
                    return

    def sampler() -> None:
        while not stop.is_set():
            samples.append({"t": round(time.perf_counter() - t_start, 1), "rss": rss_bytes(),
                            "kv": registry.resident_bytes()})
            stop.wait(1.0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    watch = threading.Thread(target=sampler, daemon=True)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    stop.set()
    watch.join()
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(ttfts), "errors": len(errors),
            "error_samples": errors[:3], "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"), "memory": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120, help="length of the concurrent (batched) phase")
    ap.add_argument("--seq-seconds", type=float, default=None,
                    help="length of the one-at-a-time and unbatched phases [default: seconds / 4]")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lib", default=None, help="a library to serve [default: examples/corpus built under OUT]")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads [default: torch's]; on a shared, busy machine 1 avoids spinning")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_seconds = args.seq_seconds if args.seq_seconds is not None else args.seconds / 4

    import kvforge
    from kvforge.model import load_model
    from kvforge.serve.server import BackgroundServer, prepare

    lm = load_model(None)
    lib = Path(args.lib) if args.lib else Path(args.out) / "serve-lib.zarr"
    if not lib.exists():
        kvforge.build([ROOT / "examples" / "corpus"], lib, method="compactor", keep=0.5, model=lm, progress=False)
    questions = json.loads((ROOT / "examples" / "questions.json").read_text())
    prepared = prepare([str(lib)], model=lm, max_resident_bytes=1 << 30)
    registry, engine = prepared.registry, prepared.engine
    questions = [q for q in questions if q["doc"] in registry.entries]
    docs = sorted({q["doc"] for q in questions})
    result = {"env": environment(lm), "load_average_start": os.getloadavg(), "library": str(lib),
              "documents": len(docs), "questions": len(questions), "max_tokens": args.max_tokens,
              "rss_before_server": rss_bytes()}

    # warm: in process (Decoder.start on a resident document, the question's forward: the floor) and over HTTP
    # (one streamed request, max_tokens 1), interleaved question by question, so machine noise hits both alike
    # (run one after the other, minutes apart, the two medians differed by more than the overhead measured)
    items = []
    for q in questions:
        document, _ = registry.get(q["doc"])
        items.append((q, document, lm.encode_question(q["question"], document.template)))
        engine.decoder.start(document, items[-1][2], 1)  # warm
    with BackgroundServer(prepared.app) as url:
        inproc, over_http = [], []
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(3):
                for q, document, ids in items:
                    inproc.append(engine.decoder.start(document, ids, 1).ttft_s)
                    over_http.append(ask(client, q["doc"], q["question"], 1)[0])
        result["inproc_ttft_p50_s"] = percentile(inproc, 50)
        result["warm"] = {"clients": 1, "seconds": round(sum(over_http), 1), "requests": len(over_http), "errors": 0,
                          "tokens": len(over_http), "tokens_per_s": len(over_http) / sum(over_http),
                          "ttft_p50_s": percentile(over_http, 50), "ttft_p99_s": percentile(over_http, 99),
                          "ttft_mean_s": statistics.fmean(over_http), "memory": []}
        diffs = sorted(h - i for h, i in zip(over_http, inproc))
        result["warm_ttft_minus_inproc_ms"] = 1000 * (result["warm"]["ttft_p50_s"] - result["inproc_ttft_p50_s"])
        result["warm_paired_difference_p50_ms"] = 1000 * diffs[len(diffs) // 2]
        print(f"warm TTFT p50 {result['warm']['ttft_p50_s'] * 1000:.1f} ms vs in-process "
              f"{result['inproc_ttft_p50_s'] * 1000:.1f} ms (paired difference p50 "
              f"{result['warm_paired_difference_p50_ms']:+.1f} ms)", flush=True)
        result["sequential"] = run_phase(url, questions, 1, seq_seconds, args.max_tokens, registry)
        print(f"sequential: {result['sequential']['tokens_per_s']:.1f} tokens/s", flush=True)
        result["batched"] = run_phase(url, questions, args.clients, args.seconds, args.max_tokens, registry)
        print(f"batched: {result['batched']['tokens_per_s']:.1f} tokens/s", flush=True)
        engine.decoder.batch = False
        result["unbatched"] = run_phase(url, questions, args.clients, seq_seconds, args.max_tokens, registry)
        engine.decoder.batch = True
        print(f"unbatched: {result['unbatched']['tokens_per_s']:.1f} tokens/s", flush=True)
    engine.close()
    mem = result["batched"]["memory"]
    settled = [s["rss"] for s in mem[len(mem) // 4:]] or [0]
    result["batched_rss_after_warmup_min_max"] = [min(settled), max(settled)]
    result["load_average_end"] = os.getloadavg()
    write_results(args.out, "serve", result, render)


def render(r: dict) -> str:
    ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
    rows = ["| phase | clients | seconds | requests | errors | TTFT p50 ms | TTFT p99 ms | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("warm", "sequential", "batched", "unbatched"):
        p = r[name]
        rows.append(f"| {name} | {p['clients']} | {p['seconds']} | {p['requests']} | {p['errors']} | "
                    f"{ms(p['ttft_p50_s'])} | {ms(p['ttft_p99_s'])} | {p['tokens_per_s']:.1f} |")
    lo, hi = r["batched_rss_after_warmup_min_max"]
    rows += ["", f"in-process TTFT p50 {1000 * r['inproc_ttft_p50_s']:.1f} ms; warm HTTP TTFT p50 "
                 f"{1000 * r['warm']['ttft_p50_s']:.1f} ms ({r['warm_ttft_minus_inproc_ms']:+.1f} ms; paired, question by question: "
                 f"{r['warm_paired_difference_p50_ms']:+.1f} ms); "
                 f"RSS during the batched phase after its first quarter {lo / 2**20:.0f}-{hi / 2**20:.0f} MiB; "
                 f"load average {r['load_average_start'][0]:.1f} at start, {r['load_average_end'][0]:.1f} at end; "
                 f"{r['env']['date']}, {r['env']['machine']}"]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
