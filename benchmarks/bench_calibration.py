"""Does ``--keep auto`` beat one fixed keep at the same average keep?

A mixed corpus: the dense example documents (Python reference text, many
distinct facts, the questions of ``examples/questions.json``) and generated
redundant documents (a heartbeat log, a repeated notice, an inventory table,
each with one distinct fact somewhere in the repetition and a question on it).

Every document is prefilled and scored once (compactor); then
* fixed keeps on a grid: accuracy and question+answer KL against the full cache;
* ``--keep auto`` at several tolerances: the chosen keeps, their mean, accuracy, KL;
* for each tolerance, one fixed keep equal to its mean keep: the like-for-like comparison.

    .venv/bin/python benchmarks/bench_calibration.py --out benchmarks/results

Writes calibration.json and calibration.md (the table for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


from common import environment, write_results
from kvforge.calibrate import CalibrationConfig, calibrate
from kvforge.eval.runner import kl_divergence
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.methods.base import keep_all
from kvforge.model import load_model
from kvforge.prefill import prefill
from kvforge.runtime import Doc

ROOT = Path(__file__).resolve().parent.parent


def redundant_docs(seed: int = 0) -> list[dict]:
    """Boilerplate and repetition with one distinct fact each; deterministic."""
    rng = random.Random(seed)
    docs = []
    # a service log: the same heartbeat, one error line
    lines, vol = [], f"vol-{rng.randrange(1000, 9999)}"
    at = rng.randrange(40, 80)
    for i in range(110):
        lines.append(f"2026-03-14 09:{i // 60:02d}:{i % 60:02d} INFO api-gateway heartbeat ok latency=12ms")
        if i == at:
            lines.append(f"2026-03-14 09:{i // 60:02d}:{i % 60:02d} ERROR storage disk full on volume {vol}")
    docs.append({"id": "log", "text": "\n".join(lines),
                 "questions": [{"question": "Which volume ran out of disk space according to the log?",
                                "answer": vol}]})
    # a notice repeated, one copy carries the change
    notice = ("Notice to all residents: the building's water supply will be interrupted for routine maintenance. "
              "Please store enough water for the day and keep taps closed during the work. ")
    room = f"room {rng.randrange(100, 999)}"
    parts = [notice] * 14
    parts.insert(9, f"The keys for the maintenance crew can be collected from {room} on the ground floor. ")
    docs.append({"id": "notice", "text": "".join(parts),
                 "questions": [{"question": "Where can the maintenance crew collect the keys?", "answer": room}]})
    # an inventory table: the same row, one recalled lot
    lot = f"lot {rng.randrange(1000, 9999)}"
    rows = [f"| item {i:03d} | steel bracket | 40 mm | in stock | warehouse A |" for i in range(80)]
    rows.insert(52, f"| item 052b | steel bracket | 40 mm | recalled, {lot} | warehouse A |")
    docs.append({"id": "inventory", "text": "| item | name | size | status | place |\n" + "\n".join(rows),
                 "questions": [{"question": "Which lot number was recalled?", "answer": lot}]})
    # a license text repeated with a single different line
    license_ = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software, "
                "to deal in the software without restriction, subject to the conditions below. ")
    year = str(rng.randrange(1990, 2020))
    parts = [license_] * 12
    parts.insert(4, f"This component was first released in the year {year} by the original authors. ")
    docs.append({"id": "license", "text": "".join(parts),
                 "questions": [{"question": "In which year was the component first released?", "answer": year}]})
    return docs


def dense_docs() -> list[dict]:
    qs = json.loads((ROOT / "examples" / "questions.json").read_text())
    out = []
    for path in sorted((ROOT / "examples" / "corpus").glob("*.txt")):
        out.append({"id": path.stem, "text": path.read_text(),
                    "questions": [q for q in qs if q["doc"] == path.stem]})
    return out


def correct(answer: str, expected: str) -> float:
    return float(expected.lower().strip("()") in answer.lower())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tolerances", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--grid", default="0.1,0.2,0.3,0.4,0.5,0.75")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    lm = load_model()
    method = get_method("compactor")
    docs = [d | {"kind": "dense"} for d in dense_docs()] + [d | {"kind": "redundant"} for d in redundant_docs()]
    tolerances = [float(x) for x in args.tolerances.split(",")]
    grid = [float(x) for x in args.grid.split(",")]

    per_doc = []
    for d in docs:
        ids = lm.encode_document(d["text"])
        t0 = time.perf_counter()
        kv = prefill(lm.model, ids, queries=True, pre_rope_keys=True)
        t_prefill = time.perf_counter() - t0
        L, H, T, _ = kv.shape
        ctx = CompressionContext(model=lm, seed=0)
        t0 = time.perf_counter()
        compress_at = method.prepare(kv, ctx)
        t_score = time.perf_counter() - t0
        full = Doc.from_kv(lm, keep_all(kv), T)
        refs = []
        for q in d["questions"]:
            a = full.answer_ids(q["question"], args.max_new_tokens)
            refs.append((q, a or [lm.tokenizer.eos_token_id], full.logits(q["question"], a or [lm.tokenizer.eos_token_id],
                                                                           include_question=True)))

        def evaluate(ckv, T=T, refs=refs):  # bound now: the closure outlives this iteration
            doc = Doc.from_kv(lm, ckv, T)
            acc, kl = [], []
            for q, a, ref in refs:
                acc.append(correct(doc.answer(q["question"], args.max_new_tokens), q["answer"]))
                kl.append(kl_divergence(ref, doc.logits(q["question"], a, include_question=True)))
            return acc, kl

        row = {"id": d["id"], "kind": d["kind"], "tokens": T, "prefill_s": t_prefill, "score_s": t_score,
               "full_acc": [correct(lm.tokenizer.decode(a, skip_special_tokens=True), q["answer"]) for q, a, _ in refs],
               "fixed": {}, "auto": {}}
        for k in grid:
            row["fixed"][k] = evaluate(compress_at(Budget(k)))
        for tol in tolerances:
            keep, ckv, rec = calibrate(lm, ids, kv, method, ctx, CalibrationConfig(tolerance=tol))
            row["auto"][tol] = {"keep": keep, "seconds": rec.seconds, "trace": rec.trace, "eval": evaluate(ckv)}
        per_doc.append((row, compress_at, evaluate))
        print(json.dumps({"id": d["id"], "kind": d["kind"], "tokens": T,
                          "auto_keeps": {t: row["auto"][t]["keep"] for t in tolerances}}), flush=True)

    # like-for-like: one fixed keep equal to each tolerance's mean chosen keep
    summary = {"fixed": {}, "auto": {}, "matched": {}}

    def agg(evals):
        accs = [x for acc, _ in evals for x in acc]
        kls = [x for _, kl in evals for x in kl]
        return {"acc": statistics.mean(accs), "kl": statistics.mean(kls), "questions": len(accs)}

    summary["full"] = {"acc": statistics.mean(x for r, _, _ in per_doc for x in r["full_acc"])}
    for k in grid:
        summary["fixed"][k] = agg([r["fixed"][k] for r, _, _ in per_doc]) | {"mean_keep": k}
    for tol in tolerances:
        keeps = [r["auto"][tol]["keep"] for r, _, _ in per_doc]
        mean_keep = statistics.mean(keeps)
        summary["auto"][tol] = agg([r["auto"][tol]["eval"] for r, _, _ in per_doc]) | {
            "mean_keep": mean_keep, "keeps": {r["id"]: r["auto"][tol]["keep"] for r, _, _ in per_doc},
            "calibration_s": statistics.mean(r["auto"][tol]["seconds"] for r, _, _ in per_doc)}
        summary["matched"][tol] = agg([ev(ca(Budget(mean_keep))) for _, ca, ev in per_doc]) | {"mean_keep": mean_keep}
    rows = [r for r, _, _ in per_doc]
    result = environment(lm) | {
        "method": method.to_dict(),
        "docs": [{k: r[k] for k in ("id", "kind", "tokens", "prefill_s", "score_s", "full_acc")} for r in rows],
        "summary": summary,
        "prefill_s_mean": statistics.mean(r["prefill_s"] for r in rows),
    }
    write_results(args.out, "calibration", result, render)


def render(r: dict) -> str:
    s = r["summary"]
    n = s["fixed"][next(iter(s["fixed"]))]["questions"]
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}; "
             f"{len(r['docs'])} documents ({sum(d['kind'] == 'dense' for d in r['docs'])} dense, "
             f"{sum(d['kind'] == 'redundant' for d in r['docs'])} redundant), {n} questions; "
             f"full-cache accuracy {s['full']['acc']:.3f}.", "",
             "| policy | mean keep | accuracy | QA KL | keeps chosen (dense / redundant) | calibration s/doc |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    kinds = {d["id"]: d["kind"] for d in r["docs"]}
    for tol, a in s["auto"].items():
        dense = ", ".join(f"{v:g}" for k, v in a["keeps"].items() if kinds[k] == "dense")
        red = ", ".join(f"{v:g}" for k, v in a["keeps"].items() if kinds[k] == "redundant")
        m = s["matched"][tol]
        lines.append(f"| auto, tolerance {tol} | {a['mean_keep']:.3f} | {a['acc']:.3f} | {a['kl']:.3f} | "
                     f"{dense} / {red} | {a['calibration_s']:.1f} |")
        lines.append(f"| fixed {m['mean_keep']:.3f} (same mean) | {m['mean_keep']:.3f} | {m['acc']:.3f} | "
                     f"{m['kl']:.3f} | | |")
    for k, f in s["fixed"].items():
        lines.append(f"| fixed {k} | {k} | {f['acc']:.3f} | {f['kl']:.3f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
