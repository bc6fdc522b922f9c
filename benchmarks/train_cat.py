"""Train a CAT model on the eval's text sources (the shipped one: the tuning split's two Python sources).

The shipped model (kvforge/adapters/cat-smollm2/) is a 600-step run on 1,024-token windows, its masks
selected per layer as the compactor builds:

    python benchmarks/train_cat.py -o cat-scope --policy compactor --steps 600 --context 1024 --scope layer

Writes the sources' passages as .txt files into a temporary folder (benchmarks/train_distill.py's corpus
writer, so both learned models see the same text; the same passages each time, so ``--resume`` finds the
same corpus) and runs ``kvforge.train.cat`` over them; ``--corpus DIR`` trains on a folder instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from train_distill import write_corpus

from kvforge.train import cat
from kvforge.train.cat_policy import POLICIES, SCOPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default="python-reference,python-docstrings")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--corpus", default=None, help="train on this folder instead of writing the sources' passages")
    ap.add_argument("--max-passages", type=int, default=0, help="at most this many passages per source (seeded)")
    ap.add_argument("--policy", default="router", choices=POLICIES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--scope", default="head", choices=SCOPES)
    ap.add_argument("--ntp-weight", type=float, default=None, help="the next-token loss's weight (default 0.5)")
    ap.add_argument("--select-temp", type=float, default=None,
                    help="the compactor policy's selection learned straight through at this temperature (default 0: not)")
    ap.add_argument("--select-grad", type=float, default=None,
                    help="that straight-through gradient's scale (default 1)")
    ap.add_argument("--lr", type=float, default=None, help="the peak learning rate (default 3e-4)")
    ap.add_argument("--init", default=None, help="a CAT model to continue (embedded-cat or a directory)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.corpus or tmp)
        if args.corpus is None:
            print(f"{write_corpus(args.sources.split(','), folder, max_passages=args.max_passages)} passages in {folder}")
        optional = ("ntp_weight", "select_temp", "select_grad", "lr")  # unset: the default, or --init's setting
        extra = {k: getattr(args, k) for k in optional if getattr(args, k) is not None}
        report = cat([str(folder)], args.out, steps=args.steps, context=args.context, policy=args.policy,
                     scope=args.scope, init=args.init, resume=args.resume, seed=args.seed, **extra)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
