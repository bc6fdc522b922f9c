"""Check that every tracked file under benchmarks/results is cited by the benchmark docs.

    python benchmarks/check_cited.py          # exit 1 and a list if anything is uncited or missing

The docs are BENCHMARKS.md and every markdown file under docs/. What "cited" means:

* A *mention* is any text `benchmarks/results/<path>` in those files: in prose, in a
  link target (`../../benchmarks/results/<path>` counts) or in a command. A mention that
  holds a glob character (`*`, `?`, `[`) cites nothing, and so does `benchmarks/results`
  on its own: every benchmark script's `--out` names that folder, which is no citation of
  everything in it.
* A mention of a file cites that file.
* A mention of a folder cites the run recorded in it. Where a reader is sent to the folder
  in prose ("Full report and plots: benchmarks/results/eval-fit/"), that is all of it,
  plots included. Where the folder is only named as a command's output (after `--out`, or
  inside a fenced code block), it cites the run's record, every file but its images
  (`.png`): the report, rows, summary and config the quoted figures come from, not plots
  nobody points a reader to.

It also fails on a mentioned file, or a folder with nothing cited in it, that git does not
track: a citation that points nowhere. Run from anywhere; it reads the repository this
script sits in.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
IMAGES = (".png", ".jpg", ".jpeg", ".svg", ".gif")
MENTION = re.compile(r"benchmarks/results/[A-Za-z0-9_.\-/=+*?\[\]]*")


def docs() -> list[Path]:
    found = [ROOT / "BENCHMARKS.md"] if (ROOT / "BENCHMARKS.md").exists() else []
    return found + sorted((ROOT / "docs").rglob("*.md"))


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges of fenced code blocks (``` ... ```, indented or not)."""
    spans, start, pos = [], None, 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            if start is None:
                start = pos
            else:
                spans.append((start, pos + len(line)))
                start = None
        pos += len(line)
    if start is not None:
        spans.append((start, len(text)))
    return spans


def mentions(text: str) -> list[tuple[str, bool]]:
    """(path, as a command's output) for every mention in one document."""
    fences = fenced_spans(text)
    out = []
    for m in MENTION.finditer(text):
        path = m.group(0).rstrip(".,;:").rstrip("/")
        if any(c in path for c in "*?[]") or path == RESULTS:
            continue
        in_fence = any(a <= m.start() < b for a, b in fences)
        after_out = re.search(r"--out(?:=|\s)\s*$", text[max(0, m.start() - 12):m.start()]) is not None
        out.append((path, in_fence or after_out))
    return out


def tracked() -> list[str]:
    ls = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", RESULTS],
                        check=True, capture_output=True, text=True)
    return [line for line in ls.stdout.splitlines() if line]


def check() -> tuple[list[str], list[str]]:
    files = tracked()
    fileset = set(files)
    cited: set[str] = set()
    broken: list[str] = []
    for doc in docs():
        where = doc.relative_to(ROOT)
        for path, as_output in mentions(doc.read_text(encoding="utf-8")):
            if path in fileset:
                cited.add(path)
                continue
            inside = [f for f in files if f.startswith(path + "/")]
            chosen = [f for f in inside if not (as_output and f.lower().endswith(IMAGES))]
            if not chosen:
                broken.append(f"{where}: {path}")
            cited.update(chosen)
    uncited = [f for f in files if f not in cited]
    return uncited, sorted(set(broken))


def main() -> int:
    uncited, broken = check()
    for f in uncited:
        print(f"uncited: {f}")
    for b in broken:
        print(f"cites what git does not track: {b}")
    n = len(tracked())
    print(f"{n} tracked files under {RESULTS}, {n - len(uncited)} cited, {len(uncited)} not; "
          f"{len(broken)} broken citations", file=sys.stderr)
    return 1 if uncited or broken else 0


if __name__ == "__main__":
    sys.exit(main())
