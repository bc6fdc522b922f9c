"""Prometheus metrics of one server (its own registry, so that several apps in a process do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/healthz", "/metrics", "/v1/models", "/v1/models/{id}", "/v1/chat/completions",
          "/v1/documents/{id}/answer")


def route_label(path: str) -> str:
    """A bounded label for a request path (arbitrary client paths must not mint new series)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v1/documents/") and path.endswith("/answer"):
        return "/v1/documents/{id}/answer"
    return "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry_of_documents, engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.errors = Counter("kvforge_errors", "Requests refused or failed, by error code", ["code"], registry=r)
        self.ttft = Histogram("kvforge_time_to_first_token_seconds",
                              "From the request's arrival to its first answer token (load, queue, question)",
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.tokens = Counter("kvforge_generated_tokens", "Answer tokens generated", registry=r)
        self.tokens_per_s = Histogram("kvforge_decode_tokens_per_second", "Decode speed of each answer",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.batch = Histogram("kvforge_decode_batch_size", "Sequences fed per decode step",
                               buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.inflight = Gauge("kvforge_inflight_requests", "Generation requests running or waiting", registry=r)
        loaded = Gauge("kvforge_loaded_documents", "Documents resident in the LRU", registry=r)
        loaded.set_function(lambda: len(registry_of_documents.loaded_ids()))
        resident = Gauge("kvforge_resident_kv_bytes", "KV bytes the resident documents hold", registry=r)
        resident.set_function(registry_of_documents.resident_bytes)
        bound = Gauge("kvforge_resident_kv_bytes_limit", "The LRU's bound (--max-resident-mb)", registry=r)
        bound.set(registry_of_documents.max_resident_bytes)
        evictions = Gauge("kvforge_document_evictions", "Documents dropped from the LRU since start", registry=r)
        evictions.set_function(lambda: registry_of_documents.evictions)

    def on_step(self, n: int, seconds: float) -> None:
        self.batch.observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
