"""The decode engine: one worker thread runs every request's generation, off the event loop.

Requests arrive as :class:`Job` s. Between decode steps the thread starts the new ones (feeds
their questions: time to first token) and then feeds the next token of every running sequence,
in one batched forward pass when ``batch`` (:meth:`kvforge.decoder.Decoder.step`), so that N
concurrent answers cost about one answer's weight reads per step instead of N. Each sequence
runs over its own fork of its document's cache, so its tokens are the ones it gets alone.

Events go back to the job's asyncio queue through ``loop.call_soon_threadsafe``; a job whose
client went away is cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..decoder import Decoder, Sequence
from ..errors import KvforgeError

log = logging.getLogger("kvforge.serve")


class Job:
    """One request's generation: its inputs, its event queue, its cancellation flag.

    Events: ``("start", seq)`` after the question is fed, ``("token", id)`` per answer token,
    ``("done", AnswerStats)`` at the end, ``("error", KvforgeError | Exception)`` instead.
    """

    def __init__(self, document, question_ids: list[int], max_new_tokens: int, loop, events):
        self.document = document
        self.question_ids = question_ids
        self.max_new_tokens = max_new_tokens
        self.loop = loop
        self.events = events  # asyncio.Queue, read on the event loop
        self.cancelled = threading.Event()
        self.seq: Sequence | None = None
        self.stats = None  # AnswerStats once done (set on the event loop when the "done" event is read)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Runs jobs on one thread; ``max_batch`` sequences decode together, the rest wait their turn."""

    def __init__(self, lm, *, batch: bool = True, max_batch: int = 16, on_step=None):
        self.decoder = Decoder(lm, batch=batch)
        self.max_batch = max(1, int(max_batch))
        self.on_step = on_step  # called with (number of sequences, seconds) after every batched step
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._active: list[Job] = []
        self._stopping = threading.Event()
        self.tokens_generated = 0  # answer tokens chosen, all jobs together (cancelled ones included)
        self._thread = threading.Thread(target=self._run, name="kvforge-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise KvforgeError("the server is shutting down")
        self._inbox.put(job)

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self._active)

    # -- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit(block=not self._active)
                self._advance()
                live = [j.seq for j in self._active]
                if live:
                    t0 = time.perf_counter()
                    try:
                        self.decoder.step(live)
                    except Exception as exc:  # noqa: BLE001 -- a failed step fails its jobs, never the thread
                        log.exception("decode step failed")
                        for job in self._active:
                            job.emit("error", exc)
                        self._active = []
                    if self.on_step is not None:
                        self.on_step(len(live), time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                log.exception("engine loop error")
        for job in self._active:
            job.emit("error", KvforgeError("the server is shutting down"))

    def _admit(self, block: bool) -> None:
        """Start waiting jobs while there is room in the batch (blocking for one when idle)."""
        while len(self._active) < self.max_batch:
            try:
                job = self._inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                job.seq = self.decoder.start(job.document, job.question_ids, job.max_new_tokens)
            except Exception as exc:  # noqa: BLE001 -- KvforgeError or not, it goes back to its request
                if not isinstance(exc, KvforgeError):
                    log.exception("question prefill failed")
                job.emit("error", exc)
                continue
            job.emit("start", job.seq)
            self._active.append(job)

    def _advance(self) -> None:
        """Choose every running sequence's next token; finished or cancelled jobs leave the batch."""
        still = []
        for job in self._active:
            seq = job.seq
            if job.cancelled.is_set():
                seq.cancel()
                job.emit("done", seq.stats())
                continue
            token = seq.advance()
            if token is not None:
                self.tokens_generated += 1
                job.emit("token", token)
            if seq.done:
                job.emit("done", seq.stats())
            else:
                still.append(job)
        self._active = still
