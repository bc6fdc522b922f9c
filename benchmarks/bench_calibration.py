"""Does ``--keep auto`` beat one fixed keep at the same average keep?

A mixed corpus: the dense example documents (Python reference text, many
distinct facts, the questions of ``examples/questions.json``) and generated
redundant documents (a heartbeat log, a repeated notice, an inventory table,
each with one distinct fact somewhere in the repetition and a question on it).

``--corpus needles`` replaces them with a larger generated set that the
embedded model can answer: ``--docs`` documents of ``--tokens`` tokens, half
dense (contiguous Python language reference) and half redundant (one of six
repeated boilerplate paragraphs), each holding one number, word or UUID needle
and asked for it (the needle kinds the 135M model's full cache answers);
``--kinds number`` keeps the one kind it answers in both kinds of document.
``--auto-grid`` sets the keeps ``--keep auto`` chooses from (default: the
calibration's own grid).

Every document is prefilled and scored once (compactor); then
* fixed keeps on a grid: accuracy and question+answer KL against the full cache;
* ``--keep auto`` at several tolerances: the chosen keeps, their mean, accuracy, KL;
* for each tolerance, one fixed keep equal to its mean keep: the like-for-like comparison.

    .venv/bin/python benchmarks/bench_calibration.py --out bench-out

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
from kvforge.calibrate import GRID, CalibrationConfig, calibrate
from kvforge.eval.runner import kl_divergence
from kvforge.eval.tasks import _WORDS, _ask, _needle, _number, _uuid, haystack, insert
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


BOILERPLATE = (
    "{date} INFO api-gateway heartbeat ok latency=12ms region=eu-west-1. ",
    "Notice to all residents: the water supply will be interrupted for routine maintenance on {date}. "
    "Please store enough water for the day and keep taps closed during the work. ",
    "| item | steel bracket | 40 mm | in stock | warehouse A | checked {date} |. ",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software, "
    "to deal in the software without restriction, subject to the conditions below. ",
    "Weather report for {date}: clear skies, light wind from the west, no rain expected. ",
    "Reminder: all visitors must sign in at the front desk and wear a badge at all times. ",
)


def needle_docs(tokenizer, n_docs: int, n_tokens: int, seed: int = 0,
                kinds: tuple[str, ...] = ("number", "word", "uuid")) -> list[dict]:
    """``n_docs`` generated documents, alternately dense (language reference) and redundant
    (a repeated boilerplate paragraph), each with one seeded needle, cycling over ``kinds``
    (number, word, uuid)."""
    docs = []
    for i in range(n_docs):
        rng = random.Random(f"calibration/{seed}/{i}")
        kind = kinds[(i // 2) % len(kinds)]
        key = rng.choice(_WORDS)
        value = {"number": _number, "uuid": _uuid}.get(kind, lambda r: r.choice([w for w in _WORDS if w != key]))(rng)
        if i % 2 == 0:
            text, _ = haystack(tokenizer, n_tokens - 30, rng)
            dense = "dense"
        else:
            template, dense = rng.choice(BOILERPLATE), "redundant"
            date = f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
            unit = template.format(date=date)
            reps = max(1, (n_tokens - 30) // len(tokenizer(unit, add_special_tokens=False)["input_ids"]))
            text = (unit * reps).strip()
        text = insert(text, [_needle(key, value)], [rng.uniform(0.05, 0.95)])
        docs.append({"id": f"{dense}-{i:03d}-{kind}", "kind": dense, "text": text,
                     "questions": [{"question": _ask(key), "answer": value}]})
    return docs


def correct(answer: str, expected: str) -> float:
    return float(expected.lower().strip("()") in answer.lower())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--tolerances", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--grid", default="0.1,0.2,0.3,0.4,0.5,0.75")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--corpus", choices=("examples", "needles"), default="examples")
    ap.add_argument("--docs", type=int, default=60, help="needles corpus: number of documents")
    ap.add_argument("--tokens", type=int, default=1024, help="needles corpus: tokens per document")
    ap.add_argument("--name", default="calibration", help="result file stem")
    ap.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                    help="the proxy over the probes: their mean KL, or the worst probe's")
    ap.add_argument("--kinds", default="number,word,uuid", help="needles corpus: needle kinds to cycle over")
    ap.add_argument("--seed", type=int, default=0, help="needles corpus: generation seed")
    ap.add_argument("--auto-grid", default=None,
                    help="the keeps --keep auto chooses from (default: kvforge.calibrate.GRID)")
    args = ap.parse_args()
    lm = load_model()
    method = get_method("compactor")
    if args.corpus == "needles":
        docs = needle_docs(lm.tokenizer, args.docs, args.tokens, seed=args.seed, kinds=tuple(args.kinds.split(",")))
    else:
        docs = ([d | {"kind": "dense"} for d in dense_docs()]
                + [d | {"kind": "redundant"} for d in redundant_docs()])
    tolerances = [float(x) for x in args.tolerances.split(",")]
    grid = [float(x) for x in args.grid.split(",")]
    auto_grid = tuple(float(x) for x in args.auto_grid.split(",")) if args.auto_grid else GRID

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
            cfg = CalibrationConfig(tolerance=tol, aggregate=args.aggregate, grid=auto_grid)
            keep, ckv, rec = calibrate(lm, ids, kv, method, ctx, cfg)
            row["auto"][tol] = {"keep": keep, "seconds": rec.seconds, "trace": rec.trace, "eval": evaluate(ckv)}
        per_doc.append((row, compress_at, evaluate))
        print(json.dumps({"id": d["id"], "kind": d["kind"], "tokens": T,
                          "auto_keeps": {t: row["auto"][t]["keep"] for t in tolerances}}), flush=True)

    # like-for-like: one fixed keep equal to each tolerance's mean chosen keep
    summary = {"fixed": {}, "auto": {}, "matched": {}}

    def agg(evals):  # [(kind, (acc, kl))] -> mean accuracy (overall and per kind), mean KL
        accs = [x for _, (acc, _) in evals for x in acc]
        kls = [x for _, (_, kl) in evals for x in kl]
        by_kind = {k: statistics.mean(x for kk, (acc, _) in evals if kk == k for x in acc)
                   for k in sorted({k for k, _ in evals})}
        return {"acc": statistics.mean(accs), "kl": statistics.mean(kls), "questions": len(accs),
                "acc_by_kind": by_kind}

    summary["full"] = {"acc": statistics.mean(x for r, _, _ in per_doc for x in r["full_acc"])}
    for k in grid:
        summary["fixed"][k] = agg([(r["kind"], r["fixed"][k]) for r, _, _ in per_doc]) | {"mean_keep": k}
    for tol in tolerances:
        keeps = [r["auto"][tol]["keep"] for r, _, _ in per_doc]
        mean_keep = statistics.mean(keeps)
        summary["auto"][tol] = agg([(r["kind"], r["auto"][tol]["eval"]) for r, _, _ in per_doc]) | {
            "mean_keep": mean_keep, "keeps": {r["id"]: r["auto"][tol]["keep"] for r, _, _ in per_doc},
            "calibration_s": statistics.mean(r["auto"][tol]["seconds"] for r, _, _ in per_doc)}
        summary["matched"][tol] = agg([(r["kind"], ev(ca(Budget(mean_keep)))) for r, ca, ev in per_doc]) | {
            "mean_keep": mean_keep}
    rows = [r for r, _, _ in per_doc]
    result = environment(lm) | {
        "method": method.to_dict(),
        "docs": [{k: r[k] for k in ("id", "kind", "tokens", "prefill_s", "score_s", "full_acc")}
                 | {"fixed": r["fixed"], "auto": {t: {"keep": a["keep"], "eval": a["eval"]} for t, a in r["auto"].items()}}
                 for r in rows],
        "summary": summary, "corpus": args.corpus, "aggregate": args.aggregate, "auto_grid": list(auto_grid),
        "kinds": args.kinds if args.corpus == "needles" else None, "seed": args.seed,
        "prefill_s_mean": statistics.mean(r["prefill_s"] for r in rows),
    }
    write_results(args.out, args.name, result, render)


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

    def chosen(keeps: dict, kind: str) -> str:
        vals = [v for k, v in keeps.items() if kinds[k] == kind]
        if len(vals) <= 6:
            return ", ".join(f"{v:g}" for v in vals)
        return f"mean {statistics.mean(vals):.2f} ({min(vals):g}–{max(vals):g})"

    def by_kind(a: dict) -> str:
        return " / ".join(f"{a['acc_by_kind'][k]:.3f}" for k in ("dense", "redundant"))

    lines[-2] = lines[-2].replace("| calibration s/doc |", "| accuracy dense / redundant | calibration s/doc |")
    lines[-1] += " ---: |"
    for tol, a in s["auto"].items():
        m = s["matched"][tol]
        lines.append(f"| auto, tolerance {tol} | {a['mean_keep']:.3f} | {a['acc']:.3f} | {a['kl']:.3f} | "
                     f"{chosen(a['keeps'], 'dense')} / {chosen(a['keeps'], 'redundant')} | {by_kind(a)} | "
                     f"{a['calibration_s']:.1f} |")
        lines.append(f"| fixed {m['mean_keep']:.3f} (same mean) | {m['mean_keep']:.3f} | {m['acc']:.3f} | "
                     f"{m['kl']:.3f} | | {by_kind(m)} | |")
    for k, f in s["fixed"].items():
        lines.append(f"| fixed {k} | {k} | {f['acc']:.3f} | {f['kl']:.3f} | | {by_kind(f)} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
