"""Reference queries for the fitting methods: rotated to the document's end, or at their own positions?

Select+Fit's eviction alone (``refit: false``) scores every entry by the attention of
the document's own queries; the only difference between the two rows is whether each
captured query is first rotated by RoPE from its position t to the document's end T
(``position: end``, as if it came with the question) or kept where it was
(``position: own``: it then attends to "future" keys at negative distances). KL on
question + answer tokens, question appended after compression.

    python benchmarks/bench_reference.py --out bench-out
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from kvforge.calibrate import kl_divergence  # noqa: E402
from kvforge.eval.tasks import generate  # noqa: E402
from kvforge.methods import Budget, CompressionContext, get_method  # noqa: E402
from kvforge.methods.base import keep_all  # noqa: E402
from kvforge.model import load_model  # noqa: E402
from kvforge.prefill import prefill  # noqa: E402
from kvforge.runtime import Doc  # noqa: E402

KINDS = ["niah_number", "niah_uuid", "niah_multikey", "niah_multivalue"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--keeps", default="0.5,0.25")
    args = ap.parse_args()
    lm = load_model(None)
    keeps = [float(k) for k in args.keeps.split(",")]
    kls: dict[str, list[float]] = {}
    tasks = generate(lm.tokenizer, KINDS, [2048], 1, 0)
    for task in tasks:
        ids = lm.encode_document(task.context)
        T = len(ids)
        kv = prefill(lm.model, ids, queries=True)
        full = Doc.from_kv(lm, keep_all(kv), T)
        ref = full.answer_ids(task.question, 24) or [0]
        ref_qa = full.logits(task.question, ref, include_question=True)
        for position in ("end", "own"):
            method = get_method("select_fit", refit=False, position=position)
            ctx = CompressionContext(model=lm, seed=0)
            select_at = method.prepare(kv, ctx)
            for keep in keeps:
                doc = Doc.from_kv(lm, select_at(Budget(keep)), T)
                kl = kl_divergence(ref_qa, doc.logits(task.question, ref, include_question=True))
                kls.setdefault(f"{position}|{keep:g}", []).append(kl)
        print(f"{task.id}: done", flush=True)
    result = environment(lm) | {"keeps": keeps, "tasks": [t.id for t in tasks],
                                "mean_kl_qa": {k: statistics.mean(v) for k, v in kls.items()}, "raw": kls}
    write_results(args.out, "reference_queries", result, render)


def render(r: dict) -> str:
    s = r["mean_kl_qa"]
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}; "
             f"{len(r['tasks'])} tasks; select_fit eviction only, mean KL q+a.", "",
             "| reference queries | " + " | ".join(f"keep {k:g}" for k in r["keeps"]) + " |",
             "| --- | " + " | ".join("---:" for _ in r["keeps"]) + " |"]
    for position, label in (("end", "rotated to the document's end (shipped)"), ("own", "at their own positions")):
        lines.append(f"| {label} | " + " | ".join(f"{s[f'{position}|{k:g}']:.4f}" for k in r["keeps"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
