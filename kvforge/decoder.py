"""The decoder: runs questions over document caches and returns what happened.

    decoder = Decoder(lm)
    seq = decoder.start(document, decoder.question_ids(document, "Who?"), max_new_tokens=64)
    while (token := seq.advance()) is not None:   # greedy choice from the last logits
        decoder.step([seq])                       # feed it (several sequences: one batched forward)
    seq.result()                                  # Answer: ids, finish reason, timings

A :class:`Sequence` is one question over one :class:`~kvforge.doccache.DocumentCache`: its own
fork of the prefix, its greedy state, its timings. Nothing is stored on the decoder or on
the document, so many sequences (over one document or many) can run side by side, and
:meth:`Decoder.step` feeds several of them in one forward pass (each with its own ragged cache).

Positions continue at each document's logical length, whatever its physical length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .attention import BatchedRaggedCache, RaggedCache, use_ragged_attention
from .doccache import DocumentCache
from .errors import KvforgeError, ResourceLimitError


@dataclass(frozen=True)
class AnswerStats:
    """Timings and sizes of one answer (``kvforge query --json``)."""

    ttft_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    question_tokens: int = 0
    finish_reason: str = "stop"  # "stop": the model ended its turn; "length": max_new_tokens or the context

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class Answer:
    """What one question produced: the answer's token ids and text, and its stats."""

    ids: list[int]
    text: str
    stats: AnswerStats


@dataclass(eq=False)
class Sequence:
    """One question in flight over one document cache (made by :meth:`Decoder.start`)."""

    document: DocumentCache
    question_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset
    cache: RaggedCache
    logits: torch.Tensor | None = None  # (vocab,): the distribution of the next token
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float = 0.0
    decode_started: float = 0.0
    decode_s: float = 0.0
    pending: int | None = None  # the token advance() chose and step() has yet to feed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self) -> int | None:
        """Choose the next token greedily; None once the answer is complete (the stop token is not returned)."""
        if self.done:
            return None
        token = int(torch.argmax(self.logits))
        if token in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        self.decode_s = time.perf_counter() - self.decode_started
        if len(self.tokens) >= self.max_new_tokens:
            self._finish("length")
        elif self.document.logical_length + self.cache.suffix_length + 1 >= self.document.max_context:
            self._finish("length")
        else:
            self.pending = token
        return token

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.pending = None
        self.decode_s = time.perf_counter() - self.decode_started
        self.cache = None  # the suffix is the only thing a question owns: drop it now
        return None

    def cancel(self) -> None:
        if not self.done:
            self._finish("cancelled")

    def stats(self) -> AnswerStats:
        return AnswerStats(ttft_s=self.ttft_s, decode_s=self.decode_s, new_tokens=len(self.tokens),
                           question_tokens=len(self.question_ids), finish_reason=self.finish_reason or "length")


class Decoder:
    """Runs questions over document caches with one model; holds no per-question state.

    ``batch``: feed several sequences' next tokens in one forward pass (:meth:`step`); the
    answers are the greedy ones of each sequence alone.
    """

    def __init__(self, lm, *, batch: bool = True):
        self.lm = lm
        self.batch = batch
        self.device = next(lm.model.parameters()).device
        use_ragged_attention(lm.model)

    def question_ids(self, document: DocumentCache, question: str) -> list[int]:
        ids = self.lm.encode_question(question, document.template)
        document.check_fits(len(ids))
        return ids

    @torch.inference_mode()
    def forward(self, cache: RaggedCache, ids: list[int], last_only: bool = False,
                rows: list[int] | None = None) -> torch.Tensor:
        """Feed ``ids`` after ``cache``'s content; logits (len(ids), vocab) (``last_only``: the last row;
        ``rows``: only these rows, in that order)."""
        start = cache.get_seq_length()
        pos = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        logits_to_keep = 1 if last_only else (torch.tensor(rows, dtype=torch.long, device=self.device)
                                              if rows is not None else 0)
        out = self.lm.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                            position_ids=pos, cache_position=pos[0], use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits[0].float()

    def start(self, document: DocumentCache, question_ids: list[int], max_new_tokens: int = 64) -> Sequence:
        """Feed the question after a fresh fork of ``document``: the sequence's first logits (time to first token)."""
        if max_new_tokens < 1:
            raise KvforgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        document.check_fits(len(question_ids))
        seq = Sequence(document, list(question_ids), max_new_tokens, self.lm.stop_ids, document.fork())
        t0 = time.perf_counter()
        seq.logits = self.forward(seq.cache, seq.question_ids, last_only=True)[-1]
        seq.ttft_s = time.perf_counter() - t0
        seq.decode_started = time.perf_counter()
        return seq

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> None:
        """Feed every sequence's pending token; several sequences share one forward pass when ``batch``."""
        live = [s for s in seqs if s.pending is not None]
        if not live:
            return
        if len(live) == 1 or not self.batch:
            for s in live:
                s.logits = self.forward(s.cache, [s.pending], last_only=True)[-1]
                s.pending = None
            return
        starts = [s.cache.get_seq_length() for s in live]
        pos = torch.tensor(starts, device=self.device).unsqueeze(1)  # (B, 1): each at its own position
        ids = torch.tensor([[s.pending] for s in live], device=self.device)
        batch = BatchedRaggedCache([s.cache for s in live])
        out = self.lm.model(input_ids=ids, past_key_values=batch, position_ids=pos,
                            cache_position=torch.tensor([max(starts)], device=self.device), use_cache=True,
                            logits_to_keep=1)
        logits = out.logits[:, -1].float()
        for i, s in enumerate(live):
            s.logits = logits[i]
            s.pending = None

    def stream(self, document: DocumentCache, question: str, max_new_tokens: int = 64,
               on_done: Callable[[Sequence], None] | None = None) -> Iterator[int]:
        """Greedy decoding of one question; yields answer token ids; ``on_done`` gets the finished sequence."""
        seq = self.start(document, self.question_ids(document, question), max_new_tokens)
        while (token := seq.advance()) is not None:
            yield token
            self.step([seq])
        if on_done is not None:
            on_done(seq)

    def run(self, document: DocumentCache, question: str, max_new_tokens: int = 64,
            on_text: Callable[[str], None] | None = None) -> Answer:
        """The greedy answer to ``question``; ``on_text`` receives the text as it grows (streaming)."""
        finished: list[Sequence] = []
        text = TextStream(self.lm.tokenizer)
        for token in self.stream(document, question, max_new_tokens, on_done=finished.append):
            delta = text.feed(token)
            if on_text is not None and delta:
                on_text(delta)
        tail = text.finish()
        if on_text is not None and tail:
            on_text(tail)
        seq = finished[0]
        return Answer(ids=list(seq.tokens), text=text.text, stats=seq.stats())

    @torch.inference_mode()
    def continuation_logits(self, document: DocumentCache, ids: list[int], rows: list[int] | None = None) -> torch.Tensor:
        """Logits after feeding ``ids`` right after the document: (len(ids), vocab); row i predicts ids[i + 1]."""
        if document.logical_length + len(ids) > document.max_context:
            raise ResourceLimitError(f"{len(ids)} tokens do not fit after the document in the model's context")
        return self.forward(document.fork(), list(ids), rows=rows)


class TextStream:
    """Turns answer tokens into text deltas, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.text
        if len(text) > len(self.shown) and not text.endswith("\ufffd") and text.startswith(self.shown):
            delta, self.shown = text[len(self.shown):], text
            return delta
        return ""

    def finish(self) -> str:
        text = self.text
        delta = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return delta
