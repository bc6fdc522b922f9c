"""The Ray executor on a real local Ray runtime: same bytes as the local build, lost workers, a killed driver.

One ``ray.init(num_cpus=2)`` is shared by every test here (a session fixture: start-up costs
seconds). The tests marked ``ray`` skip where Ray is not installed (``pip install 'kvforge[ray]'``);
``make test`` installs it, so CI runs them. Nothing is mocked: workers are real Ray actors in
their own processes, killed by signal. To kill a worker in the middle of a document, the
test-only hook ``KVFORGE_TEST_FAULT`` (:mod:`kvforge.executors.faults`) makes the worker that
starts a named document write its pid and sleep; ``fail:`` makes it refuse the document.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kvforge
from kvforge.errors import ConfigError, IncompatibleModelError, InputError

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("assert", "pass", "del", "break", "continue", "global")  # six short passages of Python's reference
ray_mark = pytest.mark.ray


@pytest.fixture(scope="session")
def ray_runtime():
    """A local Ray runtime of 2 CPUs for the whole session; its address, for drivers in other processes."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def corpus(tmp_path) -> Path:
    import pydoc_data.topics as topics

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in NAMES:
        (folder / f"{name}.txt").write_text(topics.topics[name][:1000])
    return folder


def _ray_build(corpus, out, model, **options):
    return kvforge.build([corpus], out, model=model, progress=False, executor="ray", workers=2,
                         threads_per_worker=1, **options)


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k != "build_seconds"}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


def _tree(root: Path) -> dict[str, object]:
    """Every file under ``root``: its bytes, or for JSON its content without the wall-clock build_seconds."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        out[rel] = _drop_times(json.loads(path.read_bytes())) if path.suffix == ".json" else path.read_bytes()
    return out


def _verified(out: Path) -> list[dict]:
    from kvforge.verify import verify_paths

    results = verify_paths([out])
    assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    return results


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _library_ids(out: Path) -> list[str]:
    try:
        return [e["id"] for e in json.loads((out / "library.json").read_text())["documents"]]
    except (OSError, ValueError, KeyError):
        return []


@ray_mark
@pytest.mark.parametrize("fmt", ["kv", "zarr"])
def test_a_ray_build_writes_the_bytes_the_local_build_writes(tmp_path, corpus, tiny_llama, ray_runtime, fmt):
    suffix = ".zarr" if fmt == "zarr" else ""
    local = kvforge.build([corpus], tmp_path / f"local{suffix}", model=tiny_llama, progress=False)
    remote = _ray_build(corpus, tmp_path / f"ray{suffix}", tiny_llama)
    assert sorted(remote.built) == sorted(local.built) == sorted(NAMES) and not remote.errors
    a, b = _tree(tmp_path / f"local{suffix}"), _tree(tmp_path / f"ray{suffix}")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert all(e["build_seconds"] > 0 for e in remote.entries)  # the worker's own time, not dropped
    ex = remote.executor
    assert ex["name"] == "ray" and ex["workers"] == 2 and [w["threads"] for w in ex["workers_info"]] == [1, 1]
    assert len({w["pid"] for w in ex["workers_info"]} | {os.getpid()}) == 3  # two processes of their own
    _verified(tmp_path / f"ray{suffix}")


@ray_mark
def test_a_worker_killed_mid_document_is_replaced_and_every_document_is_built_once(
        tmp_path, corpus, tiny_llama, ray_runtime, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    victim = "break"
    monkeypatch.setenv("KVFORGE_TEST_FAULT", f"pause:{victim}:{faults}")
    killed = []

    def kill_the_worker():
        pid = int(_wait_for(lambda: (faults / f"{victim}.pid").exists() and (faults / f"{victim}.pid").read_text(),
                            "the worker to start the victim document"))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    report = _ray_build(corpus, tmp_path / "out", tiny_llama)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    attempts = (faults / f"{victim}.attempts").read_text().split()
    assert len(attempts) == 2 and attempts[0] == str(killed[0]) and attempts[1] != attempts[0]  # a new process
    assert sorted(report.built) == sorted(NAMES) and not report.errors  # each once, none lost
    assert sorted(_library_ids(tmp_path / "out")) == sorted(NAMES)
    assert len(_verified(tmp_path / "out")) == len(NAMES)
    local = kvforge.build([corpus], tmp_path / "local", model=tiny_llama, progress=False)
    assert sorted(local.built) == sorted(NAMES)
    for name in NAMES:  # the retried document is the same artifact as any other build of it
        assert (tmp_path / "out" / f"{name}.kv").read_bytes() == (tmp_path / "local" / f"{name}.kv").read_bytes()


@ray_mark
def test_a_killed_driver_resumes_without_rebuilding_finished_documents(tmp_path, corpus, tiny_llama, ray_runtime):
    faults, out = tmp_path / "faults", tmp_path / "out"
    faults.mkdir()
    victim = sorted(NAMES)[0]  # handed out first: its worker stalls on it, the other worker builds the rest
    env = dict(os.environ, PYTHONPATH=str(ROOT), KVFORGE_TEST_FAULT=f"pause:{victim}:{faults}")
    driver = subprocess.Popen(
        [sys.executable, "-m", "kvforge", "build", str(corpus), "-o", str(out), "--model", str(tiny_llama),
         "--executor", "ray", "--ray-address", ray_runtime, "--workers", "2", "--threads-per-worker", "1",
         "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the stalled worker holds its victim (one document at a time); the other worker builds the rest
        _wait_for(lambda: len(_library_ids(out)) >= len(NAMES) - 1 or driver.poll() is not None,
                  "the driver to commit the documents it can")
        assert driver.poll() is None, driver.stderr.read().decode()
        assert (faults / f"{victim}.pid").exists()
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    done = _library_ids(out)
    assert victim not in done and len(done) == len(NAMES) - 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    mtimes = {name: (out / f"{name}.kv").stat().st_mtime_ns for name in done}
    report = _ray_build(corpus, out, tiny_llama)  # no fault hook this time
    assert sorted(report.skipped) == sorted(done)
    assert report.built == [victim]
    assert {name: (out / f"{name}.kv").stat().st_mtime_ns for name in done} == mtimes
    assert len(_verified(out)) == len(NAMES)


@ray_mark
def test_bad_documents_are_reported_not_retried_forever(tmp_path, corpus, tiny_llama, ray_runtime, monkeypatch):
    from kvforge.executors.ray import MAX_RETRIES

    faults = tmp_path / "faults"
    faults.mkdir()
    bad, poison = "pass", "global"  # bad: refused (a KvforgeError); poison: kills every worker that tries it
    monkeypatch.setenv("KVFORGE_TEST_FAULT", f"fail:{bad}:{faults};crash:{poison}:{faults}")
    report = _ray_build(corpus, tmp_path / "skip", tiny_llama, skip_bad=True)
    assert sorted(report.built) == sorted(set(NAMES) - {bad, poison})
    errors = sorted(report.errors, key=lambda e: poison in e)
    assert len(errors) == 2 and str(corpus / f"{bad}.txt") in errors[0] and str(corpus / f"{poison}.txt") in errors[1]
    assert (faults / f"{bad}.attempts").read_text().count("\n") == 1  # an application error is never retried
    pids = (faults / f"{poison}.attempts").read_text().split()
    assert len(pids) == MAX_RETRIES + 1 == len(set(pids))  # a fresh worker process each time, then no more
    assert f"died {MAX_RETRIES + 1} times" in errors[1]
    assert not {bad, poison} & set(_library_ids(tmp_path / "skip"))
    assert not (tmp_path / "skip" / f"{bad}.kv").exists() and not (tmp_path / "skip" / f"{poison}.kv").exists()
    _verified(tmp_path / "skip")

    (faults / f"{bad}.attempts").unlink()
    monkeypatch.setenv("KVFORGE_TEST_FAULT", f"fail:{bad}:{faults}")
    out = tmp_path / "stop"
    with pytest.raises(InputError, match="--skip-bad") as info:
        _ray_build(corpus, out, tiny_llama)
    assert str(corpus / f"{bad}.txt") in str(info.value) and "nothing of it was written" in str(info.value)
    assert (faults / f"{bad}.attempts").read_text().count("\n") == 1
    assert not (out / f"{bad}.kv").exists() and bad not in _library_ids(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # what was built before the failure is whole and resumes; the poison document, harmless in this run, may be
    # among it (whether a worker reached it before the failure stopped the build depends on timing): verified, and
    # compared with the first run only where that run built it
    if _library_ids(out):
        _verified(out)
    for name in set(_library_ids(out)) - {poison}:
        assert (out / f"{name}.kv").read_bytes() == (tmp_path / "skip" / f"{name}.kv").read_bytes()


@ray_mark
def test_asking_for_more_cpus_than_the_runtime_has_is_refused(tmp_path, corpus, tiny_llama, ray_runtime):
    with pytest.raises(ConfigError, match="needs 4 CPUs; the Ray runtime has 2"):
        kvforge.build([corpus], tmp_path / "out", model=tiny_llama, progress=False, executor="ray", workers=4,
                      threads_per_worker=1)
    assert not list((tmp_path / "out").glob("*.kv"))


def test_a_worker_refuses_a_model_with_other_weights(tiny_llama):
    from kvforge.executors.ray import Worker  # the actor class, called here in-process: no Ray needed

    worker = Worker(str(tiny_llama), "0" * 64, 1, None)
    with pytest.raises(IncompatibleModelError, match="same model files at the same path"):
        worker.ready()


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, corpus):
    code = ("import sys; sys.modules['ray'] = None\n"  # an import of ray now fails, as where it is not installed
            "import kvforge\n"
            f"kvforge.build([{str(corpus)!r}], {str(tmp_path / 'out')!r}, executor='ray')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 1 and "ConfigError" in run.stderr
    assert "pip install 'kvforge[ray]'" in run.stderr
    assert not (tmp_path / "out").exists()  # refused before the model loads or anything is written
