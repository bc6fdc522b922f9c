"""Which entries of a needle survive compression, per layer: the diagnosis behind a lost needle.

For generated tasks (``kvforge eval``'s generator, any split), every method compresses the
same prefill at the same keep; for the tokens of the needle's answer (the value a question
asks for) this reports the fraction of their (layer, KV head) entries each method keeps, per
layer and overall, and writes a heat map (methods x layers). A method that keeps a needle's
entries in the layers that read it answers; one that keeps them only where nothing looks does not.

    .venv/bin/python benchmarks/needle_survival.py --split heldout --keep 0.1 \\
        --methods compactor,replay,kvpress:KVzipPress --samples 1 --out bench-out/needle-survival
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvforge.builder import compress_document  # noqa: E402
from kvforge.eval import kvpress_adapter  # noqa: E402
from kvforge.eval.sources import of_split  # noqa: E402
from kvforge.eval.tasks import generate  # noqa: E402
from kvforge.methods import get_method  # noqa: E402
from kvforge.model import load_model  # noqa: E402
from kvforge.prefill import prefill  # noqa: E402


def answer_positions(lm, task) -> list[int]:
    """Token positions (in the document segment) of every character of the task's answers."""
    text = lm.template.doc_prefix + task.context
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = 1 if lm.template.bos_token_id is not None else 0
    spans = []
    for answer in task.answers:
        at = text.find(answer)
        if at >= 0:
            spans.append((at, at + len(answer)))
    return [i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


def kept_mask(compressed, T: int) -> torch.Tensor:
    """(L, H, T) bool: which original entries a compressed cache holds (by their stored positions)."""
    L, H = compressed.lengths.shape
    mask = torch.zeros(L, H, T, dtype=torch.bool)
    for layer in range(L):
        offs = [0] + torch.cumsum(compressed.lengths[layer], 0).tolist()
        for h in range(H):
            mask[layer, h, compressed.positions[layer][offs[h]:offs[h + 1]].long()] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--tasks", default="niah_number,niah_word,niah_uuid,niah_multikey")
    ap.add_argument("--methods", default="compactor,replay,kvpress:KVzipPress")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/needle-survival"))
    args = ap.parse_args()
    lm = load_model(args.model)
    tasks = generate(lm.tokenizer, args.tasks.split(","), [args.length], args.samples, args.seed,
                     of_split(args.split))
    methods = args.methods.split(",")
    per_layer = {m: [] for m in methods}
    for task in tasks:
        ids = lm.encode_document(task.context)
        T = len(ids)
        where = answer_positions(lm, task)
        if not where:
            continue
        kv = prefill(lm.model, ids, queries=True, pre_rope_keys=True, surprisal=True)
        for spec in methods:
            if spec.startswith("kvpress:"):
                # the adapter's positions are the kept entries' original indices (mask-based presses) or
                # their order in a pruned cache (a press that drops entries physically loses them)
                compressed, _ = kvpress_adapter.press_prefill(lm.model, ids, spec.removeprefix("kvpress:"), args.keep)
                mask = kept_mask(compressed, T)
            else:
                name, _, alloc = spec.partition("+")
                _, compressed, _ = compress_document(lm, ids, kv, get_method(name), args.keep,
                                                     allocate=alloc or "uniform", seed=args.seed)
                mask = kept_mask(compressed, T)
            per_layer[spec].append(mask[:, :, where].float().mean(dim=(1, 2)).tolist())  # (L,)
        print(task.id, {m: round(sum(v[-1]) / len(v[-1]), 3) for m, v in per_layer.items()}, flush=True)
    summary = {m: {"per_layer": torch.tensor(v).mean(0).tolist(), "overall": float(torch.tensor(v).mean()),
                   "documents": len(v)} for m, v in per_layer.items() if v}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle_survival.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                              "methods": summary}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.tensor([summary[m]["per_layer"] for m in summary])
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(summary) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(yticks=range(len(summary)), yticklabels=list(summary), xlabel="layer",
           title=f"needle-answer entries kept ({args.split} split, keep {args.keep})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out / "needle_survival.png", dpi=110)
    for m, s in summary.items():
        print(f"{m:28s} overall {s['overall']:.3f}  first/middle/last layers "
              f"{s['per_layer'][0]:.2f} {s['per_layer'][len(s['per_layer']) // 2]:.2f} {s['per_layer'][-1]:.2f}")


if __name__ == "__main__":
    main()
