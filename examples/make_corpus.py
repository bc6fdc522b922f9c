"""Build a small real-text example corpus from Python 3.11 stdlib documentation.

Deterministic and stdlib-only: the texts come from ``pydoc_data.topics``
(the language reference topics that back ``help()``) and from docstrings of
stdlib modules. The texts are (c) the Python Software Foundation.

Usage:  python examples/make_corpus.py   # writes examples/corpus/<id>.txt
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

from pydoc_data.topics import topics

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def _doc(obj, title: str) -> str:
    """Docstring of ``obj`` under a small heading."""
    return f"{title}\n{'=' * len(title)}\n\n{inspect.getdoc(obj)}\n"


def _normalize(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # collapse 3+ blank lines to 2
    return text + "\n"


# id -> list of text parts (joined with a blank line)
DOCUMENTS = {
    # ~450 tokens
    "for-statement": lambda: [topics["for"]],
    # ~1000-1500 tokens
    "json-module": lambda: [
        _doc(json, "The json module"),
        _doc(json.loads, "json.loads(s, **kw)"),
    ],
    "re-module": lambda: [_doc(re, "The re module")],
    # ~2000-3000 tokens
    "try-statement": lambda: [topics["exceptions"], topics["try"]],
    "import-statement": lambda: [topics["import"]],
}


def build() -> dict[str, str]:
    return {doc_id: _normalize("\n\n".join(parts())) for doc_id, parts in DOCUMENTS.items()}


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        print(f"warning: corpus is defined against Python 3.11 stdlib texts; "
              f"running {sys.version.split()[0]}", file=sys.stderr)
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    for doc_id, text in build().items():
        path = CORPUS_DIR / f"{doc_id}.txt"
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(CORPUS_DIR.parent.parent)} ({len(text)} chars)")


if __name__ == "__main__":
    main()
