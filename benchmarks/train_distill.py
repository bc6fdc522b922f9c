"""Train a distill adapter on one of the eval's text sources (the shipped adapter: the two Python sources).

    python benchmarks/train_distill.py --sources python-reference,python-docstrings \
        --exclude-eval-samples 3 -o kvforge/adapters/distill-smollm2

Writes the source's passages as .txt files into a temporary corpus (``--corpus-out`` keeps them) and runs
``kvforge.train.distill`` over it; ``--holdout N`` leaves out every N-th passage (for a domain's held-out
documents). Everything else is ``kvforge train distill``'s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kvforge.eval import sources as S
from kvforge.train import distill


def eval_snippets(names: list[str], samples: int, lengths=(1024, 2048)) -> list[str]:
    """The haystacks of the eval's tasks over ``names`` (kvforge eval's defaults, ``samples`` per kind and length):
    a passage that appears in one is left out of the training corpus."""
    from kvforge.eval.tasks import generate
    from kvforge.model import load_model

    tok = load_model().tokenizer
    return [t.context for t in generate(tok, lengths=lengths, samples=samples, seed=0, sources=tuple(names))]


def write_corpus(names: list[str], folder: Path, holdout: int = 0, max_passages: int = 0,
                 exclude: list[str] | None = None) -> int:
    import random

    n = 0
    for name in S.check_sources(names):
        keys = list(enumerate(S.SOURCES[name].keys()))
        if max_passages:
            keys = random.Random(f"corpus:{name}").sample(keys, min(len(keys), 3 * max_passages))
        taken = 0
        for i, key in keys:
            if holdout and i % holdout == holdout - 1 or (max_passages and taken >= max_passages):
                continue
            text = S.SOURCES[name].read(key)
            probe = " ".join(text.split()[20:40])
            if exclude and any(probe in " ".join(c.split()) for c in exclude):
                continue  # one of the eval's haystacks: never train on it
            if len(text) > 400:
                taken += 1
                safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(key).rsplit("/", 1)[-1])
                (folder / f"{name}-{i:04d}-{safe[:40]}.txt").write_text(text)
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default="python-reference,python-docstrings")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--corpus-out", default=None, help="keep the written corpus here")
    ap.add_argument("--holdout", type=int, default=0, help="leave out every N-th passage")
    ap.add_argument("--max-passages", type=int, default=0, help="at most this many passages per source (seeded)")
    ap.add_argument("--exclude-eval-samples", type=int, default=0,
                    help="leave out the passages of the eval's tasks with this many samples per kind and length")
    ap.add_argument("--steps", type=int, default=None, help="default: kvforge train distill's")
    ap.add_argument("--context", type=int, default=None, help="default: kvforge train distill's")
    ap.add_argument("--targets", type=int, default=None, help="default: kvforge train distill's")
    ap.add_argument("--keep-range", default=None, help="LO,HI; default: kvforge train distill's")
    ap.add_argument("--lr", type=float, default=None, help="default: kvforge train distill's")
    ap.add_argument("--fit", default=None, choices=["build", "match", "head"], help="default: kvforge train distill's")
    ap.add_argument("--init", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.corpus_out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        names = args.sources.split(",")
        exclude = eval_snippets(names, args.exclude_eval_samples) if args.exclude_eval_samples else None
        n = write_corpus(names, folder, args.holdout, args.max_passages, exclude)
        print(f"{n} passages in {folder}")
        names_set = ("steps", "context", "targets", "lr", "fit")
        settings = {k: getattr(args, k) for k in names_set if getattr(args, k) is not None}
        if args.keep_range:
            settings["keep_range"] = args.keep_range.split(",")  # TrainConfig turns LO,HI into numbers and checks them
        report = distill([str(folder)], args.out, init=args.init, resume=args.resume, seed=args.seed, **settings)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
