"""Write Perl's own documentation (the POD inside Debian's perl modules) as plain-text files, for training.

A second kind of technical prose beside Python's docs, for a CAT model trained on more than one library's
documentation (docs/experiments/cat.md, "A wider training corpus"). It is none of the eval's sources: the
held-out split reads licenses, changelogs and section-1 man pages; the tuning split Python's docs. A file that
shares any 12-word run (probed every 150 words) with a held-out passage on this machine is left out: some man
pages are made from the same POD.

    python benchmarks/perl_pod_corpus.py OUT_DIR [--max-files N] [--min-chars C]

POD markup is undone as a reader would see it: ``=head1 NAME`` keeps its text, ``=over`` / ``=back`` / ``=cut``
go, ``B<..>``, ``C<..>``, ``I<..>``, ``L<..>``, ``F<..>`` keep their text, ``E<gt>`` and friends become characters.
Files are taken in a seeded order, so ``--max-files`` picks the same files each time.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from kvforge.eval import sources as S

ROOTS = ("/usr/share/perl", "/usr/share/perl5")
_ESCAPES = {"gt": ">", "lt": "<", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}
_CODE = re.compile(r"[BCIFSXZ]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)
_LINK = re.compile(r"L<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)
_ESCAPE = re.compile(r"E<([^<>]+)>")


def pod_text(source: str) -> str:
    """The POD paragraphs of a Perl file as plain text ('' when it has none)."""
    out, inside = [], source.lstrip().startswith("=")
    for line in source.splitlines():
        if line.startswith("="):
            command, _, rest = line[1:].partition(" ")
            inside = command != "cut"
            if command.startswith("head") or command == "item":
                out.append("\n" + rest.strip().lstrip("*").strip())
            continue
        if inside:
            out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested markup, inside out
        text = _LINK.sub(lambda m: (m.group(1) or m.group(2) or "").split("|")[0], text)
        text = _CODE.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), ""), text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--max-files", type=int, default=0, help="at most this many files (0: all)")
    ap.add_argument("--min-chars", type=int, default=6000, help="skip files with less POD text than this")
    args = ap.parse_args()
    paths = sorted({p for root in ROOTS if Path(root).is_dir()
                    for p in Path(root).rglob("*") if p.suffix in (".pm", ".pod") and p.is_file()})
    random.Random("perl-pod").shuffle(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = S.flat_text(S.of_split("heldout"))
    n = chars = left = 0
    for path in paths:
        text = pod_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) < args.min_chars:
            continue
        if S.shares_run(text[:40_000], heldout, start=50):
            left += 1
            continue
        name = "perl-pod-" + "_".join(path.with_suffix("").parts[-3:])
        (out / f"{name[:80]}.txt").write_text(text[:40_000])  # the eval's cap on one passage
        n, chars = n + 1, chars + min(len(text), 40_000)
        if args.max_files and n >= args.max_files:
            break
    print(f"{n} files, {chars:,} characters -> {out} ({left} left out: they share text with held-out passages)")


if __name__ == "__main__":
    main()
