"""``kvforge serve``: answer from compiled libraries over HTTP (OpenAI-compatible), runtime side only.

    registry   which documents the given libraries hold; an LRU of loaded document caches, bounded by bytes
    engine     one worker thread that decodes every request, batching their steps
    schema     the OpenAI request checks and response shapes, the error shape
    app        the FastAPI app: routes, auth, limits, metrics
    server     the command's checks (loopback without a key) and uvicorn

Importing this package loads nothing: FastAPI and uvicorn (the ``serve`` extra) are imported by ``app`` and ``server``.
"""
