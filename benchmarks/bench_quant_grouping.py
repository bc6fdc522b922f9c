"""Which quantization grouping: KL on question + answer after a quantize -> dequantize round trip.

Same tasks as bench_storage.py (six needle kinds, 2048 tokens, compactor), comparing,
at int8 and int4: keys per channel with values per token asymmetric (KIVI), the
shipped scheme (values symmetric per token, float16 key scales), keys per token, and
values per channel. Only the shipped scheme is in kvforge.quantize; the others are
written here, as the measurement that decided against them.

    python benchmarks/bench_quant_grouping.py --out bench-out
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from kvforge import quantize as Q  # noqa: E402
from kvforge.calibrate import kl_divergence  # noqa: E402
from kvforge.eval.tasks import generate  # noqa: E402
from kvforge.methods import Budget, CompressionContext, get_method  # noqa: E402
from kvforge.methods.base import keep_all  # noqa: E402
from kvforge.model import load_model  # noqa: E402
from kvforge.prefill import prefill  # noqa: E402
from kvforge.ragged import CompressedKV  # noqa: E402
from kvforge.runtime import Doc  # noqa: E402

KINDS = ["niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery"]


def _asym(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max round trip with broadcastable group bounds (float32 scales)."""
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return lo + ((x - lo) / safe).round().clamp(0, levels) * scale


def _per_head(x: torch.Tensor, counts: list[int], fn) -> torch.Tensor:
    out, start = [], 0
    for n in counts:
        out.append(fn(x[start:start + n]) if n else x[start:start])
        start += n
    return torch.cat(out)


def scheme(name: str, keys: torch.Tensor, values: torch.Tensor, counts: list[int], bits: int):
    k, v = keys.float(), values.float()
    chan = lambda t: _asym(t, t.min(0).values, t.max(0).values, bits)  # noqa: E731
    tok = lambda t: _asym(t, t.min(1, keepdim=True).values, t.max(1, keepdim=True).values, bits)  # noqa: E731
    if name == "shipped":
        c, s, m = Q.quantize_keys(k, counts, bits)
        cv, sv = Q.quantize_values(v, bits)
        return Q.dequantize_keys(c, s, m, counts, bits, k.shape[1]), Q.dequantize_values(cv, sv, bits, v.shape[1])
    if name == "kivi_asym":
        return _per_head(k, counts, chan), tok(v)
    if name == "keys_per_token":
        return tok(k), tok(v)
    if name == "values_per_channel":
        return _per_head(k, counts, chan), _per_head(v, counts, chan)
    raise ValueError(name)


SCHEMES = ["kivi_asym", "shipped", "keys_per_token", "values_per_channel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out", help="result folder (default bench-out, untracked)")
    ap.add_argument("--keeps", default="0.25,0.1")
    args = ap.parse_args()
    lm = load_model(None)
    method = get_method("compactor")
    keeps = [float(k) for k in args.keeps.split(",")]
    tasks = generate(lm.tokenizer, KINDS, [2048], 1, 0)
    kls: dict[str, list[float]] = {}
    for task in tasks:
        ids = lm.encode_document(task.context)
        T = len(ids)
        kv = prefill(lm.model, ids, queries=True, pre_rope_keys=True)
        full = Doc.from_kv(lm, keep_all(kv), T)
        ref = full.answer_ids(task.question, 24) or [0]
        ref_qa = full.logits(task.question, ref, include_question=True)
        for keep in keeps:
            ckv = method.compress(kv, Budget(keep), CompressionContext(model=lm, seed=0))
            keys16 = [k.half() for k in ckv.keys]
            values16 = [v.half() for v in ckv.values]
            variants = {("float16", 16): (keys16, values16)}
            for bits in (8, 4):
                for name in SCHEMES:
                    pairs = [scheme(name, keys16[l], values16[l], ckv.lengths[l].tolist(), bits)
                             for l in range(len(keys16))]
                    variants[(name, bits)] = ([p[0].half() for p in pairs], [p[1].half() for p in pairs])
            for (name, bits), (ks, vs) in variants.items():
                doc = Doc.from_kv(lm, CompressedKV(ckv.lengths, ckv.positions, ks, vs, None), T)
                kl = kl_divergence(ref_qa, doc.logits(task.question, ref, include_question=True))
                kls.setdefault(f"{name}|{bits}|{keep:g}", []).append(kl)
        print(f"{task.id}: done", flush=True)
    summary = {k: statistics.mean(v) for k, v in kls.items()}
    write_results(args.out, "quant_grouping", environment(lm) | {"keeps": keeps, "tasks": [t.id for t in tasks],
                                                               "mean_kl_qa": summary, "raw": kls}, render)


def render(r: dict) -> str:
    s = r["mean_kl_qa"]
    cols = [(bits, keep) for keep in r["keeps"] for bits in (8, 4)]
    lines = [f"Machine: {r['machine']}; torch {r['torch']}; model {r['model']}; date {r['date']}; "
             f"{len(r['tasks'])} tasks; mean KL q+a.", "",
             "| scheme | " + " | ".join(f"int{b}, keep {k:g}" for b, k in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |",
             "| float16 (no quantization) | " + " | ".join(f"{s[f'float16|16|{k:g}']:.4f}" for _, k in cols) + " |"]
    for name in SCHEMES:
        lines.append(f"| {name} | " + " | ".join(f"{s[f'{name}|{b}|{k:g}']:.4f}" for b, k in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
