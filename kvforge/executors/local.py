"""The local executor: the documents one after the other, in this process (the default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from . import Outcome, build_one
from .faults import Fault


@dataclass
class LocalExecutor:
    """One worker: this process. ``threads_per_worker`` sets torch's threads for the build (restored after)."""

    threads_per_worker: int | None = None
    fault: Fault | None = None
    _saved_threads: int | None = field(default=None, repr=False)

    def __enter__(self) -> "LocalExecutor":
        if self.threads_per_worker is not None:
            import torch

            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads_per_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def describe(self) -> dict:
        return {"name": "local", "workers": 1, "threads_per_worker": self.threads_per_worker}

    def map(self, lm, documents, config, encoded: dict[str, list[int]]) -> Iterator[Outcome]:
        """Build each document in order; the caller writes each before the next one starts."""
        for document in documents:
            yield build_one(lm, document, config, encoded[document.id], self.fault)
