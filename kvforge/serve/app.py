"""The HTTP app: OpenAI-compatible routes over compiled documents, and kvforge's own answer route.

    GET  /healthz                     no key needed
    GET  /metrics                     Prometheus text
    GET  /v1/models[/{id}]            one "model" per document
    POST /v1/chat/completions         model = a document id; the last message is the question; stream or not
    POST /v1/documents/{id}/answer    {"question", "max_new_tokens"} -> kvforge query --json's fields

Every route but /healthz needs ``Authorization: Bearer KEY`` when the server has a key (compared in
constant time). Every failure is OpenAI's error shape; no traceback reaches a client. Generation runs
on the engine's thread, never on the event loop; a client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoder import TextStream
from ..errors import FormatError, KvforgeError, ResourceLimitError
from . import schema
from .engine import Engine, Job
from .metrics import Metrics, route_label
from .registry import Registry
from .schema import ApiError, Limits

log = logging.getLogger("kvforge.serve")
INLINE_TOKENIZE_CHARS = 2000  # longer questions are tokenized off the event loop


def api_error(exc: BaseException) -> ApiError:
    """The client's view of any failure: kvforge's messages as they are, anything else without details."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ResourceLimitError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, FormatError):
        log.error("document unreadable: %s", exc)
        return ApiError(500, "the document's artifact failed its checks; see the server log", type="server_error",
                        code="document_unreadable")
    if isinstance(exc, KvforgeError):
        return ApiError(400, str(exc), code="kvforge_error")
    log.error("internal error", exc_info=exc)
    return ApiError(500, "internal server error; see the server log", type="server_error", code="internal_error")


def _respond(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's {limit} bytes "
                              "(kvforge serve --max-body-kb)", code="body_too_large")


class Guard:
    """ASGI middleware: the API key, the body size bound, and request counting (before any route runs)."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics):
        self.app, self.key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope["path"])
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                self.metrics.errors.labels(refusal.code).inc()
                return await _respond(refusal)(scope, receive, counted_send)
            seen = 0

            async def bounded_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            await self.app(scope, bounded_receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] != "/healthz":
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token.strip(), self.key.encode()):
                return ApiError(401, "a valid API key is needed: send Authorization: Bearer KEY",
                                type="authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "Content-Length is not a number", code="invalid_request")
            if int(length) > self.max_body:
                return BodyTooLarge(self.max_body)
        return None


class _Stream(StreamingResponse):
    """A streamed response that always runs ``cleanup`` (the generator's own ``finally`` does not run
    when the response is dropped before its first chunk)."""

    def __init__(self, content, cleanup, **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class Service:
    """The routes' shared state: documents, the engine, the limits, the metrics, the in-flight count."""

    def __init__(self, registry: Registry, engine: Engine, limits: Limits, metrics: Metrics):
        self.registry, self.engine, self.limits, self.metrics = registry, engine, limits, metrics
        self.lm = registry.lm
        self.inflight = 0

    def claim(self) -> None:
        if self.inflight >= self.limits.max_concurrent:
            raise ApiError(429, f"the server is answering {self.inflight} requests, its limit "
                                "(kvforge serve --max-concurrent); retry shortly", type="rate_limit_error",
                           code="too_many_requests")
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)

    def lookup(self, doc_id: str):
        if doc_id in self.registry.refused:
            raise ApiError(404, f"document {doc_id!r} was built for another model than this server's "
                                f"({self.lm.info.name}); it is not served", param="model", code="model_not_found")
        if doc_id not in self.registry.entries:
            raise ApiError(404, f"no document {doc_id!r}; GET /v1/models lists the documents", param="model",
                           code="model_not_found")

    async def start(self, doc_id: str, question: str, max_tokens: int, arrived: float):
        """Load the document, tokenize and check the question, submit it; (job, document, load seconds, first event)."""
        self.lookup(doc_id)
        document, load_s = self.registry.peek(doc_id), 0.0  # resident: no thread hop (warm TTFT)
        if document is None:
            document, load_s = await anyio.to_thread.run_sync(self.registry.get, doc_id)
        if len(question) <= INLINE_TOKENIZE_CHARS:  # the Rust tokenizer takes well under a millisecond here
            ids = self.lm.encode_question(question, document.template)
        else:
            ids = await anyio.to_thread.run_sync(self.lm.encode_question, question, document.template)
        if len(ids) > self.limits.max_question_tokens:
            raise ApiError(400, f"the question is {len(ids)} tokens; this server takes at most "
                                f"{self.limits.max_question_tokens} (kvforge serve --max-question-tokens)",
                           param="messages", code="question_too_long")
        document.check_fits(len(ids))
        job = Job(document, ids, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        self.engine.submit(job)
        kind, value = await job.events.get()  # the question is fed (or refused) before anything is sent
        if kind == "error":
            raise api_error(value)
        self.metrics.ttft.observe(time.perf_counter() - arrived)
        return job, document, load_s

    async def tokens(self, job: Job, request: Request | None):
        """The job's answer tokens as they come, then its stats; cancels it when the client goes away."""
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    return
                continue
            if kind == "token":
                yield value
            elif kind == "done":
                self.metrics.tokens.inc(value.new_tokens)
                if value.decode_s > 0:
                    self.metrics.tokens_per_s.observe(value.tokens_per_s)
                job.stats = value
                return
            elif kind == "error":
                raise api_error(value)


def create_app(registry: Registry, engine: Engine, *, api_key: str | None = None, limits: Limits = Limits(),
               metrics: Metrics | None = None) -> "Guard":
    """The ASGI app (the FastAPI app behind the key and body checks is its ``.fastapi``)."""
    metrics = metrics or Metrics(registry)
    engine.on_step = metrics.on_step
    service = Service(registry, engine, limits, metrics)
    app = FastAPI(title="kvforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        metrics.errors.labels(exc.code or exc.type).inc()
        return _respond(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return _respond(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        metrics.errors.labels("invalid_request").inc()
        return _respond(ApiError(400, "invalid request", code="invalid_request"))

    @app.exception_handler(Exception)
    async def _any_error(request, exc):
        err = api_error(exc)
        metrics.errors.labels(err.code).inc()
        return _respond(err)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "documents": len(registry.entries)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card(doc_id) for doc_id in sorted(registry.entries)]}

    @app.get("/v1/models/{doc_id}")
    async def model(doc_id: str):
        service.lookup(doc_id)
        return _card(doc_id)

    def _card(doc_id: str) -> dict:
        entry = registry.entries[doc_id]
        return schema.model_card(doc_id, entry.manifest, entry.resident_bytes, registry.artifact_bytes(doc_id),
                                 created=started)

    started = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.perf_counter()
        req = schema.parse_chat(schema.parse_json(await request.body()), limits)
        service.claim()
        try:
            job, document, _ = await service.start(req.model, req.question, req.max_tokens, arrived)
        except BaseException:
            service.release()
            raise
        cid, created = schema.completion_id(), int(time.time())
        if not req.stream:
            try:
                ids = [t async for t in service.tokens(job, request)]
            finally:
                job.cancel()
                service.release()
            if job.stats is None:  # the client went away
                return Response(status_code=499)
            text = service.lm.tokenizer.decode(ids, skip_special_tokens=True)
            return schema.chat_completion(cid, created, req.model, text, job.stats, document)
        released = []

        def finish() -> None:  # once, whichever of the generator and the response ends first
            job.cancel()
            if not released:
                released.append(True)
                service.release()

        return _Stream(_stream(job, document, req, cid, created, finish), finish, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job, document, req, cid, created, finish):
        text = TextStream(service.lm.tokenizer)
        try:
            yield schema.sse(schema.chunk(cid, created, req.model, {"role": "assistant", "content": ""}))
            try:
                async for token in service.tokens(job, None):
                    delta = text.feed(token)
                    if delta:
                        yield schema.sse(schema.chunk(cid, created, req.model, {"content": delta}))
            except ApiError as err:
                yield schema.sse(err.body())
                yield schema.SSE_DONE
                return
            tail = text.finish()
            if tail:
                yield schema.sse(schema.chunk(cid, created, req.model, {"content": tail}))
            yield schema.sse(schema.chunk(cid, created, req.model, {}, schema.finish_reason(job.stats)))
            if req.include_usage:
                yield schema.sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                  "model": req.model, "choices": [], "usage": schema.usage(job.stats, document)})
            yield schema.SSE_DONE
        finally:  # also when the client went away: the generator is closed, the job leaves the batch
            finish()

    @app.post("/v1/documents/{doc_id}/answer")
    async def answer(doc_id: str, request: Request):
        arrived = time.perf_counter()
        req = schema.parse_answer(schema.parse_json(await request.body()), limits)
        service.claim()
        try:
            job, document, load_s = await service.start(doc_id, req.question, req.max_new_tokens, arrived)
            ids = [t async for t in service.tokens(job, request)]
        finally:
            service.release()
        stats = job.stats
        if stats is None:  # the client went away
            return Response(status_code=499)
        entry = registry.entries[doc_id]
        text = service.lm.tokenizer.decode(ids, skip_special_tokens=True)
        return {"answer": text, "question": req.question, "artifact": Path(entry.container).name, "doc": doc_id,
                "load_s": round(load_s, 4), "ttft_s": round(stats.ttft_s, 4),
                "tokens_per_s": round(stats.tokens_per_s, 2), "new_tokens": stats.new_tokens,
                "question_tokens": stats.question_tokens, "logical_tokens": document.logical_length,
                "kept_tokens": round(document.kept_tokens, 2), "kept_entries": document.kept_entries,
                "keep": document.manifest["compression"]["keep_achieved"],
                "artifact_bytes": document.artifact.file_bytes, "resident_kv_bytes": document.resident_bytes(),
                "total_s": round(time.perf_counter() - arrived, 4), "model": service.lm.info.name,
                "finish_reason": stats.finish_reason}

    guarded = Guard(app, api_key=api_key, max_body=limits.max_body_bytes, metrics=metrics)
    guarded.fastapi = app
    return guarded
