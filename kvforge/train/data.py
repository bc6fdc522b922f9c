"""Training examples generated from the documents alone (nothing downloads).

A document is cut into windows of the training context; each example is one window and one probe:

recall   a cue quoted from the window (6-10 tokens) and the 8-16 tokens that follow it in the text
fact     a number, version or identifier the window itself states, asked for by the start of its line
needle   a fact planted at a random depth of the window (a number, a word or a code, several wordings),
         asked for in other words than it was stated

The mix is ``MIX`` unless asked otherwise. The wordings here share no template with ``kvforge eval``'s
phrasings (kvforge/eval/phrasings.py), so that the evaluation's needles stay unseen. Every example is a
function of (seed, index): a resumed run sees the same examples in the same order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import ConfigError, InputError
from .student import Example

MIX = {"recall": 0.4, "needle": 0.4, "fact": 0.2}

RECALL_QUESTIONS = [
    'Quote the words that come right after "{cue}" in the text.',
    'In the document above, what follows "{cue}"?',
    'Continue this passage exactly as the text has it: "{cue}"',
    'Which words come next in the text after "{cue}"?',
]
FACT_QUESTIONS = [
    'Which value is given on the line that begins "{lead}"? Answer with the value only.',
    'The text has a line starting "{lead}". What number or name does it state? Reply with it alone.',
]
# (statement, question): {what} is what the fact is about, {value} the answer
NEEDLES = [
    ("Archive note: the {what} is stored in cabinet {value}.", "In which cabinet is the {what} kept? Just the answer."),
    ("As agreed, the {what} was moved to room {value}.", "Where was the {what} moved to? Answer briefly."),
    ("Inventory: {value} is the label on the {what}.", "What label does the {what} carry? Answer with the label."),
    ("Do not forget that the {what} belongs to {value}.", "Who does the {what} belong to? One word."),
    ("The {what} has been filed under reference {value}.", "Under which reference was the {what} filed?"),
    ("Logged today: the {what} weighs {value} grams.", "How many grams does the {what} weigh?"),
]
_THINGS = ["green ledger", "old telescope", "spare generator", "field notebook", "brass compass", "lab sample",
           "blue folder", "signed contract", "backup drive", "winter coat", "clay vase", "test rig"]
_NAMES = ["Marlowe", "Okafor", "Lindqvist", "Tanaka", "Ferreira", "Novak", "Haddad", "Kowalski", "Abernathy"]
_FACT = re.compile(r"\b(\d+(?:[.:,]\d+)*|[A-Z][A-Z0-9_]{2,}|[a-z]+_[a-z_]+)\b")


@dataclass
class Window:
    doc: int
    text_ids: list[int]  # the window's text tokens (without the template prefix)


def make_windows(lm, texts: list[tuple[str, str]], context: int) -> tuple[list[Window], list[str]]:
    """Cut every (name, text) into windows of ``context`` document-segment tokens; (windows, too-short names)."""
    prefix = len(lm.encode_document(""))
    room = context - prefix
    if room < 64:
        raise ConfigError(f"--context {context} leaves {room} tokens after the template prefix; use at least {prefix + 64}")
    windows, short = [], []
    for d, (name, text) in enumerate(texts):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < room:
            short.append(f"{name} ({len(ids) + prefix} tokens)")
            continue
        for a in range(0, len(ids) - room + 1, room):
            windows.append(Window(d, ids[a:a + room]))
    if not windows:
        raise InputError(f"no document is as long as the training context ({context} tokens): "
                         f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}; "
                         "pass a smaller --context or longer documents")
    return windows, short


def parse_mix(text: str | dict | None) -> dict[str, float]:
    if text is None:
        return dict(MIX)
    mix = dict(text) if isinstance(text, dict) else {}
    if isinstance(text, str):
        for part in text.split(","):
            kind, eq, weight = part.partition("=")
            try:
                mix[kind.strip()] = float(weight)
            except ValueError:
                raise ConfigError(f"--mix {text!r}: write kind=weight,kind=weight (kinds {', '.join(MIX)})") from None
    unknown = set(mix) - set(MIX)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(f"--mix {text!r}: kinds are {', '.join(MIX)} with weights >= 0, not all zero")
    return mix


class ExampleMaker:
    """``maker(i)`` is example ``i``: a window and a probe drawn with ``random.Random((seed, i))``."""

    def __init__(self, lm, windows: list[Window], seed: int, mix: dict[str, float] | None = None):
        self.lm, self.windows, self.seed = lm, windows, seed
        self.mix = parse_mix(mix)
        self.prefix = lm.encode_document("")

    def __call__(self, i: int) -> Example:
        rng = random.Random(f"{self.seed}:{i}")
        window = self.windows[rng.randrange(len(self.windows))]
        kinds = [k for k, w in self.mix.items() if w > 0]
        kind = rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]
        made = getattr(self, f"_{kind}")(rng, window)
        if made is None:  # a window with no stated fact: ask for a recall instead
            kind, made = "recall", self._recall(rng, window)
        text_ids, question, answer = made
        probe_q = self.lm.encode_question(question)
        answer_ids = answer if isinstance(answer, list) else self._tok(answer)
        return Example(context=self.prefix + text_ids, probe=probe_q + answer_ids, answer_start=len(probe_q), kind=kind)

    def _tok(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids)

    def _recall(self, rng, w: Window):
        ids = w.text_ids
        cue_n, ans_n = rng.randint(6, 10), rng.randint(8, 16)
        a = rng.randrange(4, max(5, len(ids) - cue_n - ans_n))
        cue = " ".join(self._decode(ids[a:a + cue_n]).split())
        return ids, rng.choice(RECALL_QUESTIONS).format(cue=cue), ids[a + cue_n:a + cue_n + ans_n]

    def _fact(self, rng, w: Window):
        lines = [ln for ln in self._decode(w.text_ids).splitlines() if len(ln.split()) >= 4]
        found = []
        for line in lines:
            for m in _FACT.finditer(line):
                lead = " ".join(line[:m.start()].split()[-6:])
                if len(lead.split()) >= 3 and m.group(1) not in lead:
                    found.append((lead, m.group(1)))
        if not found:
            return None
        lead, value = rng.choice(found)
        return w.text_ids, rng.choice(FACT_QUESTIONS).format(lead=lead), value

    def plant_fact(self, rng, w: Window) -> list[int]:
        """The window's ids with a fact planted at a random depth, as a needle probe plants it."""
        return self._needle(rng, w)[0]

    def _needle(self, rng, w: Window):
        statement, question = rng.choice(NEEDLES)
        what = rng.choice(_THINGS)
        kind = rng.randrange(3)
        value = (str(rng.randint(100, 99999)) if kind == 0 else rng.choice(_NAMES) if kind == 1
                 else f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10, 99)}-{rng.randint(100, 999)}")
        needle = self._tok(" " + statement.format(what=what, value=value) + "\n")
        ids = w.text_ids
        at = rng.randrange(0, max(1, len(ids) - len(needle) - 16))
        text_ids = (ids[:at] + needle + ids[at:])[:len(ids)]  # the window keeps its length
        return text_ids, question.format(what=what), value
