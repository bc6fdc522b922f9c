"""How a needle is worded and how its question asks for it, in sets: ``classic``, ``tuning``, ``heldout``.

A default that wins only on one wording is found out on another, so the needles of the
wider suite come in several phrasings, and the question paraphrases its needle rather than
repeating it. ``classic`` is the first suite's single wording (kept so that its figures
reproduce); ``tuning`` phrasings are for choosing defaults, ``heldout`` ones for reporting,
and the two never share a template or a key vocabulary.

A phrasing is (statement, question, plural question): ``{key}`` names what the needle is about,
``{value}`` is the answer, ``{keys}`` (plural) joins two keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Phrasing:
    statement: str  # "... {key} ... {value} ..."
    question: str  # asks for one value of {key}
    question_all: str  # asks for every value of {key} (several needles share the key)
    question_two: str  # asks for the values of {keys} (two keys)


CLASSIC = [Phrasing(
    "The special magic code for {key} is {value}.",
    "What is the special magic code for {key}? Answer with the code only.",
    "What are all the special magic codes for {key}? Answer with the codes only.",
    "What are the special magic codes for {keys}? Answer with the codes only.")]

TUNING = CLASSIC + [
    Phrasing("Remember: the secret number of {key} is {value}.",
             "Which secret number belongs to {key}? Reply with the number alone.",
             "List every secret number given for {key}. Reply with the numbers alone.",
             "Which secret numbers belong to {keys}? Reply with the numbers alone."),
    Phrasing("For the record, the passcode chosen by {key} was {value}.",
             "What passcode did {key} choose? Give only the passcode.",
             "Give all of the passcodes {key} chose, and nothing else.",
             "What passcodes did {keys} choose? Give only the passcodes."),
    Phrasing("The PIN for {key} is {value}.",
             "What PIN does {key} use? Answer with the PIN only.",
             "What PINs does {key} use? Answer with the PINs only.",
             "What PINs do {keys} use? Answer with the PINs only."),
]

# Held-out wordings are ones the embedded 135M model answers with the full cache (probed on held-out
# text, 3-7 of 9 each): a wording the full cache cannot answer measures nothing about compression.
HELDOUT = [
    Phrasing("The password of {key} is {value}.",
             "What is {key}'s password? Reply with the password only.",
             "What are {key}'s passwords? Reply with the passwords only.",
             "What are the passwords of {keys}? Reply with the passwords only."),
    Phrasing("{key}'s phone number is {value}.",
             "Which phone number does {key} have? Give the number only.",
             "Which phone numbers does {key} have? Give the numbers only.",
             "Which phone numbers do {keys} have? Give the numbers only."),
    Phrasing("Important: {key} has ticket number {value}.",
             "What ticket number was {key} given? Answer with the number only.",
             "What ticket numbers was {key} given? Answer with the numbers only.",
             "What ticket numbers were {keys} given? Answer with the numbers only."),
    Phrasing("According to the registry, the ID of {key} is {value}.",
             "What ID does the registry list for {key}? Only the ID.",
             "What IDs does the registry list for {key}? Only the IDs.",
             "What IDs does the registry list for {keys}? Only the IDs."),
]

SETS = {"classic": CLASSIC, "tuning": TUNING, "heldout": HELDOUT}

# what needles are about: disjoint vocabularies, so that no held-out key was ever seen while tuning
TUNING_KEYS = ("apple banana cherry walnut falcon harbor meadow lantern pepper silver copper garnet violet "
               "thunder canyon glacier orchid saffron tiger zebra koala panda otter badger raven sparrow "
               "maple cedar willow birch quartz marble velvet cotton amber cobalt crimson jasmine lotus").split()
HELDOUT_KEYS = ("Aldous Beatrix Casimir Dorothea Evander Florentyna Gideon Henrietta Ignatius Josephine Leopold "
                "Marguerite Nikolai Ottoline Percival Rosalind Sebastian Theodora Ulrich Wilhelmina Bartholomew "
                "Cordelia Desmond Evangeline Fitzgerald Gwendolyn Horatio Isadora Jasper Lucinda").split()
KEYS = {"classic": TUNING_KEYS, "tuning": TUNING_KEYS, "heldout": HELDOUT_KEYS}

# multi-hop: where a thing is, then what is there
HOPS = {
    "classic": ("{key} left the folder in room {room}.", "Room {room} holds the magic code {value}.",
                "{key} left a folder in a room. What is the magic code held in that room? Answer with the code only."),
    "tuning": ("{key} left the folder in room {room}.", "Room {room} holds the magic code {value}.",
               "{key} left a folder in a room. What is the magic code held in that room? Answer with the code only."),
    "heldout": ("The crate sent by {key} was stored in hangar {room}.",
                "Whatever sits in hangar {room} is logged under the number {value}.",
                "What number is logged for the hangar where {key}'s crate was stored? Give the number only."),
}


def check_phrasings(name: str) -> str:
    if name not in SETS:
        raise ConfigError(f"phrasings must be one of {', '.join(SETS)}, got {name!r}")
    return name
