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
    Phrasing("Remember that the secret number of {key} is {value}.",
             "Which secret number belongs to {key}? Reply with the number alone.",
             "List every secret number given for {key}. Reply with the numbers alone.",
             "Which secret numbers belong to {keys}? Reply with the numbers alone."),
    Phrasing("For the record, the passcode chosen by {key} was {value}.",
             "What passcode did {key} choose? Give only the passcode.",
             "Give all of the passcodes {key} chose, and nothing else.",
             "What passcodes did {keys} choose? Give only the passcodes."),
    Phrasing("(Aside: {key} keeps the spare key in drawer {value}.)",
             "In which drawer is the spare key that {key} keeps? Only the drawer, please.",
             "Name every drawer where {key} keeps a spare key. Only the drawers, please.",
             "In which drawers do {keys} keep their spare keys? Only the drawers, please."),
]

HELDOUT = [
    Phrasing("Note: the locker assigned to {key} opens with the combination {value}.",
             "Which combination opens the locker that belongs to {key}? Respond with just the combination.",
             "Which combinations open lockers belonging to {key}? Respond with just the combinations.",
             "Which combinations open the lockers of {keys}? Respond with just the combinations."),
    Phrasing("In the archive ledger, the entry for {key} was catalogued under reference {value}.",
             "Under what reference is {key} catalogued in the archive ledger? State the reference only.",
             "Under which references is {key} catalogued in the archive ledger? State the references only.",
             "Under what references are {keys} catalogued in the archive ledger? State the references only."),
    Phrasing("Shipments addressed to {key} are tracked with the identifier {value}.",
             "How is a shipment for {key} tracked? Write only its identifier.",
             "What identifiers track shipments for {key}? Write only the identifiers.",
             "How are shipments for {keys} tracked? Write only their identifiers."),
    Phrasing("According to the night clerk, {key} signed the register as guest {value}.",
             "As which guest did {key} sign the register? Say just that.",
             "As which guests did {key} sign the register? Say just those.",
             "As which guests did {keys} sign the register? Say just those."),
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
