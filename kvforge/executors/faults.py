"""A test-only fault hook: make a worker pause on, fail, or crash on named documents.

Set in the driver's environment, read once by :func:`kvforge.executors.make_executor` and
handed to every worker (so that it reaches Ray actors on any node); several faults are
separated by ``;``::

    KVFORGE_TEST_FAULT=pause:<doc-id>:<folder>   the first attempt at <doc-id> writes the worker's pid
                                                 to <folder>/<doc-id>.pid, then sleeps (at most 10 min)
                                                 before building: a test kills that pid mid-document
    KVFORGE_TEST_FAULT=fail:<doc-id>:<folder>    every attempt at <doc-id> raises InputError, as a
                                                 document its method refuses would
    KVFORGE_TEST_FAULT=crash:<doc-id>:<folder>   every attempt at <doc-id> kills its worker (SIGKILL), as
                                                 a document too large for a worker's memory would

Every attempt at <doc-id> first appends the worker's pid to ``<folder>/<doc-id>.attempts``, so a
test can count retries. It exists for tests/test_ray.py; never set it in a real build.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError

ENV = "KVFORGE_TEST_FAULT"
ACTIONS = ("pause", "fail", "crash")
PAUSE_SECONDS = 600


@dataclass(frozen=True)
class Fault:
    """What to do to which documents: ``(action, doc_id, folder)`` triples."""

    rules: tuple[tuple[str, str, str], ...]

    @staticmethod
    def from_env() -> "Fault | None":
        spec = os.environ.get(ENV, "")
        if not spec:
            return None
        rules = []
        for item in filter(None, spec.split(";")):
            parts = tuple(item.split(":", 2))
            if len(parts) != 3 or parts[0] not in ACTIONS or not parts[1] or not parts[2]:
                raise ConfigError(f"{ENV}={spec!r}: expected <action>:<doc-id>:<folder>, action one of "
                                  f"{', '.join(ACTIONS)} (a test-only hook; unset it for real builds)")
            rules.append(parts)
        return Fault(tuple(rules)) if rules else None

    def before(self, document) -> None:
        """Called by the worker before it builds ``document``."""
        for action, doc_id, folder in self.rules:
            if document.id == doc_id:
                _apply(action, document, Path(folder))


def _apply(action: str, document, folder: Path) -> None:
    attempts = folder / f"{document.id}.attempts"
    first = not attempts.exists()
    with open(attempts, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "fail":
        raise InputError(f"{document.path or document.id}: refused by the test fault hook ({ENV})")
    if action == "pause" and first:
        tmp = folder / f".{document.id}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, folder / f"{document.id}.pid")
        time.sleep(PAUSE_SECONDS)
