"""A CAT model against its base: held-out perplexity and how fast sculpt's fit converges on each.

    python benchmarks/bench_cat.py --cat embedded-cat --docs 12 --tokens 1024 --out bench-out

1. **Uncompressed quality**: mean next-token loss (and perplexity) of both models over ``--docs``
   haystacks of the held-out split (licenses, changelogs, man pages: text neither model was trained
   on), ``--tokens`` tokens each, the same text for both.
2. **Sculpt's convergence** (KV-CAT's second claim): on the first ``--fit-docs`` of those documents,
   sculpt at ``--keep`` is run with 0, 2, 5, 10, 20 and 40 L-BFGS iterations; the fit's objective
   (the normalized attention-output error + the mass error, over the reference queries, averaged over
   layers and heads) after each; "iterations to within 5%" is where the curve reaches 1.05x the
   40-step loss (linear between the grid's points), "share of the drop at 10" how much of the 0 -> 40
   drop the first 10 iterations (sculpt's default) achieve.

Compression quality against each model's own full cache is `kvforge eval --model ...` (BENCHMARKS.md).
Writes ``cat.json`` and ``cat.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kvforge.eval import sources as S
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.methods.fit import attend
from kvforge.model import load_model
from kvforge.prefill import prefill

STEPS = (0, 2, 5, 10, 20, 40)


def documents(lm, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    names = S.check_sources(S.of_split("heldout"))
    rng = random.Random(f"bench-cat:{seed}")
    out = []
    for i in range(n):
        text, _ = S.haystack(lm.tokenizer, tokens, rng, source=names[i % len(names)])
        out.append(lm.encode_document(text))
    return out


@torch.no_grad()
def mean_nll(lm, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logits = lm.model(input_ids=x).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))


def fit_objective(kv, out, ref, mass_weight: float = 1.0) -> float:
    """Sculpt's objective of ``out`` against the full cache, averaged over layers and KV heads."""
    total, heads = 0.0, 0
    for layer in range(len(out.keys)):
        target, lse = ref.targets(kv, layer)
        offsets = out.layer_offsets(layer)
        for h in range(len(offsets) - 1):
            a, b = offsets[h], offsets[h + 1]
            beta = out.beta[layer][a:b][None].float() if out.beta is not None else None
            o, s = attend(ref.queries[layer][h:h + 1], out.keys[layer][a:b].float()[None],
                          out.values[layer][a:b].float()[None], ref.scale, beta)
            err = float(((o - target[h:h + 1]) ** 2).sum() / (target[h] ** 2).sum().clamp_min(1e-12))
            total += err + mass_weight * float(((s - lse[h:h + 1]) ** 2).mean())
            heads += 1
    return total / heads


def convergence(lm, ids: list[int], keep: float) -> list[float]:
    kv = prefill(lm.model, ids, queries=True, pre_rope_keys=True, surprisal=True)
    ctx = CompressionContext(model=lm, seed=0)
    curve = []
    for steps in STEPS:
        m = get_method("sculpt", init="select_fit", steps=steps)
        prepared = m.prepare(kv, ctx)
        curve.append(fit_objective(kv, prepared(Budget(keep)), prepared.reference))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cat", default="embedded-cat")
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--fit-docs", type=int, default=4, help="documents of the convergence part (0: perplexity only)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base, cat = load_model(args.base), load_model(args.cat)
    docs = documents(base, args.docs, args.tokens)
    t0 = time.time()
    nll = {name: [mean_nll(lm, ids) for ids in docs] for name, lm in (("base", base), ("cat", cat))}
    curves = {name: [convergence(lm, ids, args.keep) for ids in docs[: args.fit_docs]]
              for name, lm in (("base", base), ("cat", cat))}

    def to_within(curve, tol=1.05):
        """Iterations until the objective is within ``tol`` of the 40-iteration one, linear between grid points."""
        goal = tol * curve[-1]
        for (s0, v0), (s1, v1) in zip(zip(STEPS, curve), zip(STEPS[1:], curve[1:])):
            if v1 <= goal:
                return round(s0 + (s1 - s0) * (v0 - goal) / (v0 - v1), 1) if v0 > goal else s0
        return STEPS[-1]

    def drop_by(curve, steps=10):
        """Share of the 0 -> 40 iteration drop reached after ``steps`` iterations (sculpt's default is 10)."""
        return round((curve[0] - curve[STEPS.index(steps)]) / max(curve[0] - curve[-1], 1e-12), 3)

    mean = {k: sum(v) / len(v) for k, v in nll.items()}
    result = {"command": "python benchmarks/bench_cat.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1),
              "base": base.info.name, "cat": cat.info.name, "docs": len(docs), "tokens": args.tokens,
              "nll": nll, "mean_nll": mean, "perplexity": {k: float(torch.tensor(v).exp()) for k, v in mean.items()},
              "nll_lower_on": sum(c < b for b, c in zip(nll["base"], nll["cat"])),
              "fit_steps": list(STEPS), "fit_curves": curves,
              "fit_to_within_5pct": {k: [to_within(c) for c in v] for k, v in curves.items()},
              "fit_drop_by_10": {k: [drop_by(c) for c in v] for k, v in curves.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cat.json").write_text(json.dumps(result, indent=2) + "\n")
    ppl = result["perplexity"]
    lines = [f"# CAT model against its base ({result['date']})", "", f"`{result['command']}`", "",
             f"Held-out perplexity over {len(docs)} documents of {args.tokens} tokens: base {ppl['base']:.3f}, "
             f"CAT {ppl['cat']:.3f} ({100 * (ppl['cat'] / ppl['base'] - 1):+.1f}%); CAT lower on "
             f"{result['nll_lower_on']}/{len(docs)}."]
    if args.fit_docs:
        lines += ["", f"Sculpt's objective at keep {args.keep} after N L-BFGS iterations (mean over {args.fit_docs} "
                  "documents):", "", "| model | " + " | ".join(str(s) for s in STEPS) + " | iterations to within 5% | share of the drop at 10 |",
                  "| --- | " + " | ".join("---:" for _ in STEPS) + " | --- | --- |"]
        for name, cs in curves.items():
            avg = [sum(c[i] for c in cs) / len(cs) for i in range(len(STEPS))]
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in avg) +
                         f" | {result['fit_to_within_5pct'][name]} | {result['fit_drop_by_10'][name]} |")
    (out / "cat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
