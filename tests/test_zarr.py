"""Zarr libraries, quantized storage, conversion, verify, and builds that are killed or run at once.

Spec: formats/kvforge-library-v1.md and formats/kvforge-artifact-v1.md (1.1: quantization).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kvforge
from kvforge import artifact, library, quantize
from kvforge.cli import cli
from kvforge.errors import FormatError, IntegrityError, KvforgeError, UnsupportedVersionError
from kvforge.ragged import CompressedKV

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_11 = ROOT / "formats" / "golden" / "v1.1.0"
GOLDEN_10 = ROOT / "formats" / "golden" / "v1.0.0"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _make_golden_v11():
    spec = importlib.util.spec_from_file_location("kvforge_make_golden_v1_1", GOLDEN_11.parent / "make_golden_v1_1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MG11 = _make_golden_v11()


def _random_kv(L=3, H=2, D=8, T=40, seed=0, beta=False) -> CompressedKV:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (L, H), generator=g, dtype=torch.int32)
    lengths[0, 0] = T  # one full head
    positions, keys, values, betas = [], [], [], []
    for layer in range(L):
        pos = [torch.sort(torch.randperm(T, generator=g)[:int(n)]).values for n in lengths[layer]]
        positions.append(torch.cat(pos).to(torch.int32))
        n = int(lengths[layer].sum())
        keys.append(torch.randn(n, D, generator=g) * 3 + torch.linspace(-5, 5, D))  # channel offsets, as in keys
        values.append(torch.randn(n, D, generator=g))
        betas.append(torch.randn(n, generator=g))
    return CompressedKV(lengths=lengths, positions=positions, keys=keys, values=values,
                        beta=betas if beta else None)


def _manifest(kv: CompressedKV, T: int, doc_id="doc-1", quant="none", dtype="float16") -> dict:
    _, g, _ = _make_golden_v11().golden_inputs()[0]
    m = json.loads(json.dumps(g))
    L, H = kv.lengths.shape
    D = kv.keys[0].shape[1]
    m["model"] |= {"num_layers": L, "num_kv_heads": H, "num_attention_heads": 2 * H, "head_dim": D}
    m["document"] = {"id": doc_id, "sha256": "a" * 64, "logical_length": T}
    total = L * H * T
    m["compression"] |= {"kept_entries": kv.kept, "total_entries": total, "keep_achieved": kv.kept / total}
    m["storage"] = {"dtype": dtype, "quantization": quant, "has_beta": kv.beta is not None}
    m["tensors_sha256"] = "0" * 64
    return m


# --------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_half_a_step(bits):
    kv = _random_kv()
    counts = kv.lengths[0].tolist()
    x = kv.keys[0]
    codes, scale, minimum = quantize.quantize_keys(x, counts, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (x.shape[0], x.shape[1] * bits // 8)
    back = quantize.dequantize_keys(codes, scale, minimum, counts, bits, x.shape[1])
    step = scale.repeat_interleave(torch.tensor(counts), 0)
    assert bool(((back - x).abs() <= step / 2 + 1e-5).all())
    v = kv.values[0]
    codes, scale = quantize.quantize_values(v, bits)
    back = quantize.dequantize_values(codes, scale, bits, v.shape[1])
    # symmetric per entry: max|x| / (2**(bits-1) - 1) per step, half a step of error at most
    assert bool(((back - v).abs() <= scale.float()[:, None] / 2 + 1e-5).all())
    assert torch.allclose(scale.float(), v.abs().amax(1) / (2 ** (bits - 1) - 1), rtol=2e-3)


def test_quantization_edge_cases_stay_finite():
    """A constant head, an empty head, a single entry, zeros: no NaN; exact where the range is zero."""
    x = torch.cat([torch.full((3, 4), 2.5), torch.randn(1, 4)])
    codes, scale, minimum = quantize.quantize_keys(x, [3, 0, 1], 4)
    back = quantize.dequantize_keys(codes, scale, minimum, [3, 0, 1], 4, 4)
    assert torch.isfinite(back).all() and torch.equal(back[:3], x[:3])
    codes, scale = quantize.quantize_values(torch.zeros(0, 4), 8)
    assert codes.shape == (0, 4) and scale.shape == (0,)
    codes, scale = quantize.quantize_values(torch.zeros(2, 4), 4)  # an all-zero entry: scale 0, exact
    assert torch.equal(quantize.dequantize_values(codes, scale, 4, 4), torch.zeros(2, 4))
    codes, scale = quantize.quantize_values(torch.full((2, 4), -1.0), 8)
    back = quantize.dequantize_values(codes, scale, 8, 4)
    assert bool(((back + 1).abs() <= scale.float()[:, None] / 2).all()) and codes.min() >= 1  # code 0 unused


def test_int4_packs_two_codes_per_byte():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = quantize.pack(q, 4)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(quantize.unpack(packed, 4, 4), q)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_artifact_round_trip(tmp_path, quant):
    kv = _random_kv(beta=True, D=64)
    path = tmp_path / "q.kv"
    artifact.write(path, _manifest(kv, 40, quant=quant), kv)
    art = artifact.read(path)
    assert art.manifest["version"] == "1.1.0" and art.manifest["storage"]["quantization"] == quant
    bits = 8 if quant == "int8" else 4
    for layer in range(3):
        err = (art.kv.keys[layer].float() - kv.keys[layer]).abs().max() if kv.keys[layer].numel() else 0
        rng = (kv.keys[layer].max() - kv.keys[layer].min()) if kv.keys[layer].numel() else 0
        assert err <= rng / (2 ** bits - 1) + 0.02  # half a step per channel, plus float16 storage
        assert torch.equal(art.kv.positions[layer], kv.positions[layer])
        assert torch.equal(art.kv.beta[layer], kv.beta[layer])  # beta is never quantized
    plain = tmp_path / "plain.kv"
    artifact.write(plain, _manifest(kv, 40), kv)
    assert artifact.read(plain).manifest["version"] == "1.0.0"  # unquantized files stay readable by 1.0 readers
    payload = lambda p: p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little")  # noqa: E731
    # exact byte accounting (spec section 3): per entry codes + int32 position + f32 beta + one f16 value
    # scale; per (layer, head, channel) two f16 key scales; the int32 lengths
    N, (L, H), D = kv.kept, kv.lengths.shape, 64
    assert payload(plain) == N * (2 * D * 2 + 4 + 4) + L * H * 4
    assert payload(path) == N * (2 * D * bits // 8 + 4 + 4 + 2) + L * H * D * 2 * 2 + L * H * 4


def test_int4_needs_an_even_head_dim(tmp_path):
    kv = _random_kv(D=5)
    with pytest.raises(FormatError, match="even head_dim"):
        artifact.write(tmp_path / "odd.kv", _manifest(kv, 40, quant="int4"), kv)


def test_quantization_in_a_1_0_file_is_refused(tmp_path):
    kv = _random_kv()
    manifest, tensors = artifact.prepare(_manifest(kv, 40, quant="int8"), kv, "x")
    manifest["version"] = "1.0.0"
    path = tmp_path / "lying.kv"
    path.write_bytes(artifact.encode(manifest, tensors))
    with pytest.raises(FormatError, match="needs format version 1.1"):
        artifact.read(path)


def test_huge_scales_that_dequantize_to_inf_are_refused(tmp_path):
    kv = _random_kv()
    manifest, tensors = artifact.prepare(_manifest(kv, 40, quant="int8"), kv, "x")
    tensors["layer.0.key_scale"] = torch.full_like(tensors["layer.0.key_scale"], float("inf"))
    manifest["tensors_sha256"] = artifact.tensor_digest(tensors)
    path = tmp_path / "inf.kv"
    path.write_bytes(artifact.encode(manifest, tensors))
    with pytest.raises(IntegrityError, match="NaN or Inf"):
        artifact.read(path)
    tensors["layer.0.key_scale"] = torch.full_like(tensors["layer.0.key_scale"], 60000.0)  # finite, but the
    manifest["tensors_sha256"] = artifact.tensor_digest(tensors)  # keys overflow float16 once dequantized
    path.write_bytes(artifact.encode(manifest, tensors))
    with pytest.raises(IntegrityError, match="dequantize to NaN or Inf"):
        artifact.read(path)


# --------------------------------------------------------------------------- goldens v1.1.0
def test_golden_v11_folder_holds_exactly_the_goldens():
    names = {n for n, _, _ in MG11.golden_inputs()} | {MG11.LIBRARY}
    assert {p.name for p in GOLDEN_11.iterdir() if p.name != "README.md"} == names


@pytest.mark.parametrize("name", [n for n, _, _ in MG11.golden_inputs()])
def test_golden_v11_reads_and_the_writer_reproduces_it(name, tmp_path):
    inputs = {n: (m, kv) for n, m, kv in MG11.golden_inputs()}
    manifest, kv = inputs[name]
    art = artifact.read(GOLDEN_11 / name)
    got = dict(art.manifest)
    assert got.pop("tensors_sha256") and {k: v for k, v in manifest.items() if k != "tensors_sha256"} == got
    for layer in range(len(kv.keys)):
        assert torch.equal(art.kv.positions[layer], kv.positions[layer])
        assert torch.allclose(art.kv.keys[layer].float(), kv.keys[layer].float(), atol=0.35)
        assert torch.allclose(art.kv.values[layer].float(), kv.values[layer].float(), atol=0.35)
    assert MG11.render(manifest, kv) == (GOLDEN_11 / name).read_bytes()


def test_golden_library_reads_and_matches_its_kv_twins():
    lib = GOLDEN_11 / MG11.LIBRARY
    ids = library.list_ids(lib)
    assert ids == sorted(["golden-d", "golden-e", "golden/a.txt"])
    twins = {"golden/a.txt": GOLDEN_10 / "f16_nobeta_L2_H2_D4_T6.kv",
             "golden-d": GOLDEN_11 / "int8_f16_L2_H2_D4_T6.kv", "golden-e": GOLDEN_11 / "int4_f32_beta_L1_H3_D2_T4.kv"}
    for doc_id, twin in twins.items():
        manifest, tensors, _ = library.read_stored(lib, doc_id)
        assert artifact.encode(manifest, tensors) == twin.read_bytes()  # lossless, byte for byte
        a, b = library.read(lib, doc_id), artifact.read(twin)
        assert a.manifest == b.manifest
        assert all(torch.equal(x, y) for x, y in zip(a.kv.keys, b.kv.keys))


def test_zarr_python_reads_the_golden_library():
    zarr = pytest.importorskip("zarr")
    store = zarr.storage.ZipStore(str(GOLDEN_11 / MG11.LIBRARY), mode="r")
    group = zarr.open_group(store, mode="r")
    keys = group["golden-d"]["keys"][:]
    _, tensors, _ = library.read_stored(GOLDEN_11 / MG11.LIBRARY, "golden-d")
    flat = torch.cat([tensors["layer.0.keys"], tensors["layer.1.keys"]])
    assert keys.dtype.name == "uint8" and (keys == flat.numpy()).all()
    attrs = group["golden-d"].attrs["kvforge"]
    assert json.loads(attrs["manifest"])["document"]["id"] == "golden-d"


# --------------------------------------------------------------------------- library store
def _lib_with(tmp_path, kvs: dict[str, CompressedKV], quant="none") -> Path:
    lib = tmp_path / "lib.zarr"
    for doc_id, kv in kvs.items():
        library.write(lib, _manifest(kv, 40, doc_id=doc_id, quant=quant), kv)
    return lib


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_library_round_trip_equals_the_kv_file(tmp_path, quant):
    kv = _random_kv(beta=True)
    lib = _lib_with(tmp_path, {"doc-1": kv, "odd id/ü": _random_kv(seed=1)}, quant)
    assert library.list_ids(lib) == ["doc-1", "odd id/ü"]
    kvfile = tmp_path / "doc-1.kv"
    artifact.write(kvfile, _manifest(kv, 40, quant=quant), kv)
    a, b = library.read(lib, "doc-1"), artifact.read(kvfile)
    assert a.manifest == b.manifest
    for layer in range(3):
        assert torch.equal(a.kv.keys[layer], b.kv.keys[layer]) and torch.equal(a.kv.values[layer], b.kv.values[layer])
        assert torch.equal(a.kv.beta[layer], b.kv.beta[layer])
    manifest, tensors, _ = library.read_stored(lib, "doc-1")
    assert artifact.encode(manifest, tensors) == kvfile.read_bytes()
    assert library.read(lib, "odd id/ü").manifest["document"]["id"] == "odd id/ü"


def test_library_reads_one_document_without_the_others(tmp_path):
    lib = _lib_with(tmp_path, {"a": _random_kv(seed=1), "b": _random_kv(seed=2)})
    shutil.rmtree(lib / "b" / "keys")  # another document is damaged: "a" still loads
    assert library.read(lib, "a").manifest["document"]["id"] == "a"
    with pytest.raises(FormatError, match="arrays|missing"):
        library.read(lib, "b")


def test_library_rewrite_replaces_a_document(tmp_path):
    lib = _lib_with(tmp_path, {"a": _random_kv(seed=1)})
    library.write(lib, _manifest(_random_kv(seed=5), 40, doc_id="a"), _random_kv(seed=5))
    assert torch.equal(library.read(lib, "a").kv.keys[1], _random_kv(seed=5).keys[1].half())
    assert not (lib / ".staging").exists()


def test_library_errors(tmp_path):
    lib = _lib_with(tmp_path, {"a": _random_kv(seed=1), "b": _random_kv(seed=2)})
    with pytest.raises(KvforgeError, match="holds 2 documents"):
        library.read(lib)
    with pytest.raises(KvforgeError, match="no document 'c'"):
        library.read(lib, "c")
    meta = json.loads((lib / "zarr.json").read_text())
    meta["attributes"]["kvforge"]["version"] = "2.0.0"
    (lib / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedVersionError, match="2.0.0"):
        library.read(lib, "a")
    meta["attributes"] = {}
    (lib / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="not a kvforge library"):
        library.read(lib, "a")
    other = tmp_path / "notempty"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(FormatError, match="non-empty folder"):
        library.create(other)
    with pytest.raises(FormatError, match="read-only"):
        library.create(tmp_path / "x.zarr.zip")


def _rewrite_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"].update(data_type="float64"), "data_type"),
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"].update(shape=[10 ** 9, 8]), "shape|chunks"),
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"].update(shape=[7, 8]), "shape"),
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"]["codecs"].pop(), "codecs"),
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"]["codecs"].insert(0, {"name": "pickle"}), "codecs"),
    (lambda m: m["consolidated_metadata"]["metadata"]["keys"]["chunk_grid"]["configuration"].update(
        chunk_shape=[10 ** 8, 8]), "cap"),
    (lambda m: m["consolidated_metadata"]["metadata"].pop("values"), "arrays"),
    (lambda m: m["attributes"]["kvforge"].update(manifest=m["attributes"]["kvforge"]["manifest"] + " "), "sha256"),
    (lambda m: m.update(zarr_format=2), "zarr v3"),
])
def test_hostile_group_metadata_is_refused(tmp_path, edit, match):
    lib = _lib_with(tmp_path, {"a": _random_kv()})
    _rewrite_json(lib / "a" / "zarr.json", edit)
    with pytest.raises(FormatError, match=match):
        library.read(lib, "a")


def test_a_fifo_planted_in_a_library_folder_is_refused_not_waited_on(tmp_path):
    lib = _lib_with(tmp_path, {"a": _random_kv()})
    chunk = lib / "a" / "keys" / "c" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(FormatError, match="not a regular file|missing|stored"):
        library.read(lib, "a")


def test_corrupt_chunk_is_caught_by_its_checksum(tmp_path):
    lib = _lib_with(tmp_path, {"a": _random_kv()})
    chunk = lib / "a" / "keys" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="crc32c"):
        library.read(lib, "a")
    # verify reports the failure and keeps going with the other documents
    library.write(lib, _manifest(_random_kv(seed=3), 40, doc_id="b"), _random_kv(seed=3))
    r = run("verify", lib, "--json")
    assert r.exit_code == 1
    report = json.loads(r.output)
    assert {d["doc"]: d["ok"] for d in report["documents"]} == {"a": False, "b": True}


def test_a_chunk_that_decodes_to_other_data_fails_the_digest(tmp_path):
    """Chunks re-encoded consistently (valid crc32c and zstd) but with other numbers: the digest catches it."""
    import google_crc32c
    import zstandard

    lib = _lib_with(tmp_path, {"a": _random_kv()})
    chunk = lib / "a" / "values" / "c" / "0" / "0"
    body = zstandard.ZstdDecompressor().decompress(chunk.read_bytes()[:-4])
    body = bytes(b ^ 1 if i == 3 else b for i, b in enumerate(body))
    new = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    chunk.write_bytes(new + google_crc32c.value(new).to_bytes(4, "little"))
    with pytest.raises(IntegrityError, match="tensors_sha256"):
        library.read(lib, "a")
    assert library.read(lib, "a", verify=False).manifest["document"]["id"] == "a"  # the opt-out


def _zip_with(tmp_path, extra: list[tuple[str, bytes]], compress=zipfile.ZIP_STORED) -> Path:
    src = zipfile.ZipFile(GOLDEN_11 / MG11.LIBRARY)
    out = tmp_path / "evil.zarr.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info), compress_type=compress)
        for name, data in extra:
            zf.writestr(name, data)
    return out


@pytest.mark.parametrize("name", ["../evil", "/abs/zarr.json", "golden-d/../../x", "C:\\x", "a//b"])
def test_zip_path_tricks_are_refused(tmp_path, name):
    path = _zip_with(tmp_path, [(name, b"{}")])
    with pytest.raises(FormatError, match="absolute or escaping"):
        library.list_ids(path)


def test_zip_duplicate_and_compressed_entries_are_refused(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        path = _zip_with(tmp_path, [("golden-d/zarr.json", b"{}")])
    with pytest.raises(FormatError, match="appears twice"):
        library.read(path, "golden-d")
    path = _zip_with(tmp_path, [], compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match="compressed"):
        library.read(path, "golden-d")


# --------------------------------------------------------------------------- convert
def test_convert_kv_to_zarr_to_zip_and_back_is_byte_identical(tmp_path):
    src = tmp_path / "kv"
    src.mkdir()
    for name in ("int8_f16_L2_H2_D4_T6.kv", "int4_f32_beta_L1_H3_D2_T4.kv"):
        shutil.copy(GOLDEN_11 / name, src / name)
    for name in ("f32_beta_L3_H1_D2_T5.kv", "bf16_nobeta_L1_H3_D2_T4.kv"):
        shutil.copy(GOLDEN_10 / name, src / name)
    r = run("convert", src, tmp_path / "lib.zarr", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["documents"]) == 4
    assert run("convert", tmp_path / "lib.zarr", tmp_path / "lib.zarr.zip").exit_code == 0
    assert run("convert", tmp_path / "lib.zarr.zip", tmp_path / "back").exit_code == 0
    originals = {artifact.read(p).manifest["document"]["id"]: p.read_bytes() for p in src.glob("*.kv")}
    back = {artifact.read(p).manifest["document"]["id"]: p.read_bytes() for p in (tmp_path / "back").glob("*.kv")}
    assert back == originals
    r = run("convert", src, tmp_path / "lib.zarr")
    assert r.exit_code == 2 and "exists" in r.output
    r = run("verify", tmp_path / "lib.zarr", tmp_path / "lib.zarr.zip", src)
    assert r.exit_code == 0 and "12 ok, 0 failed" in r.output


# --------------------------------------------------------------------------- build, query (tiny model)
def test_build_into_a_library_and_query_it(tmp_path, docs, tiny_llama):
    lib = tmp_path / "lib.zarr"
    r = run("build", docs, "-o", lib, "--model", tiny_llama, "--keep", "0.5", "--quant", "int8", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.output)["built"]) == ["assert", "del", "pass"]
    again = json.loads(run("build", docs, "-o", lib, "--model", tiny_llama, "--keep", "0.5", "--quant", "int8",
                           "--json").output)
    assert again["built"] == [] and len(again["skipped"]) == 3  # resumable: current documents are skipped
    q = json.loads(run("query", lib, "What does assert do?", "--doc", "assert", "--json",
                       "--max-new-tokens", "4").output)
    assert q["doc"] == "assert" and q["logical_tokens"] > 0
    r = run("query", lib, "What does assert do?")
    assert r.exit_code == 2 and "--doc" in r.output
    listing = run("inspect", lib).output
    assert "3 document(s)" in listing
    info = json.loads(run("inspect", lib, "--doc", "pass", "--json").output)
    assert info["storage"]["quantization"] == "int8"

    # the zip twin and the folder give the same logits; so does the .kv twin
    run("convert", lib, tmp_path / "lib.zarr.zip")
    run("convert", lib, tmp_path / "kv")
    a = kvforge.load(lib, model=tiny_llama, doc="del")
    b = kvforge.load(tmp_path / "lib.zarr.zip", model=a.lm, doc="del")
    c = kvforge.load(tmp_path / "kv" / "del.kv", model=a.lm)
    la, lb, lc = (d.logits("What is del?", "It removes") for d in (a, b, c))
    assert torch.equal(la, lb) and torch.equal(la, lc)
    assert a.answer("What is del?", max_new_tokens=6) == c.answer("What is del?", max_new_tokens=6)
    with pytest.raises(KvforgeError, match="--doc applies to a zarr library"):
        kvforge.load(tmp_path / "kv" / "del.kv", model=a.lm, doc="del")


def test_quantized_build_answers_close_to_unquantized(tmp_path, docs, tiny_llama):
    kvforge.build(docs, tmp_path / "f", keep=0.5, model=tiny_llama, progress=False)
    kvforge.build(docs, tmp_path / "q", keep=0.5, model=tiny_llama, quant="int8", progress=False)
    f = kvforge.load(tmp_path / "f" / "assert.kv", model=tiny_llama)
    q = kvforge.load(tmp_path / "q" / "assert.kv", model=f.lm)
    lf, lq = f.logits("What does assert do?", "It checks"), q.logits("What does assert do?", "It checks")
    assert (lf.log_softmax(-1) - lq.log_softmax(-1)).abs().max() < 0.5
    assert (tmp_path / "q" / "assert.kv").stat().st_size < 0.7 * (tmp_path / "f" / "assert.kv").stat().st_size


# --------------------------------------------------------------------------- killed and concurrent builds
def _corpus(folder: Path, n: int) -> Path:
    import pydoc_data.topics as topics

    folder.mkdir()
    names = sorted(topics.topics)[:n]
    for name in names:
        (folder / f"{name.replace(' ', '_')}.txt").write_text(topics.topics[name][:900] or name)
    return folder


def _build_cmd(src: Path, lib: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "kvforge", "build", str(src), "-o", str(lib), "--model", str(model),
            "--keep", "0.5", "--no-progress", "--json"]


def _check_library(lib: Path) -> list[str]:
    """Every listed document loads and verifies; nothing half-written is listed."""
    ids = library.list_ids(lib)
    for doc_id in ids:
        library.read(lib, doc_id, verify=True)
    return ids


def test_sigkill_leaves_a_library_that_loads_and_resumes(tmp_path, tiny_llama):
    src = _corpus(tmp_path / "docs", 60)
    lib = tmp_path / "lib.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed_with, codes = [], []
    for delay in (0.3, 1.5):  # kill once early and once later: the invariants hold whenever it happens
        proc = subprocess.Popen(_build_cmd(src, lib, tiny_llama), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        start = len(library.list_ids(lib)) if lib.exists() else 0
        while time.time() < deadline and proc.poll() is None:
            if lib.exists() and (lib / "zarr.json").exists() and len(library.list_ids(lib)) > start:
                time.sleep(delay)
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        codes.append(proc.wait())
        killed_with.append(len(_check_library(lib)))
    assert codes[0] == -signal.SIGKILL and 1 <= killed_with[0] < 60  # the first kill did land mid-build
    done = subprocess.run(_build_cmd(src, lib, tiny_llama), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["skipped"]) >= killed_with[-1] and len(report["built"]) + len(report["skipped"]) == 60
    assert len(_check_library(lib)) == 60
    assert not (lib / ".staging").exists() or not any((lib / ".staging").iterdir())


def test_two_builds_into_one_library_at_once(tmp_path, tiny_llama):
    src = _corpus(tmp_path / "docs", 12)
    lib = tmp_path / "lib.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(_build_cmd(src, lib, tiny_llama) + (["--force"] if i else []), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len(_check_library(lib)) == 12
    assert not (lib / ".staging").exists()
