"""Check examples/questions.json against examples/corpus/*.txt.

Every answer must be short (1-5 words) and occur literally (case-insensitive)
in its document; every document must have at least one question.

Usage:  python examples/check_questions.py   (run make_corpus.py first)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def check() -> list[str]:
    questions = json.loads((HERE / "questions.json").read_text(encoding="utf-8"))
    docs = {p.stem: p.read_text(encoding="utf-8") for p in sorted((HERE / "corpus").glob("*.txt"))}
    errors = []
    for i, q in enumerate(questions):
        doc, question, answer = q["doc"], q["question"].strip(), q["answer"].strip()
        if doc not in docs:
            errors.append(f"#{i}: unknown doc {doc!r}")
            continue
        if not question or not answer:
            errors.append(f"#{i}: empty question or answer")
        if not 1 <= len(answer.split()) <= 5:
            errors.append(f"#{i}: answer {answer!r} is not 1-5 words")
        if answer.lower() not in docs[doc].lower():
            errors.append(f"#{i}: answer {answer!r} not found in {doc}.txt")
    counts = Counter(q["doc"] for q in questions)
    for doc in docs:
        if counts[doc] == 0:
            errors.append(f"document {doc!r} has no questions")
    print(f"{len(questions)} questions over {len(docs)} documents: "
          + ", ".join(f"{d}={counts[d]}" for d in docs))
    return errors


def main() -> int:
    errors = check()
    for e in errors:
        print("FAIL", e)
    if not errors:
        print("OK: every answer is a substring of its document")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
