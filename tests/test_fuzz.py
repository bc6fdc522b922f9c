"""Hostile input for the readers: every file gives a loaded artifact or a ``KvforgeError``.

A fast seeded subset of the fuzzer in ``tests/fuzzing.py`` (its 10,000-input run is
``benchmarks/fuzz.py``), hypothesis properties on arbitrary and mutated files, and
explicit attacks: zip entries that escape the library, repeat or are compressed;
manifests that claim a huge shape; zstd bombs. Helpers (mutators, zip rebuilds,
digest re-fixing) come from ``tests/fuzzing.py``.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing as fuzz  # tests/fuzzing.py: pytest puts this folder on sys.path
from kvforge import artifact, library
from kvforge.errors import FormatError, IntegrityError, KvforgeError

ROOT = Path(__file__).resolve().parent.parent

GOLDENS = fuzz.goldens()
KV_GOLDENS = sorted(name for name in GOLDENS if name.endswith(".kv"))
LIBRARY = "v1.1.0/library.zarr.zip"
LIBRARY_IDS = ["golden-d", "golden-e", "golden/a.txt"]
MEMBERS = fuzz.zip_members(GOLDENS[LIBRARY])
HANG_SECONDS = 30  # a generous guard: every input here is read in milliseconds

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every kind, nested a little; NaN and infinities included (canonical JSON forbids them)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The inputs are tiny; a contended intra-op thread pool would dominate the time (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_SECONDS):
    """Fail (with ``fuzz.Hang``) instead of hanging when a read does not return."""
    old = signal.signal(signal.SIGALRM, fuzz._on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_kv(path: Path):
    """The Artifact, or the KvforgeError it was refused with; any other exception propagates (and fails)."""
    with hang_guard():
        try:
            art = artifact.read(path)
        except KvforgeError as exc:
            return exc
    assert isinstance(art, artifact.Artifact)
    return art


def read_library(path: Path) -> dict:
    """{'ids': ids or KvforgeError, doc id: Artifact or KvforgeError}; other exceptions propagate."""
    found = {}
    with hang_guard():
        try:
            found["ids"] = library.list_ids(path)
        except KvforgeError as exc:
            found["ids"] = exc
        if isinstance(found["ids"], list):
            assert all(isinstance(i, str) for i in found["ids"])
            for doc_id in found["ids"]:
                try:
                    found[doc_id] = library.read(path, doc_id)
                except KvforgeError as exc:
                    found[doc_id] = exc
        try:
            library.read(path, None)  # several documents: refused, but only ever with a KvforgeError
        except KvforgeError:
            pass
    return found


def kv_with_manifest(name: str, edit) -> bytes:
    """Golden ``name`` with ``edit(manifest) -> manifest`` applied and the manifest sha256 re-fixed."""
    header, body = fuzz.split_kv(GOLDENS[name])
    return fuzz.join_kv(fuzz.with_manifest(header, edit(fuzz.kv_manifest(header)), refix=True), body)


def library_with(replace: dict[str, bytes], extra=(), compressed=frozenset()) -> bytes:
    """The golden library with some members' bytes replaced and extra ``(name, bytes)`` members appended."""
    return fuzz.build_zip([(n, replace.get(n, b)) for n, b in MEMBERS] + list(extra), compressed)


# --------------------------------------------------------------------------- the seeded fuzz subset
def test_fuzz_subset_has_no_unexpected_outcome():
    summary = fuzz.run(400, seed=0, timeout=HANG_SECONDS)
    shown = "\n".join(f"index {r['index']} {r['golden']} {r['mutator']}: {r['calls'][0]['traceback']}"
                      for r in summary["unexpected"][:5])
    assert summary["outcomes"]["unexpected"] == 0, shown
    assert summary["outcomes"]["loaded"] > 0 and summary["outcomes"]["refused"] > 0
    # every mutator took part, and every golden file was fuzzed
    assert set(summary["by_mutator"]) == set(fuzz.mutators_for("kv")) | set(fuzz.mutators_for("zip"))
    assert set(summary["by_golden"]) == set(GOLDENS)


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_every_mutator_applies_to_the_goldens(name):
    kind = fuzz.kind_of(name)
    for mutator, fn in sorted(fuzz.mutators_for(kind).items()):
        outputs = [fn(GOLDENS[name], random.Random(f"{mutator}/{i}")) for i in range(4)]
        assert all(isinstance(out, bytes) for out in outputs), mutator
        assert any(out != GOLDENS[name] for out in outputs), f"{mutator} never changed {name}"


def test_inputs_depend_only_on_seed_and_index():
    assert fuzz.input_for(7, 123, GOLDENS) == fuzz.input_for(7, 123, GOLDENS)
    assert fuzz.input_for(7, 123, GOLDENS) != fuzz.input_for(8, 123, GOLDENS)


def test_unmodified_goldens_load(tmp_path):
    for name in KV_GOLDENS:
        (tmp_path / "g.kv").write_bytes(GOLDENS[name])
        assert isinstance(read_kv(tmp_path / "g.kv"), artifact.Artifact), name
    (tmp_path / "g.zarr.zip").write_bytes(library_with({}))  # rebuilt by the fuzz helpers: still valid
    found = read_library(tmp_path / "g.zarr.zip")
    assert found["ids"] == LIBRARY_IDS
    assert all(isinstance(found[i], artifact.Artifact) for i in LIBRARY_IDS)


# --------------------------------------------------------------------------- properties
KV_SHAPED = st.one_of(
    st.binary(max_size=2048),
    # a plausible header length in front of junk
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=256)),
    # a well-framed JSON header of any shape, then junk
    st.builds(lambda obj, rest: (lambda raw: struct.pack("<Q", len(raw)) + raw + rest)(
        json.dumps(obj).encode()), JSON_VALUES, st.binary(max_size=64)),
)


@PROPERTY
@given(data=KV_SHAPED)
def test_any_bytes_as_kv_load_or_are_refused(tmp_path, data):
    (tmp_path / "h.kv").write_bytes(data)
    read_kv(tmp_path / "h.kv")


ZIP_NAMES = st.one_of(st.sampled_from(fuzz.ATTACK_NAMES + [n for n, _ in MEMBERS[:6]]),
                      st.text(alphabet="ab/.\\:c0-_", max_size=16))


@PROPERTY
@given(data=st.one_of(
    st.binary(max_size=1024),
    # well-formed zips of arbitrary entries
    st.lists(st.tuples(ZIP_NAMES, st.binary(max_size=64)), max_size=6).map(fuzz.build_zip),
    # the golden library's first entries plus arbitrary ones
    st.lists(st.tuples(ZIP_NAMES, st.sampled_from([b for _, b in MEMBERS])), max_size=4).map(
        lambda extra: fuzz.build_zip(MEMBERS[:12] + extra)),
))
def test_any_bytes_as_zip_library_are_listed_or_refused(tmp_path, data):
    (tmp_path / "h.zarr.zip").write_bytes(data)
    found = read_library(tmp_path / "h.zarr.zip")
    assert isinstance(found["ids"], (list, KvforgeError))


@PROPERTY
@given(name=st.sampled_from(KV_GOLDENS), data=st.data())
def test_golden_kv_with_a_byte_range_replaced(tmp_path, name, data):
    golden = GOLDENS[name]
    start = data.draw(st.integers(0, len(golden)), label="start")
    end = data.draw(st.integers(start, min(len(golden), start + 64)), label="end")
    same_length = data.draw(st.booleans(), label="same_length")
    size = end - start if same_length else data.draw(st.integers(0, 64), label="size")
    mutated = golden[:start] + data.draw(st.binary(min_size=size, max_size=size), label="bytes") + golden[end:]
    (tmp_path / "h.kv").write_bytes(mutated)
    result = read_kv(tmp_path / "h.kv")
    (n,) = struct.unpack("<Q", golden[:8])
    if mutated == golden:
        assert isinstance(result, artifact.Artifact)
    elif len(mutated) == len(golden) and start >= 8 + n:
        # every tensor byte is covered by tensors_sha256 (or checked before it): never silently accepted
        assert isinstance(result, KvforgeError), (start, end)


def _no_config_or_extra(path: tuple) -> bool:
    return not any(key in ("config", "extra") for key in path)


@PROPERTY
@given(name=st.sampled_from(KV_GOLDENS), data=st.data())
def test_manifest_field_replaced_by_any_json_value(tmp_path, name, data):
    header, body = fuzz.split_kv(GOLDENS[name])
    manifest = fuzz.kv_manifest(header)
    path = data.draw(st.sampled_from(fuzz.json_paths(manifest)), label="path")
    delete = data.draw(st.booleans(), label="delete") and data.draw(st.booleans())
    value = fuzz.DELETE if delete else data.draw(JSON_VALUES, label="value")
    edited = fuzz.set_path(manifest, path, value)
    text = fuzz.dumps_any(edited)
    (tmp_path / "h.kv").write_bytes(fuzz.join_kv(fuzz.with_manifest(header, edited, refix=True), body))
    result = read_kv(tmp_path / "h.kv")
    if isinstance(result, artifact.Artifact):
        assert result.manifest == json.loads(text)
    if delete and _no_config_or_extra(path):
        assert isinstance(result, FormatError), f"deleting required {path} was accepted"
    critical = {("tensors_sha256",), ("format",), ("model", "num_layers"), ("model", "num_kv_heads"),
                ("model", "head_dim"), ("document", "logical_length"), ("storage", "dtype"),
                ("storage", "quantization"), ("storage", "has_beta"), ("compression", "kept_entries"),
                ("compression", "total_entries")}
    changed = delete or fuzz.dumps_any(value) != fuzz.dumps_any(fuzz.get_path(manifest, path))
    if path in critical and changed:
        assert isinstance(result, FormatError), f"{path} = {value!r} was accepted"


LIBRARY_JSON = [n for n, _ in MEMBERS if n == "zarr.json" or fuzz._is_group_meta(n)]


@PROPERTY
@given(member=st.sampled_from(LIBRARY_JSON), data=st.data())
def test_library_zarr_json_field_replaced_by_any_json_value(tmp_path, member, data):
    meta = json.loads(dict(MEMBERS)[member])
    path = data.draw(st.sampled_from(fuzz.json_paths(meta)), label="path")
    value = data.draw(JSON_VALUES, label="value")
    edited = fuzz.set_path(meta, path, value)
    raw = json.dumps(edited, ensure_ascii=False).encode("utf-8", "surrogatepass")
    (tmp_path / "h.zarr.zip").write_bytes(library_with({member: raw}))
    found = read_library(tmp_path / "h.zarr.zip")
    if member == "zarr.json" and path[0] in ("zarr_format", "node_type") and value != meta[path[0]]:
        assert isinstance(found["ids"], FormatError)
    if member != "zarr.json" and isinstance(found["ids"], list):
        # reading one document never depends on another's group
        untouched = [i for i in LIBRARY_IDS if library.group_name(i) != member.split("/")[0]]
        assert all(isinstance(found.get(i), artifact.Artifact) for i in untouched), found


# --------------------------------------------------------------------------- explicit attacks
@pytest.mark.parametrize("name", ["../evil", "/abs/path", "golden-d/../../evil", "golden-d/../zarr.json",
                                  "C:\\evil", "golden-d\\zarr.json", "./zarr.json", "golden-d//x"])
def test_zip_entry_escaping_the_library_is_refused(tmp_path, name):
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({}, extra=[(name, b"{}")]))
    for call in (lambda: library.list_ids(path), lambda: library.read(path, "golden-d")):
        with pytest.raises(FormatError, match="absolute or escaping"):
            call()


@pytest.mark.parametrize("name", ["zarr.json", "golden-d/zarr.json", "golden-d/keys/c/0/0"])
def test_zip_entry_named_twice_is_refused(tmp_path, name):
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({}, extra=[(name, dict(MEMBERS)[name])]))
    for call in (lambda: library.list_ids(path), lambda: library.read(path, "golden-e")):
        with pytest.raises(FormatError, match="twice"):
            call()


def test_deflated_zip_entry_is_refused(tmp_path):
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({}, compressed=frozenset(["golden-d/keys/c/0/0"])))
    with pytest.raises(FormatError, match="compressed"):
        library.list_ids(path)


def _claim(manifest: dict, **fields) -> dict:
    for dotted, value in fields.items():
        manifest = fuzz.set_path(manifest, tuple(dotted.split("__")), value)
    return manifest


HUGE_CLAIMS = {
    "layers beyond the schema": dict(model__num_layers=1_000_000),
    "every shape field at the schema's maximum": dict(
        model__num_layers=1024, model__num_kv_heads=4096, model__head_dim=4096,
        document__logical_length=16_777_216, compression__total_entries=1024 * 4096 * 16_777_216),
}


@pytest.mark.parametrize("claim", sorted(HUGE_CLAIMS))
def test_tiny_kv_claiming_a_huge_shape_is_refused_cheaply(tmp_path, claim):
    path = tmp_path / "huge.kv"
    path.write_bytes(kv_with_manifest("v1.0.0/f16_nobeta_L2_H2_D4_T6.kv",
                                      lambda m: _claim(m, **HUGE_CLAIMS[claim])))
    read_kv(ROOT / "formats" / "golden" / KV_GOLDENS[0])  # warm the schema validator first
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        result = read_kv(path)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, FormatError)
    assert peak < 4 * 2**20, f"{peak} bytes allocated to refuse a {path.stat().st_size} byte file"
    assert seconds < 5  # hang guard only; it takes milliseconds


def test_library_document_claiming_a_huge_shape_is_refused_cheaply(tmp_path):
    """The manifest claims 1024 x 4096 x 4096 (sha256 re-fixed); the arrays' metadata does not follow."""
    meta = json.loads(dict(MEMBERS)["golden-d/zarr.json"])
    manifest = _claim(json.loads(meta["attributes"]["kvforge"]["manifest"]), **HUGE_CLAIMS[
        "every shape field at the schema's maximum"])
    text = fuzz.dumps_any(manifest)
    meta["attributes"]["kvforge"].update(manifest=text, manifest_sha256=fuzz.sha256_text(text))
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({"golden-d/zarr.json": json.dumps(meta).encode()}))
    tracemalloc.start()
    try:
        with hang_guard(), pytest.raises(FormatError, match="shape"):
            library.read(path, "golden-d")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_library_lengths_array_claiming_a_huge_shape_stays_within_the_expansion_bound(tmp_path):
    """Manifest, lengths metadata and lengths chunk all claim 1024 x 4096 heads: a 40 KB file.

    The spec bounds a document's decoded size by 64x its stored size plus 1 MiB before
    anything is allocated for it; the 16 MiB lengths array must not escape that bound.
    """
    meta = json.loads(dict(MEMBERS)["golden-d/zarr.json"])
    L, H = 1024, 4096
    manifest = _claim(json.loads(meta["attributes"]["kvforge"]["manifest"]), model__num_layers=L,
                      model__num_kv_heads=H, compression__total_entries=L * H * 6)
    text = fuzz.dumps_any(manifest)
    meta["attributes"]["kvforge"].update(manifest=text, manifest_sha256=fuzz.sha256_text(text))
    lengths = meta["consolidated_metadata"]["metadata"]["lengths"]
    lengths["shape"] = lengths["chunk_grid"]["configuration"]["chunk_shape"] = [L, H]
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({"golden-d/zarr.json": json.dumps(meta).encode(),
                                   "golden-d/lengths/c/0/0": fuzz.with_crc(fuzz.zstd_bomb(4 * L * H))}))
    (tmp_path / "warm.zarr.zip").write_bytes(GOLDENS[LIBRARY])
    read_library(tmp_path / "warm.zarr.zip")  # first-use allocations are not the input's doing
    with hang_guard():
        result = fuzz.check_input(path, "zip", timeout=0)
    assert result["outcome"] == "refused", [str(exc) for _, exc in result["bad"]]


@pytest.mark.parametrize("bomb", ["1 GiB declared", "one byte too many", "no declared size", "two frames"])
def test_zstd_bomb_chunk_is_refused(tmp_path, bomb):
    chunk = "golden-d/keys/c/0/0"
    raw = dict(MEMBERS)[chunk]
    decoded = fuzz.decode_chunk(raw)
    replacement = {
        "1 GiB declared": fuzz.with_crc(fuzz.zstd_bomb(1 << 30)),
        "one byte too many": fuzz.encode_chunk(decoded + b"\0"),
        "no declared size": fuzz.encode_chunk(decoded, content_size=False),
        "two frames": fuzz.with_crc(raw[:-4] + fuzz.zstd_bomb(1 << 30)),
    }[bomb]
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({chunk: replacement}))
    peak = fuzz.PeakRss()
    peak.reset()
    with hang_guard(), pytest.raises(FormatError):
        library.read(path, "golden-d")
    assert peak.growth() < 64 * 1024, f"peak RSS grew by {peak.growth()} KiB"
    assert isinstance(library.read(path, "golden-e"), artifact.Artifact)  # the other documents still read


def test_chunk_with_a_bad_crc32c_is_an_integrity_error(tmp_path):
    chunk = "golden-e/positions/c/0"
    raw = bytearray(dict(MEMBERS)[chunk])
    raw[-1] ^= 1
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(library_with({chunk: bytes(raw)}))
    with hang_guard(), pytest.raises(IntegrityError, match="crc32c"):
        library.read(path, "golden-e")


def test_zip_entry_with_a_lying_compressed_size_is_refused_or_read_cheaply(tmp_path):
    """A stored entry whose central-directory compressed size claims ~4 GiB (its real size is 153 bytes)."""
    data = GOLDENS[LIBRARY]
    at = data.index(b"PK\x01\x02") + 20  # compressed size of the first entry (zarr.json)
    path = tmp_path / "lib.zarr.zip"
    path.write_bytes(data[:at] + struct.pack("<I", 0xFFFFFFF0) + data[at + 4:])
    tracemalloc.start()
    try:
        with hang_guard():
            try:
                library.list_ids(path)
            except KvforgeError:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = len(data)
    assert peak <= fuzz.memory_budget(size), f"asked for {peak} bytes to read a {size} byte zip"
