"""kvforge serve: the real server on a free loopback port, asked with the official openai client and httpx."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import kvforge  # noqa: E402
from kvforge.errors import ConfigError  # noqa: E402
from kvforge.library import pack  # noqa: E402
from kvforge.model import load_model  # noqa: E402
from kvforge.serve.schema import Limits  # noqa: E402
from kvforge.serve.server import BackgroundServer, check_exposure, prepare  # noqa: E402

KEY = "test-key-0123456789"
TEXTS = {
    "assert-doc": "The assert statement inserts debugging assertions into a program. The secret code is 4471. " * 5,
    "pass-doc": "The pass statement is a null operation: when it executes, nothing happens. The colour is teal. " * 6,
    "del-doc": "Deletion of a name removes the binding of that name from the namespace. The city is Lima. " * 7,
}
QUESTION = "What is the secret?"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Correctness, not speed, is tested here: one intra-op thread keeps a shared, busy machine from
    spinning two (the tiny model decodes in ~2 ms a token with one, up to 100x slower with two under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_llama):
    """Two documents in a zipped zarr library, one as a .kv file in a folder."""
    root = tmp_path_factory.mktemp("serve-lib")
    for name, text in TEXTS.items():
        (root / f"{name}.txt").write_text(text)
    zarr = root / "lib.zarr"
    kvforge.build([root / "assert-doc.txt", root / "pass-doc.txt"], zarr, method="knorm", keep=0.5, model=tiny_llama,
                  progress=False)
    pack(zarr, root / "lib.zarr.zip")
    kvforge.build([root / "del-doc.txt"], root / "kv", method="knorm", keep=0.5, model=tiny_llama, progress=False)
    return {"zip": root / "lib.zarr.zip", "zarr": zarr, "kv": root / "kv", "root": root}


def _expected(library, tiny_llama, doc_id, question=QUESTION, n=12):
    if doc_id == "del-doc":
        return kvforge.load(library["kv"] / "del-doc.kv", model=tiny_llama).answer(question, max_new_tokens=n)
    return kvforge.load(library["zip"], model=tiny_llama, doc=doc_id).answer(question, max_new_tokens=n)


@pytest.fixture(scope="module")
def served(library, tiny_llama):
    lm = load_model(tiny_llama)
    one = max(2 * int(d.document.resident_bytes()) for d in
              [kvforge.load(library["zip"], model=lm, doc="assert-doc")])
    prepared = prepare([str(library["zip"]), str(library["kv"])], model=tiny_llama, api_key=KEY,
                       max_resident_bytes=int(one * 1.05),  # room for about two of the three documents
                       limits=Limits(max_body_bytes=16 * 1024, max_question_tokens=200, max_tokens=1000))
    with BackgroundServer(prepared.app) as url:
        prepared.url = url
        yield prepared
    prepared.engine.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_lists_every_document(client, served):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == set(TEXTS)
    card = cards["assert-doc"].model_dump()
    assert card["tokens"] > 0 and 0 < card["keep"] <= 0.55 and card["method"] == "knorm"
    assert card["bytes"] > 0 and card["quantization"] == "none"
    assert client.models.retrieve("del-doc").model_dump()["artifact_bytes"] > 0


def test_chat_completion_equals_the_runtime_answer(client, library, tiny_llama, served):
    for doc_id in TEXTS:
        out = client.chat.completions.create(model=doc_id, max_tokens=12,
                                             messages=[{"role": "user", "content": QUESTION}])
        assert out.choices[0].message.content == _expected(library, tiny_llama, doc_id)
        doc = served.registry.entries[doc_id]
        q = len(load_model(tiny_llama).encode_question(QUESTION))
        assert out.usage.prompt_tokens == q + doc.manifest["document"]["logical_length"]
        assert out.usage.model_dump()["kept_entries"] == doc.manifest["compression"]["kept_entries"]
        assert out.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_the_runtime_answer(client, library, tiny_llama):
    stream = client.chat.completions.create(model="pass-doc", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": QUESTION}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(library, tiny_llama, "pass-doc")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 0


def test_answer_route_has_the_fields_of_kvforge_query(http, library, tiny_llama):
    from click.testing import CliRunner

    from kvforge.cli import cli

    res = CliRunner().invoke(cli, ["query", str(library["kv"] / "del-doc.kv"), QUESTION, "--json",
                                   "--max-new-tokens", "10", "--model", str(tiny_llama)])
    assert res.exit_code == 0, res.output
    want = json.loads(res.output)
    got = http.post("/v1/documents/del-doc/answer", json={"question": QUESTION, "max_new_tokens": 10})
    assert got.status_code == 200, got.text
    got = got.json()
    assert set(want) <= set(got)
    for key in ("answer", "question", "doc", "new_tokens", "question_tokens", "logical_tokens", "kept_entries", "keep",
                "artifact_bytes", "resident_kv_bytes"):
        assert got[key] == want[key], key
    assert got["artifact"] == "del-doc.kv"  # the file's name, not the server's paths


def test_concurrent_requests_give_the_sequential_answers(served, library, tiny_llama):
    jobs = [(doc_id, q) for doc_id in TEXTS for q in (QUESTION, "Where is the city?")]
    want = {job: _expected(library, tiny_llama, job[0], job[1], n=20) for job in jobs}
    got, errors = {}, []

    def ask(job):
        try:
            with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
                r = c.post("/v1/chat/completions", json={"model": job[0], "max_tokens": 20,
                                                         "messages": [{"role": "user", "content": job[1]}]})
                got[job] = r.json()["choices"][0]["message"]["content"]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert got == want


def test_every_route_but_healthz_needs_the_key(served):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/documents/del-doc/answer"), ("GET", "/nowhere")]:
            _error(c.request(method, path), 401, "invalid_api_key")
            _error(c.request(method, path, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_documents_and_path_like_ids(client, http):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": QUESTION}])
    for doc_id in ["../../etc/passwd", "lib.zarr.zip", "/etc/passwd", "del-doc.kv", ""]:
        r = http.post("/v1/chat/completions", json={"model": doc_id, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code in (400, 404), r.text
        _error(r, r.status_code)
    for path in ["/v1/documents/..%2F..%2Fetc%2Fpasswd/answer", "/v1/documents/../../etc/passwd/answer",
                 "/v1/documents/nope/answer"]:
        _error(http.post(path, json={"question": "x"}), 404)


@pytest.mark.parametrize("body, code, param", [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (json.dumps({"model": "del-doc", "messages": "hi"}).encode(), "invalid_type", "messages"),
    (json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), "invalid_type", "model"),
    (json.dumps({"model": "del-doc", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}).encode(),
     "invalid_type", "max_tokens"),
    (json.dumps({"model": "del-doc", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}).encode(),
     "invalid_type", "stream"),
    (json.dumps({"model": "del-doc", "n": 2, "messages": [{"role": "user", "content": "x"}]}).encode(),
     "unsupported_value", "n"),
    (json.dumps({"model": "del-doc", "temperature": 0.7, "messages": [{"role": "user", "content": "x"}]}).encode(),
     "unsupported_value", "temperature"),
    (json.dumps({"model": "del-doc", "tools": [{"type": "function"}], "messages": [{"role": "user", "content": "x"}]}
                ).encode(), "unsupported_parameter", "tools"),
    (json.dumps({"model": "del-doc", "messages": [{"role": "assistant", "content": "x"}]}).encode(),
     "invalid_value", "messages[0].role"),
    (json.dumps({"model": "del-doc", "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]}).encode(),
     "max_tokens_exceeded", "max_tokens"),
    (json.dumps({"model": "del-doc", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}).encode(),
     "invalid_value", "max_tokens"),
])
def test_bad_requests_get_a_400_in_openai_shape(http, body, code, param):
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    _error(r, 400, code, param)


def test_neutral_values_are_accepted(client):
    out = client.chat.completions.create(model="del-doc", max_tokens=3, temperature=0, top_p=1, n=1, seed=3,
                                         messages=[{"role": "user", "content": QUESTION}])
    assert out.choices[0].message.content is not None


def test_limits(http, served):
    _error(http.post("/v1/chat/completions", content=b"x" * (17 * 1024)), 413, "body_too_large")

    def chunks():  # no Content-Length: the bound holds on the bytes actually received
        for _ in range(40):
            yield b" " * 1024

    _error(http.post("/v1/chat/completions", content=chunks()), 413, "body_too_large")
    long = "why " * 400
    _error(http.post("/v1/chat/completions", json={"model": "del-doc", "messages": [{"role": "user", "content": long}]}),
           400, "question_too_long")
    _error(http.post("/v1/documents/del-doc/answer", json={"question": "x", "max_new_tokens": 1001}), 400,
           "max_tokens_exceeded")
    _error(http.post("/v1/documents/del-doc/answer", json={"question": "x", "extra": 1}), 400, "unsupported_parameter")
    service = served.app.fastapi.state.service
    service.inflight += service.limits.max_concurrent  # as if that many requests were running
    try:
        _error(http.post("/v1/documents/del-doc/answer", json={"question": "x"}), 429, "too_many_requests")
    finally:
        service.inflight -= service.limits.max_concurrent


def test_no_traceback_reaches_a_client(http, served, monkeypatch):
    def broken(doc_id):
        raise RuntimeError("secret internals /home/someone")

    monkeypatch.setattr(served.registry, "peek", lambda doc_id: None)
    monkeypatch.setattr(served.registry, "get", broken)
    err = _error(http.post("/v1/documents/del-doc/answer", json={"question": "x"}), 500, "internal_error")
    assert "secret" not in err["message"]


def test_a_client_that_disconnects_stops_its_generation(http, served, library, tiny_llama):
    question = "Repeat the text."  # the tiny model runs on to max_tokens here
    full = kvforge.load(library["kv"] / "del-doc.kv", model=tiny_llama).run(question, 300)
    assert full.stats.new_tokens == 300
    before = served.engine.tokens_generated
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "del-doc", "max_tokens": 300, "stream": True,
                           "messages": [{"role": "user", "content": question}]}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while (served.engine.running or served.app.fastapi.state.service.inflight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.engine.running == 0 and served.app.fastapi.state.service.inflight == 0
    assert served.engine.tokens_generated - before < 150  # stopped well before its 300 tokens


def test_the_lru_stays_within_its_bound_and_metrics_say_so(http, served):
    for doc_id in TEXTS:
        assert http.post(f"/v1/documents/{doc_id}/answer", json={"question": "x", "max_new_tokens": 2}).status_code == 200
        assert served.registry.resident_bytes() <= served.registry.max_resident_bytes
    assert served.registry.evictions >= 1
    assert len(served.registry.loaded_ids()) < len(TEXTS)
    text = http.get("/metrics").text
    for name in ("kvforge_requests_total", "kvforge_errors_total", "kvforge_time_to_first_token_seconds_bucket",
                 "kvforge_generated_tokens_total", "kvforge_decode_tokens_per_second", "kvforge_loaded_documents",
                 "kvforge_resident_kv_bytes"):
        assert name in text, name


def test_exposure_beyond_loopback_needs_a_key(library):
    from click.testing import CliRunner

    from kvforge.cli import cli

    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    with pytest.raises(ConfigError, match="API key"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ConfigError, match="empty"):
        check_exposure("127.0.0.1", " ")
    res = CliRunner().invoke(cli, ["serve", str(library["zip"]), "--host", "0.0.0.0"], env={"KVFORGE_API_KEY": None})
    assert res.exit_code == 2 and "API key" in res.output


def test_documents_for_another_model_are_refused(library, other_llama):
    with pytest.raises(kvforge.KvforgeError, match="another model"):
        prepare([str(library["kv"])], model=other_llama)


def test_quantized_documents_stay_quantized_in_the_lru(tmp_path, tiny_llama):
    from kvforge.decoder import Decoder
    from kvforge.serve.registry import Registry, scan

    (tmp_path / "q.txt").write_text(TEXTS["del-doc"])
    kvforge.build([tmp_path / "q.txt"], tmp_path / "q8.zarr", method="knorm", keep=0.5, model=tiny_llama,
                  quant="int8", progress=False)
    lm = load_model(tiny_llama)
    registry = Registry(scan([str(tmp_path / "q8.zarr")]), lm, 1 << 30)
    document, _ = registry.get("q")
    entry = registry.entries["q"]
    assert document.resident_bytes() == entry.resident_bytes  # the LRU's estimate is exact
    flat = kvforge.load(tmp_path / "q8.zarr", model=lm, doc="q")
    assert document.resident_bytes() < 0.6 * flat.resident_kv_bytes()
    assert Decoder(lm).run(document, QUESTION, 12).ids == flat.answer_ids(QUESTION, 12)
