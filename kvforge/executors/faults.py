"""A test-only fault hook: make a worker pause on, or fail, one named document.

Set in the driver's environment, read once by :func:`kvforge.executors.make_executor` and
handed to every worker (so that it reaches Ray actors on any node)::

    KVFORGE_TEST_FAULT=pause:<doc-id>:<folder>   the first attempt at <doc-id> writes the worker's pid
                                                 to <folder>/<doc-id>.pid, then sleeps (at most 10 min)
                                                 before building: a test kills that pid mid-document
    KVFORGE_TEST_FAULT=fail:<doc-id>:<folder>    every attempt at <doc-id> raises InputError, as a
                                                 document its method refuses would

Every attempt at <doc-id> first appends the worker's pid to ``<folder>/<doc-id>.attempts``, so a
test can count retries. It exists for tests/test_ray.py; never set it in a real build.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError

ENV = "KVFORGE_TEST_FAULT"
ACTIONS = ("pause", "fail")
PAUSE_SECONDS = 600


@dataclass(frozen=True)
class Fault:
    action: str  # one of ACTIONS
    doc_id: str
    folder: str

    @staticmethod
    def from_env() -> "Fault | None":
        spec = os.environ.get(ENV, "")
        if not spec:
            return None
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[0] not in ACTIONS or not parts[1] or not parts[2]:
            raise ConfigError(f"{ENV}={spec!r}: expected pause:<doc-id>:<folder> or fail:<doc-id>:<folder> "
                              "(a test-only hook; unset it for real builds)")
        return Fault(*parts)

    def before(self, document) -> None:
        """Called by the worker before it builds ``document``."""
        if document.id != self.doc_id:
            return
        folder = Path(self.folder)
        attempts = folder / f"{document.id}.attempts"
        first = not attempts.exists()
        with open(attempts, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if self.action == "fail":
            raise InputError(f"{document.path or document.id}: refused by the test fault hook ({ENV})")
        if first:
            tmp = folder / f".{document.id}.pid.tmp"
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, folder / f"{document.id}.pid")
            time.sleep(PAUSE_SECONDS)
