"""Fuzz the artifact and library readers with 10,000 mutated golden files (the run BENCHMARKS.md quotes).

    .venv/bin/python benchmarks/fuzz.py --n 10000 --seed 0 [--out DIR]
    .venv/bin/python benchmarks/fuzz.py --seed 0 --index 1234      # replay one input, with its traceback

The fuzzer itself (mutators, the per-input checks, the memory budget) is
``tests/fuzzing.py``, next to the tests that run a seeded subset of it; this is its
command line. Exit status 1 when any input was UNEXPECTED (not a loaded artifact or
a ``KvforgeError``, a hang, or memory beyond its budget).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fuzzing  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of mutated inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first input")
    parser.add_argument("--index", type=int, help="replay this one input: print it and every reader's traceback")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--trace", action="store_true",
                        help="also bound Python / numpy allocations with tracemalloc (about 5x slower)")
    parser.add_argument("--out", type=Path, help="write fuzz.json and the unexpected inputs here")
    args = parser.parse_args(argv)
    import torch

    # the inputs are tiny: a contended intra-op thread pool would dominate the time, not the readers
    torch.set_num_threads(1)
    if args.index is not None:
        return fuzzing.replay(args.seed, args.index, args.out, args.timeout)
    summary = fuzzing.run(args.n, args.seed, start=args.start, timeout=args.timeout, trace=args.trace, 
                           out=args.out, progress=True)
    print(fuzzing.render(summary))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fuzz.json").write_text(json.dumps(summary, indent=2))
    return 1 if summary["outcomes"]["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
