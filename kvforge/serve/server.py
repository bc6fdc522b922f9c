"""``kvforge serve``: check what may be served where, load the model once, run uvicorn.

The checks come before anything is loaded: a host beyond loopback needs an API key, the key
is not empty, the libraries hold documents. Then the model (``--model``, else the first
document's own, as ``kvforge query`` picks it), the registry (documents built for another
model are refused, with the fields that differ), the engine thread and the app.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass

from ..errors import ConfigError, KvforgeError
from .schema import Limits

log = logging.getLogger("kvforge.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_exposure(host: str, api_key: str | None) -> None:
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key (or KVFORGE_API_KEY) is empty; give a real key or none")
    if not is_loopback(host) and api_key is None:
        raise ConfigError(f"refusing to listen on {host!r} without an API key: anything that can reach it could "
                          "use it; pass --api-key KEY (or set KVFORGE_API_KEY), or keep the default 127.0.0.1")


@dataclass
class Prepared:
    app: object  # the ASGI app
    registry: object
    engine: object


def prepare(sources: list[str], *, model=None, api_key: str | None = None, max_resident_bytes: int = 1 << 30,
            limits: Limits = Limits(), batch: bool = True, verify: bool = True) -> Prepared:
    """The app over ``sources`` with the model loaded and the engine running (no socket yet)."""
    from ..runtime import resolve_model_for
    from .app import create_app
    from .engine import Engine
    from .registry import Registry, scan

    entries = scan(sources)
    if not entries:
        raise KvforgeError(f"{', '.join(sources)}: no documents to serve")
    lm = resolve_model_for(entries[0].manifest, model)
    registry = Registry(entries, lm, max_resident_bytes, verify=verify)
    for doc_id, why in registry.refused.items():
        log.warning("not serving %s: %s", doc_id, why)
    if not registry.entries:
        raise KvforgeError("every document was built for another model than the one loaded: "
                           + next(iter(registry.refused.values())))
    engine = Engine(lm, batch=batch, max_batch=limits.max_concurrent)
    return Prepared(create_app(registry, engine, api_key=api_key, limits=limits), registry, engine)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_server(app, host: str, port: int, *, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, server_header=False)
    return uvicorn.Server(config)


class BackgroundServer:
    """The server in a thread of this process (tests, benchmarks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn_server(app, self.host, self.port, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, name="kvforge-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise KvforgeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(sources: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model=None, max_resident_bytes: int = 1 << 30, limits: Limits = Limits(), batch: bool = True,
          verify: bool = True, on_ready=None) -> None:
    """Check, load, and serve until interrupted."""
    check_exposure(host, api_key)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    prepared = prepare(sources, model=model, api_key=api_key, max_resident_bytes=max_resident_bytes,
                       limits=limits, batch=batch, verify=verify)
    if on_ready is not None:
        on_ready(prepared)
    try:
        uvicorn_server(prepared.app, host, port).run()
    finally:
        prepared.engine.close()
