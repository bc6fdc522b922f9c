"""Executors: who maps :func:`kvforge.builder.build_document` over a corpus.

An executor is a context manager with one verb::

    with make_executor("ray", workers=2, threads_per_worker=1) as ex:
        for outcome in ex.map(lm, documents, config, encoded):   # one Outcome per document, any order
            ...

``local`` (:mod:`.local`) is the sequential loop in this process; ``ray`` (:mod:`.ray`) is
an actor pool on a local or remote Ray runtime. Both run :func:`build_one`, so they build the
same bytes. The driver, :func:`kvforge.builder.build`, keeps everything else: the resume check
before any work, the progress bars, the per-document atomic writes through its sink and the
library manifest; an executor never writes into the library.

A document's :class:`~kvforge.errors.KvforgeError` (too long, refused by its method) comes back
as an :class:`Outcome` with ``error`` set, naming the document's path, and is never retried;
anything else (a bug) propagates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..corpus import Document
from ..errors import KvforgeError
from ..options import check_executor
from ..ragged import CompressedKV
from .faults import Fault


@dataclass
class Outcome:
    """One document's result: its manifest and compressed cache, or the error that refused it."""

    document: Document
    manifest: dict | None = None
    compressed: CompressedKV | None = None
    seconds: float = 0.0  # wall time of build_document on its worker
    error: KvforgeError | None = None


def build_one(lm, document: Document, config, input_ids: list[int], fault: Fault | None = None) -> Outcome:
    """Build one document on whichever worker runs this: the one code path of every executor."""
    from ..builder import build_document  # the builder imports this package lazily too: no import cycle

    t0 = time.perf_counter()
    try:
        if fault is not None:
            fault.before(document)
        manifest, compressed = build_document(lm, document, config, input_ids)
    except KvforgeError as exc:
        return Outcome(document, error=document_error(document, exc))
    return Outcome(document, manifest, compressed, round(time.perf_counter() - t0, 3))


def document_error(document: Document, exc: KvforgeError) -> KvforgeError:
    """``exc``, its message prefixed with the document's path unless it names it already."""
    where = document.path or document.id
    if where in str(exc):
        return exc
    new = type(exc)(f"{where}: {exc}")
    new.__cause__ = exc
    return new


def make_executor(executor: str = "local", *, workers: int | None = None, threads_per_worker: int | None = None,
                  ray_address: str | None = None):
    """The executor named ``executor`` (one of :data:`kvforge.options.EXECUTORS`), checked, not yet started.

    ``ray`` without Ray installed is a :class:`~kvforge.errors.ConfigError` here, before any model loads.
    """
    executor, workers, threads_per_worker, ray_address = check_executor(executor, workers, threads_per_worker,
                                                                        ray_address)
    fault = Fault.from_env()
    if executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(address=ray_address, workers=workers, threads_per_worker=threads_per_worker or 1,
                           fault=fault)
    from .local import LocalExecutor

    return LocalExecutor(threads_per_worker=threads_per_worker, fault=fault)


__all__ = ["Outcome", "build_one", "document_error", "make_executor"]
