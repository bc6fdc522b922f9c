"""RULER-style tasks generated over real text that ships with Python (no download).

The haystack is Python's language reference (``pydoc_data.topics``), cut to a
token length; needles are short statements inserted at sentence boundaries at
seeded depths. The question is asked after the document, so a query-agnostic
build never sees it. Every task is a plain dataclass; the same seed gives the
same tasks.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import asdict, dataclass, field

# every kind make_task knows; an eval runs all of them unless told otherwise
KINDS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "frequent_words")

_WORDS = ("apple banana cherry walnut falcon harbor meadow lantern pepper silver copper garnet violet "
          "thunder canyon glacier orchid saffron tiger zebra koala panda otter badger raven sparrow "
          "maple cedar willow birch quartz marble velvet cotton amber cobalt crimson jasmine lotus").split()


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

    def score(self, prediction: str) -> float:
        """Fraction of expected answers found in the prediction (case-insensitive)."""
        p = prediction.lower()
        return sum(a.lower() in p for a in self.answers) / len(self.answers)

    def to_dict(self) -> dict:
        return asdict(self)


CONTINUATION_TOKENS = 64


def haystack(tokenizer, n_tokens: int, rng: random.Random) -> tuple[str, str]:
    """About ``n_tokens`` tokens of contiguous language-reference text from a seeded starting topic,
    and the text that follows it (``CONTINUATION_TOKENS`` tokens)."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    start = rng.randrange(len(keys))
    parts, total = [], 0
    i = start
    while total < (n_tokens + CONTINUATION_TOKENS) * 1.3:
        text = re.sub(r"\n{3,}", "\n\n", topics.topics[keys[i % len(keys)]]).strip()
        parts.append(text)
        total += len(text) // 3
        i += 1
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][: n_tokens + CONTINUATION_TOKENS]
    full = tokenizer.decode(ids)
    text = tokenizer.decode(ids[:n_tokens])
    cut = text.rfind(". ")
    cut = cut + 1 if cut > len(text) // 2 else len(text)
    return full[:cut], full[cut:].lstrip()


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


def _needle(key: str, value: str) -> str:
    return f"The special magic code for {key} is {value}."


def _ask(key: str) -> str:
    return f"What is the special magic code for {key}? Answer with the code only."


def make_task(kind: str, tokenizer, n_tokens: int, seed: int, index: int) -> Task:
    rng = random.Random(f"{kind}/{n_tokens}/{seed}/{index}")
    tid = f"{kind}-{n_tokens}-{seed}-{index}"
    keys = rng.sample(_WORDS, 6)
    if kind == "frequent_words":
        vocab = rng.sample(_WORDS, 12)
        weights = [1.0 / (r + 1) ** 1.2 for r in range(len(vocab))]
        n_words = max(20, int(n_tokens * 0.95))  # about one token per word
        words = rng.choices(vocab, weights=weights, k=n_words + 40)
        words, more = words[:n_words], words[n_words:]
        counts = {w: words.count(w) for w in vocab}
        top = sorted(vocab, key=lambda w: -counts[w])[:3]
        context = "Here is a list of words: " + " ".join(words) + "."
        return Task(tid, kind, n_tokens, context, "What are the three most frequently used words in the list "
                    "above? Answer with the three words only.", top, continuation=" ".join(more))
    hay, cont = haystack(tokenizer, n_tokens - 60, rng)
    context, question, answers, depths = _needles(kind, hay, keys, rng)
    return Task(tid, kind, n_tokens, context, question, answers, depths, cont)


def _needles(kind: str, hay: str, keys: list[str], rng: random.Random) -> tuple[str, str, list[str], list[float]]:
    """(context, question, answers, depths) of a needle-in-a-haystack kind over ``hay``."""
    if kind in ("niah_number", "niah_word", "niah_uuid"):
        value = {"niah_number": _number, "niah_uuid": _uuid}.get(kind, lambda r: r.choice(
            [w for w in _WORDS if w not in keys]))(rng)
        depth = rng.uniform(0.05, 0.95)
        return insert(hay, [_needle(keys[0], value)], [depth]), _ask(keys[0]), [value], [depth]
    if kind == "niah_multikey":
        values = [_number(rng) for _ in range(4)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(4)]
        return (insert(hay, [_needle(k, v) for k, v in zip(keys, values)], depths),
                _ask(keys[2]), [values[2]], [depths[2]])
    if kind == "niah_multivalue":
        values = [_number(rng) for _ in range(3)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(3)]
        return (insert(hay, [_needle(keys[0], v) for v in values], depths),
                f"What are all the special magic codes for {keys[0]}? Answer with the codes only.",
                values, depths)
    if kind == "niah_multiquery":
        values = [_number(rng) for _ in range(2)]
        depths = [rng.uniform(0.05, 0.95) for _ in range(2)]
        return (insert(hay, [_needle(k, v) for k, v in zip(keys, values)], depths),
                f"What are the special magic codes for {keys[0]} and {keys[1]}? Answer with the codes only.",
                values, depths)
    if kind == "variable_tracking":
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(4)) for _ in range(3)]
        value = str(rng.randrange(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in (1, 2)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
        return (insert(hay, chain, depths),
                f"Which variables are assigned the value {value}, directly or through other variables? "
                "Answer with the variable names only.", names, depths)
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")


def generate(tokenizer, kinds=KINDS, lengths=(1024, 2048), samples: int = 2, seed: int = 0) -> list[Task]:
    """``samples`` tasks of every kind at every length, seeded."""
    return [make_task(kind, tokenizer, n, seed, i) for n in lengths for kind in kinds for i in range(samples)]
