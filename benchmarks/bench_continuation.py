"""Where continuation KL comes from: which tokens of the continuation, which layers of the cache.

For each generated task (the eval's generator, so the same documents as ``kvforge eval``), one
prefill, then per method spec: the compressed cache's KL against the full cache on the 64 tokens
of real text that followed the document (the eval's continuation KL), split two ways:

* **tokens**: the share of the summed KL carried by the ``--top`` worst continuation tokens, with
  what they are (a token the model copies from the document, a heading's underline...);
* **layers**: the same KL with only one group of ``--group`` consecutive layers compressed and
  every other layer left full, which says where in depth the loss enters.

Two **oracle** specs bound what a better selection could give: ``oracle:mean`` and ``oracle:max``
keep, per head at the same uniform count, the entries the continuation's own queries attend to most
(mean or max attention over its 64 tokens, captured from a full-cache prefill of document +
continuation), then refit values on the document's reference queries as select_fit does. No build
can know the continuation; if even this selection is no better than select_fit's, no ranking of
the document's entries is what a lower continuation KL needs.

    .venv/bin/python benchmarks/bench_continuation.py --out bench-out

Method specs as ``kvforge eval --methods`` (``name:key=value``, ``+pilot`` for pilot allocation).
Writes continuation.json and continuation.md.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from common import environment, write_results
from kvforge.builder import compress_document
from kvforge.calibrate import kl_per_row
from kvforge.eval.runner import CONTINUATION_TOKENS
from kvforge.eval.tasks import generate
from kvforge.methods import get_method
from kvforge.methods.base import keep_all
from kvforge.methods.fit import Reference, sample_reference
from kvforge.methods.select_fit import SelectFit
from kvforge.model import load_model
from kvforge.prefill import prefill
from kvforge.ragged import CompressedKV
from kvforge.runtime import Doc


def only_layers(compressed: CompressedKV, full: CompressedKV, layers: range) -> CompressedKV:
    """``compressed`` in ``layers`` and ``full`` everywhere else (beta zero there)."""
    pick = [layer in layers for layer in range(len(full.keys))]
    choose = lambda c, f: [a if p else b for p, a, b in zip(pick, c, f)]  # noqa: E731
    beta = None
    if compressed.beta is not None:
        beta = choose(compressed.beta, [torch.zeros(len(k)) for k in full.keys])
    lengths = torch.where(torch.tensor(pick)[:, None], compressed.lengths, full.lengths)
    return dataclasses.replace(compressed, lengths=lengths, keys=choose(compressed.keys, full.keys),
                               values=choose(compressed.values, full.values),
                               positions=choose(compressed.positions, full.positions), beta=beta)


@dataclasses.dataclass
class ContinuationOracle(SelectFit):
    """select_fit with its ranking taken from the continuation's queries (``pool``: mean or max attention)."""

    pool: str = "mean"
    oracle: Reference | None = None  # the continuation's queries at their own positions, (H, group * C, D)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("mean", "max"):
            raise SystemExit(f"oracle:{self.pool}: the oracle pools by mean or max")

    def score(self, kv, ctx) -> torch.Tensor:
        """(L, H, T): each entry's mean (or max) attention from the continuation's queries, softmax over the document."""
        L, H, T, _ = kv.shape
        out = torch.zeros(L, H, T)
        for layer in range(L):
            q = self.oracle.queries[layer]
            probs = torch.softmax(torch.einsum("hmd,hnd->hmn", q, kv.keys[layer].float()) * self.oracle.scale, -1)
            out[layer] = probs.mean(1) if self.pool == "mean" else probs.amax(1)  # (H, T)
        return out


def oracle_reference(lm, ids: list[int], cont: list[int], kv_heads: int) -> Reference:
    """The continuation's post-RoPE queries from a full-cache prefill of document + continuation."""
    T, C = len(ids), len(cont)
    queries = prefill(lm.model, ids + cont, queries=True).queries[:, :, T:]  # (L, Hq, C, D)
    return sample_reference(queries, torch.arange(T, T + C), T, kv_heads, lm.model, samples=C, position="own")


def make(spec: str):
    name = spec.removesuffix("+pilot")
    if name.startswith("oracle:"):
        return ContinuationOracle(pool=name.split(":", 1)[1])
    return get_method(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--methods", default="select_fit;sculpt:init=select_fit:surprisal=0;sculpt:init=select_fit",
                    help="specs separated by ';' (also oracle:mean and oracle:max, above)")
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--tasks", default="niah_number,niah_word,niah_uuid,niah_multikey,niah_multivalue")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", type=int, default=5, help="layers per group in the depth split")
    ap.add_argument("--top", type=int, default=3, help="worst tokens listed per document")
    ap.add_argument("--name", default="continuation")
    args = ap.parse_args()
    lm = load_model()
    specs = args.methods.split(";")
    methods = {s: make(s) for s in specs}
    tasks = generate(lm.tokenizer, args.tasks.split(","), [args.length], args.samples, args.seed)
    pre_rope = any(m.needs_pre_rope_keys for m in methods.values())
    surprisal = any(m.needs_surprisal for m in methods.values())
    rows = []
    for task in tasks:
        ids = lm.encode_document(task.context)
        kv = prefill(lm.model, ids, queries=True, pre_rope_keys=pre_rope, surprisal=surprisal)
        full_kv = keep_all(kv)
        cont = lm.tokenizer(task.continuation, add_special_tokens=False)["input_ids"][:CONTINUATION_TOKENS]
        ref = Doc.from_kv(lm, full_kv, len(ids), {}).continuation_logits(cont)
        if any(isinstance(m, ContinuationOracle) for m in methods.values()):
            oracle = oracle_reference(lm, ids, cont, kv.shape[1])
            for m in methods.values():
                if isinstance(m, ContinuationOracle):
                    m.oracle = oracle
        L = len(full_kv.keys)
        groups = [range(a, min(a + args.group, L)) for a in range(0, L, args.group)]
        for spec in specs:
            _, ckv, _ = compress_document(lm, ids, kv, methods[spec], args.keep,
                                          allocate="pilot" if spec.endswith("+pilot") else "uniform", seed=args.seed)
            kl = kl_per_row(ref, Doc.from_kv(lm, ckv, len(ids), {}).continuation_logits(cont))
            worst = torch.topk(kl, min(args.top, len(kl)))
            by_group = [float(kl_per_row(ref, Doc.from_kv(lm, only_layers(ckv, full_kv, g), len(ids), {})
                                       .continuation_logits(cont)).mean()) for g in groups]
            row = {"task": task.id, "method": spec, "keep": args.keep, "kl_cont": float(kl.mean()),
                   "top_share": float(worst.values.sum() / kl.sum().clamp_min(1e-12)),
                   "worst": [{"kl": float(v), "context": lm.tokenizer.decode(cont[max(0, int(i) - 4):int(i) + 1]),
                              "next": lm.tokenizer.decode(cont[int(i) + 1:int(i) + 2])}
                             for v, i in zip(worst.values, worst.indices)],
                   "groups": [f"{g.start}-{g.stop - 1}" for g in groups], "kl_only_group": by_group}
            rows.append(row)
            print(f"{task.id} {spec}: KL {row['kl_cont']:.4f}, worst {args.top} tokens {row['top_share']:.0%}, "
                  f"by group {[round(x, 4) for x in by_group]}", flush=True)
    write_results(args.out, args.name, environment(lm) | {"args": vars(args), "rows": rows}, render)


def render(r: dict) -> str:
    a = r["args"]
    rows = r["rows"]
    specs = list(dict.fromkeys(x["method"] for x in rows))
    groups = rows[0]["groups"] if rows else []
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}. "
             f"Keep {a['keep']}, {len({x['task'] for x in rows})} documents of {a['length']} tokens "
             f"(seed {a['seed']}); continuation KL: mean over the 64 tokens after the document, then over "
             "documents; 'only layers' columns: that group compressed, every other layer full.", "",
             f"| method | continuation KL | worst {a['top']} tokens' share | "
             + " | ".join(f"only layers {g}" for g in groups) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in groups) + " |"]
    for s in specs:
        mine = [x for x in rows if x["method"] == s]
        mean = lambda f: sum(f(x) for x in mine) / len(mine)  # noqa: E731
        lines.append(f"| {s} | {mean(lambda x: x['kl_cont']):.4f} | {mean(lambda x: x['top_share']):.0%} | "
                     + " | ".join(f"{mean(lambda x, i=i: x['kl_only_group'][i]):.4f}" for i in range(len(groups)))
                     + " |")
    lines += ["", "Worst continuation tokens (KL: the text before it → the next token):", ""]
    for x in rows:
        worst = "; ".join(f"{w['kl']:.2f} {w['context']!r} → {w['next']!r}" for w in x["worst"])
        lines.append(f"- {x['task']}, {x['method']}: {worst}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
