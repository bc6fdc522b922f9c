"""RULER-style tasks generated over real text that ships with Python or Debian (no download).

The haystack is real text of one source (:mod:`kvforge.eval.sources`: Python's language
reference by default, cut to a token length); needles are short statements inserted at
sentence boundaries at seeded depths, worded by one phrasing of a set
(:mod:`kvforge.eval.phrasings`). The question is asked after the document, so a
query-agnostic build never sees it. Every task is a plain dataclass; the same seed gives
the same tasks. ``source="python-reference", phrasings="classic"`` (the defaults) is the
first suite, task for task.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import asdict, dataclass, field

from . import phrasings as _phrasings
from .sources import CONTINUATION_TOKENS, SOURCES, haystack  # noqa: F401 (CONTINUATION_TOKENS re-exported)

# every kind make_task knows; an eval runs all of them unless told otherwise
KINDS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "niah_multihop", "variable_tracking", "frequent_words")


@dataclass
class Task:
    """One generated sample: a document, a question about it and the expected answers."""

    id: str
    kind: str
    target_length: int  # the document length in tokens the task was generated for (the actual one is near it)
    context: str
    question: str
    answers: list[str]
    depths: list[float] = field(default_factory=list)
    continuation: str = ""  # real text that follows the document, for continuation KL
    source: str = "python-reference"  # the haystack's text (kvforge.eval.sources)
    phrasings: str = "classic"  # the needles' wording set (kvforge.eval.phrasings)

    @property
    def split(self) -> str:
        """The text's split when the wording is held out exactly when the text is (``heldout`` needs both held
        out; ``validation`` text in held-out wording is neither); else ``tuning``."""
        split = SOURCES[self.source].split
        return split if (self.phrasings == "heldout") == (split == "heldout") else "tuning"

    def score(self, prediction: str) -> float:
        """Fraction of expected answers found in the prediction (case-insensitive)."""
        p = prediction.lower()
        return sum(a.lower() in p for a in self.answers) / len(self.answers)

    def to_dict(self) -> dict:
        return asdict(self)


def insert(text: str, needles: list[str], depths: list[float]) -> str:
    """Insert each needle after the sentence end nearest to its relative depth."""
    spots = []
    for depth in depths:
        pos = int(len(text) * depth)
        j = text.find(". ", pos)
        spots.append(len(text) if j < 0 else j + 2)
    out, last = [], 0
    for spot, needle in sorted(zip(spots, needles)):
        out += [text[last:spot], needle + " "]
        last = spot
    out.append(text[last:])
    return "".join(out)


def _number(rng) -> str:
    return str(rng.randrange(1_000_000, 9_999_999))


def _uuid(rng) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(8)) + "-" + \
        "".join(rng.choice("0123456789abcdef") for _ in range(4))


def make_task(kind: str, tokenizer, n_tokens: int, seed: int, index: int, source: str = "python-reference",
              phrasings: str = "classic") -> Task:
    """Task ``index`` of ``kind`` at about ``n_tokens`` tokens over ``source``, worded from ``phrasings``."""
    name = f"{kind}-{n_tokens}-{seed}-{index}"
    legacy = source == "python-reference" and phrasings == "classic"
    tid = name if legacy else f"{source}/{phrasings}/{name}"
    rng = random.Random(f"{kind}/{n_tokens}/{seed}/{index}" if legacy else tid)
    pick = random.Random(f"wording/{tid}")  # a separate stream: the classic tasks draw exactly as before
    vocab = _phrasings.KEYS[phrasings]
    keys = rng.sample(vocab, 6)
    if kind == "frequent_words":
        vocab = rng.sample(vocab, 12)
        weights = [1.0 / (r + 1) ** 1.2 for r in range(len(vocab))]
        n_words = max(20, int(n_tokens * 0.95))  # about one token per word
        words = rng.choices(vocab, weights=weights, k=n_words + 40)
        words, more = words[:n_words], words[n_words:]
        counts = {w: words.count(w) for w in vocab}
        top = sorted(vocab, key=lambda w: -counts[w])[:3]
        context = "Here is a list of words: " + " ".join(words) + "."
        return Task(tid, kind, n_tokens, context, "What are the three most frequently used words in the list "
                    "above? Answer with the three words only.", top, continuation=" ".join(more), source=source,
                    phrasings=phrasings)
    hay, cont = haystack(tokenizer, n_tokens - 60, rng, source)
    wording = pick.choice(_phrasings.SETS[phrasings])
    context, question, answers, depths = _needles(kind, hay, keys, vocab, wording, phrasings, rng)
    return Task(tid, kind, n_tokens, context, question, answers, depths, cont, source=source, phrasings=phrasings)


def _needles(kind: str, hay: str, keys: list[str], vocab: list[str], wording: "_phrasings.Phrasing",
             phrasings: str, rng: random.Random) -> tuple[str, str, list[str], list[float]]:
    """(context, question, answers, depths) of a needle-in-a-haystack kind over ``hay``."""
    def needle(key, value):
        return wording.statement.format(key=key, value=value)

    if kind in ("niah_number", "niah_word", "niah_uuid"):
        value = {"niah_number": _number, "niah_uuid": _uuid}.get(kind, lambda r: r.choice(
            [w for w in vocab if w not in keys]))(rng)
        depth = rng.uniform(0.05, 0.95)
        return insert(hay, [needle(keys[0], value)], [depth]), wording.question.format(key=keys[0]), [value], [depth]
    if kind == "niah_multikey":
        values = [_number(rng) for _ in range(4)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(4)]
        return (insert(hay, [needle(k, v) for k, v in zip(keys, values)], depths),
                wording.question.format(key=keys[2]), [values[2]], [depths[2]])
    if kind == "niah_multivalue":
        values = [_number(rng) for _ in range(3)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(3)]
        return (insert(hay, [needle(keys[0], v) for v in values], depths),
                wording.question_all.format(key=keys[0]), values, depths)
    if kind == "niah_multiquery":
        values = [_number(rng) for _ in range(2)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(2)]
        return (insert(hay, [needle(k, v) for k, v in zip(keys, values)], depths),
                wording.question_two.format(keys=f"{keys[0]} and {keys[1]}"), values, depths)
    if kind == "niah_multihop":  # two needles, the second found only through the first
        where, what, ask = _phrasings.HOPS[phrasings]
        room, value = str(rng.randrange(100, 999)), _number(rng)
        depths = [rng.uniform(0.05, 0.95) for _ in range(2)]
        return (insert(hay, [where.format(key=keys[0], room=room), what.format(room=room, value=value)], depths),
                ask.format(key=keys[0]), [value], depths)
    if kind == "variable_tracking":
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(4)) for _ in range(3)]
        value = str(rng.randrange(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in (1, 2)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
        return (insert(hay, chain, depths),
                f"Which variables are assigned the value {value}, directly or through other variables? "
                "Answer with the variable names only.", names, depths)
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")


def generate(tokenizer, kinds=KINDS, lengths=(1024, 2048), samples: int = 2, seed: int = 0,
             sources=("python-reference",), phrasings: str | None = None) -> list[Task]:
    """``samples`` tasks of every kind at every length over every source, seeded.

    phrasings: the wording set; None gives ``classic`` on python-reference alone (the first suite) and
    otherwise each source's own (``heldout`` wordings on held-out text, ``tuning`` on the rest).
    """
    legacy = list(sources) == ["python-reference"]
    out = []
    for source in sources:
        wording = phrasings or ("classic" if legacy else SOURCES[source].wording)
        out += [make_task(kind, tokenizer, n, seed, i, source, wording)
                for n in lengths for kind in kinds for i in range(samples)]
    return out
