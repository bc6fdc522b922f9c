"""Storage: bytes per original token and added KL of int8 / int4, .kv files vs zarr libraries; checksum cost.

For each generated task (RULER-style needles over the Python reference, question
appended after compression) the document is prefilled once and compressed by the
compactor at every keep; each compressed cache is written as a ``.kv`` file and as a
document of a zarr library with every quantization, read back through the real
readers, and answered from. Reported per (keep, quantization):

* bytes per original token of the ``.kv`` file and of the zarr document (chunks and
  metadata), and their ratio to an fp16 full KV cache (``L * 2 * H * D * 2`` bytes a token);
* KL(full || artifact) on question + answer tokens (the full cache's greedy answer,
  teacher-forced), and for int8 / int4 the KL added over the unquantized artifact,
  relative to the compression's own KL;
* that the zarr twin gives the same logits as the ``.kv`` file (exact equality);
* load time with and without the tensor-digest check (``verify=False``), per container.

    python benchmarks/bench_storage.py --out bench-out [--lengths 2048] [--samples 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from kvforge import artifact, library  # noqa: E402
from kvforge.calibrate import kl_divergence  # noqa: E402
from kvforge.eval.tasks import generate  # noqa: E402
from kvforge.manifest import make_manifest  # noqa: E402
from kvforge.methods import Budget, CompressionContext, get_method  # noqa: E402
from kvforge.methods.base import keep_all  # noqa: E402
from kvforge.model import load_model  # noqa: E402
from kvforge.prefill import prefill  # noqa: E402
from kvforge.runtime import Doc  # noqa: E402

KINDS = ["niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery"]
QUANTS = ["none", "int8", "int4"]


def _load_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--keeps", default="0.5,0.25,0.1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(None)
    method = get_method("compactor")
    keeps = [float(k) for k in args.keeps.split(",")]
    tasks = generate(lm.tokenizer, KINDS, [int(n) for n in args.lengths.split(",")], args.samples, args.seed)
    info = lm.info
    fp16_per_token = info.num_layers * 2 * info.num_kv_heads * info.head_dim * 2
    rows, timing = [], []
    tmp = Path(tempfile.mkdtemp(prefix="kvforge-bench-storage-"))
    try:
        for task in tasks:
            ids = lm.encode_document(task.context)
            T = len(ids)
            kv = prefill(lm.model, ids, queries=method.needs_queries, pre_rope_keys=method.needs_pre_rope_keys,
                         surprisal=method.needs_surprisal)
            full = Doc.from_kv(lm, keep_all(kv), T)
            ref = full.answer_ids(task.question, 24) or [lm.tokenizer.eos_token_id or 0]
            ref_qa = full.logits(task.question, ref, include_question=True)
            for keep in keeps:
                compressed = method.compress(kv, Budget(keep), CompressionContext(model=lm, seed=0))
                for quant in QUANTS:
                    name = f"{task.id}-{keep:g}-{quant}"
                    manifest = make_manifest(lm.info.to_dict(), lm.template.to_dict(), doc_id=name,
                                             logical_length=T, compressed=compressed, method=method.to_dict(),
                                             keep_requested=keep, quantization=quant)
                    kv_path, lib = tmp / f"{name}.kv", tmp / f"lib-{quant}.zarr"
                    kv_bytes = artifact.write(kv_path, manifest, compressed)
                    zarr_bytes = library.write(lib, manifest, compressed)
                    a = artifact.read(kv_path)
                    z = library.read(lib, name)
                    doc_a, doc_z = Doc(artifact=a, lm=lm), Doc(artifact=z, lm=lm)
                    la = doc_a.logits(task.question, ref, include_question=True)
                    lz = doc_z.logits(task.question, ref, include_question=True)
                    row = {"task": task.id, "kind": task.kind, "tokens": T, "keep": keep, "quant": quant,
                           "keep_achieved": compressed.kept / (compressed.lengths.numel() * T),
                           "kv_bytes_per_token": kv_bytes / T, "zarr_bytes_per_token": zarr_bytes / T,
                           "kl_qa": kl_divergence(ref_qa, la), "zarr_logits_equal": bool(torch.equal(la, lz))}
                    rows.append(row)
                    if keep == keeps[0] and quant in ("none", "int8"):
                        timing.append({
                            "task": task.id, "quant": quant, "kv_bytes": kv_bytes, "zarr_bytes": zarr_bytes,
                            "kv_verify_s": _load_time(lambda: artifact.read(kv_path, verify=True)),
                            "kv_noverify_s": _load_time(lambda: artifact.read(kv_path, verify=False)),
                            "zarr_verify_s": _load_time(lambda: library.read(lib, name, verify=True)),
                            "zarr_noverify_s": _load_time(lambda: library.read(lib, name, verify=False)),
                        })
                    kv_path.unlink()
            print(f"{task.id}: done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = []
    for keep in keeps:
        base = [r for r in rows if r["keep"] == keep and r["quant"] == "none"]
        base_kl = statistics.mean(r["kl_qa"] for r in base)
        for quant in QUANTS:
            sel = [r for r in rows if r["keep"] == keep and r["quant"] == quant]
            kl = statistics.mean(r["kl_qa"] for r in sel)
            kvb = statistics.mean(r["kv_bytes_per_token"] for r in sel)
            zb = statistics.mean(r["zarr_bytes_per_token"] for r in sel)
            summary.append({"keep": keep, "quant": quant, "kv_bytes_per_token": kvb, "zarr_bytes_per_token": zb,
                            "kv_fraction_of_fp16": kvb / fp16_per_token, "zarr_fraction_of_fp16": zb / fp16_per_token,
                            "kl_qa": kl, "added_kl_vs_compression": (kl - base_kl) / base_kl if base_kl else None,
                            "zarr_logits_equal": all(r["zarr_logits_equal"] for r in sel), "n": len(sel)})
    result = environment(lm) | {"method": method.to_dict(), "fp16_full_bytes_per_token": fp16_per_token,
                                "tasks": [t.id for t in tasks], "summary": summary, "timing": timing, "rows": rows}
    write_results(args.out, "storage", result, render)


def render(r: dict) -> str:
    fp = r["fp16_full_bytes_per_token"]
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}; "
             f"{len(r['tasks'])} tasks; fp16 full cache {fp} bytes per token.", "",
             "| keep | storage | .kv bytes/token | (of fp16 full) | zarr bytes/token | (of fp16 full) | KL q+a | "
             "added KL / compression KL | zarr logits == .kv |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in r["summary"]:
        added = "" if s["quant"] == "none" else f"{100 * s['added_kl_vs_compression']:+.1f}%"
        lines.append(f"| {s['keep']:g} | {s['quant']} | {s['kv_bytes_per_token']:.0f} | "
                     f"1/{1 / s['kv_fraction_of_fp16']:.2f} | {s['zarr_bytes_per_token']:.0f} | "
                     f"1/{1 / s['zarr_fraction_of_fp16']:.2f} | {s['kl_qa']:.4f} | {added} | "
                     f"{'yes' if s['zarr_logits_equal'] else 'NO'} |")
    if r["timing"]:
        m = statistics.median
        t = r["timing"]
        lines += ["", "Load time (median over tasks of the median of 5 reads), keep "
                  f"{r['summary'][0]['keep']:g}:", "",
                  "| storage | container | with digest check | without (`--no-verify`) | saved |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for quant in ("none", "int8"):
            sel = [x for x in t if x["quant"] == quant]
            for c in ("kv", "zarr"):
                a, b = m(x[f"{c}_verify_s"] for x in sel), m(x[f"{c}_noverify_s"] for x in sel)
                lines.append(f"| {quant} | {'.kv' if c == 'kv' else 'zarr'} | {1000 * a:.0f} ms | {1000 * b:.0f} ms |"
                             f" {100 * (a - b) / a:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
