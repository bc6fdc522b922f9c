"""The Ray executor: an actor pool that loads the model once per worker and builds documents.

Each worker is a Ray actor holding ``threads_per_worker`` CPUs: it loads the model once
(:func:`kvforge.model.load_model`, from the same spec as the driver: the embedded default or a
directory at the same path on every node), sets torch's threads to its CPUs, and refuses to
build when its weights' fingerprint differs from the driver's. Documents go out with their
token ids; each comes back as (manifest, compressed cache), and the driver writes it through
its sink: workers never touch the library, so it needs to be on the driver's filesystem only.

Failures:

- a worker that dies (killed, out of memory, its node lost) is restarted by Ray, which re-runs
  the documents it held, each at most :data:`MAX_RETRIES` times; past that the document is
  reported as a :class:`~kvforge.errors.WorkerLostError` (``--skip-bad`` skips it);
- a document's own :class:`~kvforge.errors.KvforgeError` is never retried;
- a worker that cannot load the model, or loads another one, stops the build.

Without an address, a local Ray runtime is started with ``workers x threads_per_worker`` CPUs
and stopped at the end; with one (``auto`` or ``HOST:PORT``), the build connects to that
cluster. A runtime already initialised in this process (``ray.init`` by the caller) is used as
it is. No dashboard, no usage statistics: nothing reaches beyond the cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ConfigError, IncompatibleModelError, KvforgeError, ModelNotFoundError, WorkerLostError
from . import Outcome, build_one
from .faults import Fault

INSTALL_HINT = "pip install 'kvforge[ray]'"
MAX_RETRIES = 3  # re-runs of a document after its worker died; a document's own errors are never retried
# One document at a time per worker: when a worker dies, the one document it held is the one it died on, so
# each document's retries count its own deaths. (With a queue of two, the document waiting behind a poison
# one died with it every time and was reported lost too.) The cost: a worker idles while its result travels
# and the next document arrives, milliseconds against seconds of prefill.
QUEUE_PER_WORKER = 1
START_TIMEOUT_S = 600  # a worker that has not loaded its model by then (no free CPUs?) stops the build


def import_ray():
    """The ``ray`` module, with usage statistics off; a ConfigError that says how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


class Worker:
    """One Ray actor (wrapped with ``ray.remote`` by :class:`RayExecutor`): a model, loaded once."""

    def __init__(self, model_spec: str, weights_sha256: str, threads: int, fault: Fault | None):
        import torch

        from ..model import load_model

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; torch is told explicitly
        self.fault, self.error, self.lm = fault, None, None
        try:
            self.lm = load_model(model_spec)
        except KvforgeError as exc:
            self.error = ModelNotFoundError(f"a Ray worker on {_node()} cannot load the model: {exc}")
            return
        found = self.lm.info.weights_sha256
        if found != weights_sha256:
            self.error = IncompatibleModelError(
                f"a Ray worker on {_node()} loaded model {model_spec!r} with weights_sha256 {found[:16]}..., "
                f"the driver {weights_sha256[:16]}...: every node needs the same model files at the same path")

    def ready(self) -> dict:
        if self.error is not None:
            raise self.error
        import torch

        return {"pid": os.getpid(), "node": _node(), "threads": torch.get_num_threads()}

    def build(self, document, config, input_ids) -> Outcome:
        if self.error is not None:
            raise self.error
        return build_one(self.lm, document, config, input_ids, self.fault)


def _node() -> str:
    import socket

    return socket.gethostname()


@dataclass
class RayExecutor:
    """An actor pool of ``workers`` x ``threads_per_worker`` CPUs; see the module docstring."""

    address: str | None = None  # None: a local runtime (or the one this process has already)
    workers: int | None = None  # None: as many as the runtime's CPUs hold
    threads_per_worker: int = 1
    fault: Fault | None = None
    max_retries: int = MAX_RETRIES
    workers_info: list[dict] = field(default_factory=list)  # pid, node, threads of each worker, once started
    start_seconds: dict = field(default_factory=dict)  # runtime: ray.init; workers: until every model is loaded
    _ray: object = field(default=None, repr=False)
    _started: bool = field(default=False, repr=False)
    _actors: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._ray = import_ray()  # refuse early, before the driver loads a model

    def __enter__(self) -> "RayExecutor":
        return self  # the runtime starts in map(), on the first document: a current library needs none

    def __exit__(self, *exc) -> None:
        self._kill_pool()  # map() kills its pool when it ends; this covers a map left half-read
        if self._started:
            self._ray.shutdown()
            self._started = False

    def describe(self) -> dict:
        return {"name": "ray", "address": self.address, "workers": self.workers,
                "threads_per_worker": self.threads_per_worker, "start_seconds": self.start_seconds,
                "workers_info": self.workers_info}

    def _connect(self) -> None:
        """Join (or start) the Ray runtime and settle the number of workers against its CPUs."""
        ray, threads = self._ray, self.threads_per_worker
        t0 = time.perf_counter()
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if not ray.is_initialized():
            if self.address is not None:
                ray.init(address=self.address, **quiet)
            else:
                cpus = (self.workers or max(1, (os.cpu_count() or 1) // threads)) * threads
                ray.init(num_cpus=cpus, **quiet)
            self._started = True
        self.start_seconds["runtime"] = round(time.perf_counter() - t0, 3)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if self.workers is None:
            self.workers = max(1, cpus // threads)
        if self.workers * threads > cpus:
            raise ConfigError(f"--workers {self.workers} x --threads-per-worker {threads} needs "
                              f"{self.workers * threads} CPUs; the Ray runtime has {cpus}: ask for fewer")

    def _pool(self, lm) -> list:
        ray = self._ray
        from ray.exceptions import GetTimeoutError

        actor = ray.remote(Worker).options(num_cpus=self.threads_per_worker, max_restarts=-1,
                                           max_task_retries=self.max_retries)
        pool = [actor.remote(lm.info.source, lm.info.weights_sha256, self.threads_per_worker, self.fault)
                for _ in range(self.workers)]
        self._actors = pool
        t0 = time.perf_counter()
        try:
            self.workers_info = ray.get([w.ready.remote() for w in pool], timeout=START_TIMEOUT_S)
            self.start_seconds["workers"] = round(time.perf_counter() - t0, 3)
        except BaseException as exc:
            self._kill_pool()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, KvforgeError):
                raise cause from None
            if isinstance(exc, GetTimeoutError):
                raise KvforgeError(f"the Ray workers did not start within {START_TIMEOUT_S} s: are "
                                   f"{self.workers * self.threads_per_worker} CPUs free in the cluster?") from None
            raise
        return pool

    def map(self, lm, documents, config, encoded: dict[str, list[int]]) -> Iterator[Outcome]:
        """Outcomes in completion order; a worker holds at most :data:`QUEUE_PER_WORKER` documents."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        if not documents:
            return
        self._connect()
        pool = self._pool(lm)
        queue, pending = deque(documents), {}

        def submit(slot: int) -> None:
            document = queue.popleft()
            pending[pool[slot].build.remote(document, config, encoded[document.id])] = (document, slot)

        for _ in range(QUEUE_PER_WORKER):
            for slot in range(len(pool)):
                if queue:
                    submit(slot)
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                document, slot = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except RayTaskError as exc:  # a KvforgeError here is the worker's (its model); else a bug
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, KvforgeError):
                        raise cause from None
                    raise
                except RayActorError:
                    tries = self.max_retries + 1
                    outcome = Outcome(document, error=WorkerLostError(
                        f"{document.path or document.id}: its Ray worker died {tries} time{'s' * (tries > 1)} while "
                        "building it (killed, out of memory, or its node lost); it was not retried further"))
                if queue:
                    submit(slot)
                yield outcome
        finally:
            self._kill_pool()

    def _kill_pool(self) -> None:
        for w in self._actors:
            self._ray.kill(w)
        self._actors = []
