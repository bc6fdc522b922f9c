"""Reference queries from a "repeat the document" self-probe, against the document's own queries.

The fitting methods and the pilot allocation take their reference queries
(the stand-ins for unknown questions) from the document's own prefill,
rotated by RoPE to the document's end (``kvforge.methods.fit.reference``).
The issue also suggested a cheap self-probe, as KVzip does: append "Repeat the
document above" and the document again, and use the queries of that second
pass, which look back at every token of the first. This script measures three
sources side by side, on the same prefill, with everything else equal:

* ``own``: the document's own queries (what kvforge ships);
* ``own+repeat``: both sets pooled (the same number sampled from the pool);
* ``repeat``: the repeat pass's queries only.

Each is rotated from its position to the document's end. For every generated
needle task: one prefill of ``document + repeat prompt + document`` (its first
part is the document's cache), then ``sculpt`` without the surprisal prior
(as when this was measured: the prior does not depend on the reference
queries) with pilot allocation at ``--keep``, question appended after compression; needle accuracy and KL on
question + answer tokens against the full cache.

The query source is swapped by replacing ``reference`` in the modules that
import it (fit, select_fit, sculpt, budget): a measurement, not a feature.

    .venv/bin/python benchmarks/bench_self_probe.py --out bench-out   # about 8 minutes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import environment, write_results
from kvforge import budget
from kvforge.builder import compress_document
from kvforge.calibrate import kl_divergence
from kvforge.eval.tasks import generate
from kvforge.methods import fit, get_method, sculpt, select_fit
from kvforge.methods.base import keep_all
from kvforge.model import load_model
from kvforge.prefill import KV, prefill
from kvforge.runtime import Doc

SOURCES = ("own", "own+repeat", "repeat")
_BANK: dict[str, torch.Tensor] = {}  # "q": (L, Hq, P, D) captured queries, "pos": (P,) their positions


def reference_from_bank(kv: KV, model=None, samples: int = 256, position: str = "end", seed: int = 0):
    """``fit.reference`` over the query bank: a seeded sample, each rotated from its position to T."""
    return fit.sample_reference(_BANK["q"], _BANK["pos"], kv.shape[2], kv.shape[1], model, samples, position, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tasks", default="niah_number,niah_word,niah_uuid")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--length", type=int, default=2048)
    args = ap.parse_args()
    lm = load_model()
    for module in (fit, select_fit, sculpt, budget):
        module.reference = reference_from_bank
    method = get_method("sculpt", init="select_fit", surprisal=0.0)
    prompt = lm.encode_question("Repeat the document above, word for word.")
    start = len(lm.encode_document(""))
    rows = []
    for task in generate(lm.tokenizer, args.tasks.split(","), [args.length], args.samples, 0):
        ids = lm.encode_document(task.context)
        T = len(ids)
        ext = ids + prompt + ids[start:]
        t0 = time.perf_counter()
        big = prefill(lm.model, ext, queries=True, pre_rope_keys=True)
        probe_s = time.perf_counter() - t0
        kv = KV(keys=big.keys[:, :, :T].contiguous(), values=big.values[:, :, :T].contiguous(),
                queries=big.queries[:, :, :T].contiguous(), keys_pre_rope=big.keys_pre_rope[:, :, :T].contiguous())
        full = Doc.from_kv(lm, keep_all(kv), T)
        answer = full.answer_ids(task.question, 24)
        ref = full.logits(task.question, answer, include_question=True)
        own, repeat = list(range(T)), list(range(T + len(prompt), len(ext)))
        row = {"task": task.id, "probe_prefill_s": probe_s}
        for source, positions in zip(SOURCES, (own, own + repeat, repeat)):
            _BANK["q"], _BANK["pos"] = big.queries[:, :, positions], torch.tensor(positions)
            _, out, _ = compress_document(lm, ids, kv, method, args.keep, allocate="pilot", seed=0)
            doc = Doc.from_kv(lm, out, T)
            said = lm.tokenizer.decode(doc.answer_ids(task.question, 24), skip_special_tokens=True)
            row[source] = {"score": task.score(said),
                           "kl_qa": kl_divergence(ref, doc.logits(task.question, answer, include_question=True))}
        rows.append(row)
        print(row, flush=True)
    summary = {s: {"correct": sum(r[s]["score"] for r in rows), "questions": len(rows),
                   "kl_qa": statistics.mean(r[s]["kl_qa"] for r in rows)} for s in SOURCES}
    write_results(args.out, "self_probe", environment(lm) | {
        "keep": args.keep, "method": "sculpt+pilot", "rows": rows, "summary": summary,
        "probe_prefill_s": statistics.mean(r["probe_prefill_s"] for r in rows)}, render)


def render(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}; "
             f"sculpt + pilot at keep {r['keep']}; the document + repeat prefill took "
             f"{r['probe_prefill_s']:.1f} s on average.", "",
             "| reference queries | needles | QA KL |", "| --- | ---: | ---: |"]
    for source, s in r["summary"].items():
        lines.append(f"| {source} | {s['correct']:g}/{s['questions']} | {s['kl_qa']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
