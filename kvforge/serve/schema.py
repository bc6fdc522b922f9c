"""The HTTP API's requests and responses: strict checks, OpenAI's shapes, one error shape.

Requests are plain JSON checked here field by field (not by FastAPI's validation, whose 422
is not OpenAI's shape): an unknown or unsupported field is refused with a 400 naming it, never ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass


class ApiError(Exception):
    """An error a client sees: HTTP status and OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each refusal a 4xx that names the limit)."""

    max_body_bytes: int = 256 * 1024
    max_question_tokens: int = 2048
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a chat request names none
    max_concurrent: int = 16  # requests generating or waiting to, across all routes


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def _int(body: dict, name: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {type(value).__name__}", name, "invalid_type")
    if value < low:
        raise bad(f"{name} must be at least {low}, got {value}", name)
    if value > high:
        raise bad(f"{name} is {value}; this server allows at most {high} (kvforge serve --max-tokens)", name,
                  "max_tokens_exceeded")
    return value


def _text(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise bad(f"{name} must be a string, got {type(value).__name__}", name, "invalid_type")
    if not value.strip():
        raise bad(f"{name} is empty", name)
    return value


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str
    max_tokens: int
    stream: bool
    include_usage: bool


# accepted only with the value that means "what kvforge does anyway" (greedy, one choice, no extras)
_NEUTRAL = {"temperature": 0, "top_p": 1, "n": 1, "frequency_penalty": 0, "presence_penalty": 0,
            "logprobs": False, "parallel_tool_calls": False}
_HARMLESS = {"user", "seed", "metadata", "store"}  # identify or label a request; greedy answers are deterministic
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options"}


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    """Check an OpenAI chat completion request; the question is the last message, which must be the user's."""
    for name in body:
        if name in _KNOWN or name in _HARMLESS:
            continue
        if name in _NEUTRAL:
            value, neutral = body[name], _NEUTRAL[name]
            if value is None or (type(value) is type(neutral) or isinstance(neutral, int) and type(value) is float
                                 and not isinstance(neutral, bool)) and value == neutral:
                continue
            raise bad(f"{name}={json.dumps(value)} is not supported: kvforge answers greedily with one choice "
                      f"(send {name}={json.dumps(neutral)} or leave it out)", name, "unsupported_value")
        if body[name] is None:
            continue
        raise bad(f"{name} is not supported by kvforge serve (it answers one question over a compiled document: "
                  "no tools, stop sequences, logprobs or response formats)", name, "unsupported_parameter")
    model = _text(body, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content}", "messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role and a content", f"messages[{i}]", "invalid_type")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role {m['role']!r} is not supported", f"messages[{i}].role")
    last = messages[-1]
    if last["role"] != "user":
        raise bad("the last message must be the user's question (kvforge answers it over the document named by "
                  "model; earlier messages do not enter the prompt)", f"messages[{len(messages) - 1}].role")
    question = _content(last.get("content"), f"messages[{len(messages) - 1}].content")
    if "max_tokens" in body and "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        raise bad("send max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, 1, limits.max_tokens, min(limits.default_max_tokens, limits.max_tokens))
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {type(stream).__name__}", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options supports only include_usage", "stream_options", "unsupported_parameter")
        include_usage = options.get("include_usage") is True
    return ChatRequest(model=model, question=question, max_tokens=max_tokens, stream=bool(stream),
                       include_usage=include_usage)


def _content(content, param: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad("only text content parts are supported", param, "unsupported_value")
        text = "".join(p["text"] for p in content)
    else:
        raise bad(f"{param} must be a string or a list of text parts", param, "invalid_type")
    if not text.strip():
        raise bad("the question is empty", param)
    return text


@dataclass(frozen=True)
class AnswerRequest:
    question: str
    max_new_tokens: int


def parse_answer(body: dict, limits: Limits) -> AnswerRequest:
    """``POST /v1/documents/{id}/answer``: ``{"question": ..., "max_new_tokens": 64}`` (``kvforge query``'s)."""
    extra = sorted(set(body) - {"question", "max_new_tokens"})
    if extra:
        raise bad(f"unknown field {extra[0]!r} (this route takes question and max_new_tokens)", extra[0],
                  "unsupported_parameter")
    return AnswerRequest(question=_text(body, "question"),
                         max_new_tokens=_int(body, "max_new_tokens", 1, limits.max_tokens, min(64, limits.max_tokens)))


# -- responses ---------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(stats, document) -> dict:
    """OpenAI's usage; the prompt is the question plus the document's logical length (what it stands for)."""
    prompt = stats.question_tokens + document.logical_length
    return {"prompt_tokens": prompt, "completion_tokens": stats.new_tokens,
            "total_tokens": prompt + stats.new_tokens, "question_tokens": stats.question_tokens,
            "logical_tokens": document.logical_length, "kept_entries": document.kept_entries}


def finish_reason(stats) -> str:
    return "stop" if stats.finish_reason == "stop" else "length"


def chat_completion(cid: str, created: int, model: str, text: str, stats, document) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(stats), "logprobs": None}],
            "usage": usage(stats, document)}


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_card(doc_id: str, manifest: dict, resident_bytes: int, stored_bytes: int | None,
               created: int | None = None) -> dict:
    """One ``/v1/models`` entry: a document, with what it holds.

    bytes: the KV bytes it holds once loaded (what it costs the server's LRU); artifact_bytes: its stored
    bytes (a library document's are known once it has been loaded, null before).
    """
    comp, doc, storage = manifest["compression"], manifest["document"], manifest["storage"]
    return {"id": doc_id, "object": "model", "created": int(created or time.time()), "owned_by": "kvforge",
            "tokens": doc["logical_length"], "keep": comp["keep_achieved"], "kept_entries": comp["kept_entries"],
            "bytes": resident_bytes, "artifact_bytes": stored_bytes, "method": comp["method"].get("name"),
            "quantization": storage["quantization"], "model": manifest["model"]["name"]}
