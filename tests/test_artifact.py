"""The artifact format v1: goldens, round trips, hostile files, atomic writes (spec: formats/kvforge-artifact-v1.md)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from kvforge import artifact
from kvforge.artifact import canonical_json, read, tensor_digest
from kvforge.errors import FormatError, IntegrityError, KvforgeError, UnsupportedVersionError
from kvforge.ragged import CompressedKV

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "formats" / "golden" / "v1.0.0"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("kvforge_make_golden", ROOT / "formats" / "golden" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MG = _load_make_golden()
GOLDENS = MG.golden_inputs()
GOLDEN_BY_NAME = {name: (manifest, kv) for name, manifest, kv in GOLDENS}
SMALLEST = min(GOLDEN_BY_NAME, key=lambda n: (GOLDEN_DIR / n).stat().st_size)
BASE = "f16_nobeta_L2_H2_D4_T6.kv"  # the golden the crafted files start from


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(a, b)


def assert_kv_equal(got: CompressedKV, want: CompressedKV, dtype: torch.dtype) -> None:
    want_t, got_t = MG.spec_tensors(want, dtype), MG.spec_tensors(got, dtype)
    assert sorted(got_t) == sorted(want_t)
    for name in want_t:
        assert tensors_equal(got_t[name], want_t[name]), name
    # and the loaded tensors already have the right dtypes (no cast hides a difference)
    assert got.lengths.dtype == torch.int32
    for layer in range(len(want.keys)):
        assert got.positions[layer].dtype == torch.int32
        assert got.keys[layer].dtype == dtype and got.values[layer].dtype == dtype
        if want.beta is not None:
            assert got.beta[layer].dtype == torch.float32
    assert (got.beta is None) == (want.beta is None)


# --------------------------------------------------------------------------- crafting hostile files


def base_parts(name: str = BASE) -> tuple[dict, dict[str, torch.Tensor]]:
    """A deep copy of a golden's manifest and its spec tensors, to be damaged in exactly one way."""
    manifest, kv = GOLDEN_BY_NAME[name]
    tensors = MG.spec_tensors(kv, DTYPES[manifest["storage"]["dtype"]])
    return copy.deepcopy(manifest), {k: v.clone() for k, v in tensors.items()}


_ANY_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                 torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


def any_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Spec section 4 digest, also for dtypes a valid artifact never holds (to craft wrong-dtype files)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{_ANY_ST_NAMES[t.dtype]}\0{canonical_json(list(t.shape))}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def craft(path: Path, manifest: dict, tensors: dict[str, torch.Tensor], *, fix_digest: bool = True,
          manifest_text: str | None = None, metadata: dict | None = None) -> Path:
    """Save a safetensors file whose manifest sha256 (and, by default, tensors_sha256) are right."""
    manifest = copy.deepcopy(manifest)
    if fix_digest:
        manifest["tensors_sha256"] = any_digest(tensors)
    text = canonical_json(manifest) if manifest_text is None else manifest_text
    meta = {"kvforge.manifest": text, "kvforge.manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if metadata is not None:
        meta = metadata
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return path


def set_counts(manifest: dict, lengths: torch.Tensor) -> None:
    """Make compression.kept_entries / keep_achieved agree with a (damaged) lengths tensor."""
    kept = int(lengths.sum())
    comp = manifest["compression"]
    comp["kept_entries"] = kept
    comp["keep_achieved"] = max(kept, 1) / comp["total_entries"]


def raises(path: Path, cls: type[KvforgeError] = FormatError, match: str | None = None, **kw) -> KvforgeError:
    with pytest.raises(cls, match=match) as info:
        read(path, **kw)
    assert isinstance(info.value, KvforgeError)
    return info.value


# --------------------------------------------------------------------------- goldens


def test_golden_folder_holds_exactly_the_goldens():
    on_disk = sorted(p.name for p in GOLDEN_DIR.glob("*.kv"))
    assert on_disk == sorted(GOLDEN_BY_NAME)
    assert len(on_disk) >= 2
    assert {m["storage"]["dtype"] for m in (GOLDEN_BY_NAME[n][0] for n in on_disk)} >= {"float16", "float32"}
    assert any(m["storage"]["has_beta"] for m, _ in GOLDEN_BY_NAME.values())


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_NAME))
def test_golden_reads_and_equals_its_inputs(name):
    manifest, kv = GOLDEN_BY_NAME[name]
    art = read(GOLDEN_DIR / name)
    assert art.manifest == manifest
    assert canonical_json(art.manifest) == canonical_json(manifest)  # same types too (int vs float)
    assert_kv_equal(art.kv, kv, DTYPES[manifest["storage"]["dtype"]])
    assert art.file_bytes == (GOLDEN_DIR / name).stat().st_size
    header_manifest, _, _ = artifact.read_header(GOLDEN_DIR / name)
    assert header_manifest == manifest


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_NAME))
def test_golden_digest_follows_the_spec(name):
    """tensors_sha256 in the golden equals both an independent spec implementation and kvforge's."""
    manifest, kv = GOLDEN_BY_NAME[name]
    tensors = MG.spec_tensors(kv, DTYPES[manifest["storage"]["dtype"]])
    assert manifest["tensors_sha256"] == MG.spec_digest(tensors) == tensor_digest(tensors)
    assert artifact.kv_to_tensors(kv, DTYPES[manifest["storage"]["dtype"]]).keys() == tensors.keys()


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_NAME))
def test_golden_container_layout(name):
    """The raw header: canonical manifest, its sha256, exactly the two metadata keys, 8-byte aligned data."""
    data = (GOLDEN_DIR / name).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert 8 + n <= len(data) and n % 8 == 0
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header["__metadata__"]
    assert set(meta) == {"kvforge.manifest", "kvforge.manifest_sha256"}
    text = meta["kvforge.manifest"]
    assert text == canonical_json(json.loads(text))
    assert meta["kvforge.manifest_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert "\\u" not in text  # non-ASCII as UTF-8, not escapes


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_NAME))
def test_writer_reproduces_golden_byte_for_byte(name, tmp_path):
    manifest, kv = GOLDEN_BY_NAME[name]
    golden = (GOLDEN_DIR / name).read_bytes()
    # several writes: the output must not depend on the call (a hash-ordered header would differ between calls)
    for i in range(8):
        out = tmp_path / f"{i}.kv"
        artifact.write(out, manifest, kv)
        got = out.read_bytes()
        assert got == golden, (
            f"write #{i} differs from the golden {name}: metadata key order "
            f"{MG.metadata_keys(got)} vs {MG.metadata_keys(golden)}")


def test_writer_is_deterministic(tmp_path):
    manifest, kv = GOLDEN_BY_NAME[BASE]
    outputs = set()
    for i in range(16):
        artifact.write(tmp_path / "x.kv", manifest, kv)
        outputs.add((tmp_path / "x.kv").read_bytes())
    assert len(outputs) == 1, f"{len(outputs)} different byte strings for the same input"


def test_golden_script_writes_nothing_over_released_files(tmp_path, capsys):
    assert MG.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GOLDEN_BY_NAME)
    for name in GOLDEN_BY_NAME:
        assert (tmp_path / name).read_bytes() == (GOLDEN_DIR / name).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert MG.main(["--out", str(tmp_path)]) == 0  # exists: refused without --force
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------- round trips


def random_case(rng: torch.Generator, seed: int, dtype_name: str, with_beta: bool) -> tuple[dict, CompressedKV]:
    py = random.Random(seed)
    L, H, D, T = py.randint(1, 3), py.randint(1, 3), py.choice([1, 2, 8]), py.randint(1, 9)
    lengths = torch.tensor([[py.randint(0, T) for _ in range(H)] for _ in range(L)], dtype=torch.int32)
    if int(lengths.sum()) == 0:
        lengths[0, 0] = 1
    positions, keys, values, beta = [], [], [], []
    for layer in range(L):
        pos = [sorted(py.sample(range(T), int(lengths[layer, h]))) for h in range(H)]
        n = int(lengths[layer].sum())
        positions.append(torch.tensor([p for head in pos for p in head], dtype=torch.int32))
        keys.append(torch.randn(n, D, generator=rng))
        values.append(torch.randn(n, D, generator=rng) * 3)
        beta.append(torch.randn(n, generator=rng))
    kv = CompressedKV(lengths=lengths, positions=positions, keys=keys, values=values, beta=beta if with_beta else None)
    manifest = copy.deepcopy(GOLDEN_BY_NAME[BASE][0])
    manifest["model"].update(num_layers=L, num_kv_heads=H, num_attention_heads=H * 2, head_dim=D)
    manifest["document"]["logical_length"] = T
    manifest["compression"]["total_entries"] = L * H * T
    set_counts(manifest, lengths)
    manifest["storage"].update(dtype=dtype_name, has_beta=not with_beta)  # the writer must fix has_beta
    manifest.pop("tensors_sha256")  # and fill the digest
    return manifest, kv


@pytest.mark.parametrize("with_beta", [False, True])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_round_trip(tmp_path, dtype_name, with_beta):
    rng = torch.Generator().manual_seed(1)
    dtype = DTYPES[dtype_name]
    for seed in range(6):
        manifest, kv = random_case(rng, seed, dtype_name, with_beta)
        path = tmp_path / f"{seed}.kv"
        written = artifact.write(path, manifest, kv)
        assert written == path.stat().st_size
        art = read(path)
        want = copy.deepcopy(manifest)
        want["storage"]["has_beta"] = with_beta
        want["tensors_sha256"] = tensor_digest(MG.spec_tensors(kv, dtype))
        assert art.manifest == want
        assert_kv_equal(art.kv, kv, dtype)
        assert art.logical_length == manifest["document"]["logical_length"]
        assert read(path, verify=False).manifest == want
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.kv" for s in range(seed + 1))


def test_round_trip_unicode_and_overwrite(tmp_path):
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME[BASE][0]), GOLDEN_BY_NAME[BASE][1]
    manifest["document"]["id"] = "ünï/códe \u2028 \"quoted\" \\ 日本語 \U0001f600"
    manifest["compression"]["extra"] = {"nested": {"list": [1, 2.5, None, True, "x"]}}
    path = tmp_path / "u.kv"
    artifact.write(path, manifest, kv)
    assert read(path).manifest["document"]["id"] == manifest["document"]["id"]
    manifest["document"]["id"] = "second"
    artifact.write(path, manifest, kv)  # overwrite in place
    assert read(path).manifest["document"]["id"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["u.kv"]


# --------------------------------------------------------------------------- hostile files: container


def test_empty_file(tmp_path):
    (tmp_path / "e.kv").write_bytes(b"")
    raises(tmp_path / "e.kv", FormatError, match="too short")


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_NAME))
def test_truncated_everywhere(tmp_path, name):
    data = (GOLDEN_DIR / name).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cuts = sorted({0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 2, len(data) - 1}
                  | set(range(0, len(data), 97)))
    for cut in cuts:
        path = tmp_path / f"t{cut}.kv"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            read(path)


def test_every_flipped_byte_of_smallest_golden_is_refused(tmp_path):
    data = bytearray((GOLDEN_DIR / SMALLEST).read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    path = tmp_path / "f.kv"
    for offset in range(len(data)):
        for mask in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[offset] ^= mask
            path.write_bytes(bytes(damaged))
            try:
                read(path)
            except KvforgeError as exc:
                # tensor data: a structural check (positions, finite) or the digest catches it
                assert isinstance(exc, FormatError), (offset, mask, exc)
            else:
                pytest.fail(f"byte {offset} ^ {mask:#x} of {SMALLEST} was accepted")


@pytest.mark.parametrize("name", sorted(set(GOLDEN_BY_NAME) - {SMALLEST}))
def test_flipped_bytes_sample_of_other_goldens(tmp_path, name):
    data = (GOLDEN_DIR / name).read_bytes()
    py = random.Random(name)
    path = tmp_path / "f.kv"
    for offset in sorted(set(py.sample(range(len(data)), 200)) | set(range(8))):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << py.randrange(8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(KvforgeError):
            read(path)


@pytest.mark.parametrize("claimed", ["file+1", "file", 16 * 1024 * 1024 + 1, 2**63, 2**64 - 1])
def test_header_length_lies(tmp_path, claimed):
    data = (GOLDEN_DIR / BASE).read_bytes()
    value = {"file+1": len(data) - 8 + 1, "file": len(data)}.get(claimed, claimed)
    path = tmp_path / "h.kv"
    path.write_bytes(struct.pack("<Q", value) + data[8:])
    raises(path, FormatError, match="header length")
    with pytest.raises(FormatError):
        artifact.read_header(path)


def test_header_length_over_cap_in_a_big_file(tmp_path):
    """N larger than 16 MiB is refused even when the file is that big."""
    n = 16 * 1024 * 1024 + 8
    path = tmp_path / "big.kv"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", n))
        fh.write(b"{" + b" " * (n - 2) + b"}")
    raises(path, FormatError, match="header length")


def test_header_length_short_by_one(tmp_path):
    data = (GOLDEN_DIR / BASE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for delta in (-1, +1, -8, +8):
        path = tmp_path / f"d{delta}.kv"
        path.write_bytes(struct.pack("<Q", n + delta) + data[8:])
        with pytest.raises(FormatError):
            read(path)


def test_plain_safetensors_without_kvforge_metadata(tmp_path):
    path = tmp_path / "plain.kv"
    path.write_bytes(save({"lengths": torch.zeros(2, 2, dtype=torch.int32)}))
    raises(path, FormatError, match="not a kvforge artifact")
    path.write_bytes(save({"x": torch.ones(3)}, metadata={"format": "pt"}))
    raises(path, FormatError, match="not a kvforge artifact")


@pytest.mark.parametrize("content", [
    b'{"format": "kvforge-artifact", "version": "1.0.0"}\n',
    b"\x00" * 64,
    b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
    b"\x04\x00\x00\x00\x00\x00\x00\x00null",
    b"\x02\x00\x00\x00\x00\x00\x00\x00\xff\xfe",
    b"\x0e\x00\x00\x00\x00\x00\x00\x00{\"a\":1,\"b\":2}",
    b"\x18\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":[1,2,3]}",
    bytes(random.Random(0).randrange(256) for _ in range(300)),
    b"\x0b\x00\x00\x00\x00\x00\x00\x00" + b"[" * 11,
], ids=["json", "zeros", "list", "null", "bad-utf8", "object", "meta-list", "random", "nesting"])
def test_json_and_garbage(tmp_path, content):
    path = tmp_path / "g.kv"
    path.write_bytes(content)
    raises(path, FormatError)


def test_deeply_nested_header(tmp_path):
    body = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "deep.kv"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    raises(path, FormatError)


def test_directory_and_missing_path(tmp_path):
    (tmp_path / "dir.kv").mkdir()
    raises(tmp_path / "dir.kv", FormatError)
    raises(tmp_path / "missing.kv", FormatError, match="no such artifact")
    with pytest.raises(FormatError):
        artifact.read_header(tmp_path / "missing.kv")


# --------------------------------------------------------------------------- hostile files: manifest


def test_crafted_baseline_reads(tmp_path):
    """The crafting helper itself produces a valid file, so each defect below is the only one."""
    for name in GOLDEN_BY_NAME:
        manifest, tensors = base_parts(name)
        art = read(craft(tmp_path / name, manifest, tensors))
        assert art.manifest == GOLDEN_BY_NAME[name][0]


def test_manifest_sha256_mismatch(tmp_path):
    manifest, tensors = base_parts()
    text = canonical_json(manifest)
    meta = {"kvforge.manifest": text, "kvforge.manifest_sha256": hashlib.sha256(text.encode() + b" ").hexdigest()}
    raises(craft(tmp_path / "m.kv", manifest, tensors, metadata=meta), IntegrityError, match="sha256")
    meta = {"kvforge.manifest": text}
    raises(craft(tmp_path / "m2.kv", manifest, tensors, metadata=meta), FormatError)


def test_major_version_2_is_unsupported(tmp_path):
    manifest, tensors = base_parts()
    manifest["version"] = "2.0.0"
    exc = raises(craft(tmp_path / "v2.kv", manifest, tensors), UnsupportedVersionError, match=r"2\.0\.0")
    assert "1.x" in str(exc)  # names the versions it reads


@pytest.mark.parametrize("version", ["0.9.0", "10.0.0", "999999999999999999999.0.0"])
def test_other_unknown_majors(tmp_path, version):
    manifest, tensors = base_parts()
    manifest["version"] = version
    raises(craft(tmp_path / "v.kv", manifest, tensors), UnsupportedVersionError, match=version.replace(".", r"\."))


@pytest.mark.parametrize("version", ["1.0", "1", "v1.0.0", "1.0.0-rc1", "", "1.0.0.0", 1, None, "².0.0"])
def test_malformed_versions(tmp_path, version):
    manifest, tensors = base_parts()
    manifest["version"] = version
    exc = raises(craft(tmp_path / "v.kv", manifest, tensors), FormatError)
    assert not isinstance(exc, IntegrityError)


def test_newer_minor_with_unknown_fields_reads(tmp_path):
    """Spec 5: a 1.x reader reads 1.y files and ignores unknown optional manifest fields."""
    manifest, tensors = base_parts()
    manifest["version"] = "1.7.3"
    manifest["future_field"] = {"anything": [1, 2]}
    manifest["storage"]["future_option"] = "x"
    art = read(craft(tmp_path / "minor.kv", manifest, tensors))
    assert art.manifest["version"] == "1.7.3"


@pytest.mark.parametrize("text", ["not json", "[1,2]", '{"format":"kvforge-artifact","version":"1.0.0","x":NaN}',
                                  '{"format":"kvforge-artifact","version":"1.0.0","x":Infinity}', "null", '"str"'])
def test_manifest_text_not_a_valid_object(tmp_path, text):
    manifest, tensors = base_parts()
    raises(craft(tmp_path / "t.kv", manifest, tensors, manifest_text=text), FormatError)


@pytest.mark.parametrize("mutate", [
    lambda m: m.update(format="other"),
    lambda m: m.pop("model"),
    lambda m: m["storage"].update(dtype="float64"),
    lambda m: m["storage"].update(quantization="int8"),
    lambda m: m["storage"].update(has_beta="no"),
    lambda m: m["model"].update(num_layers=0),
    lambda m: m["model"].update(head_dim="4"),
    lambda m: m["model"].update(num_kv_heads=True),
    lambda m: m["model"].update(weights_sha256="ABC"),
    lambda m: m["document"].update(logical_length=-1),
    lambda m: m["compression"].update(keep_achieved=1.5),
    lambda m: m["compression"].pop("extra"),
    lambda m: m["template"].update(bos_token_id=-3),
    lambda m: m.update(tensors_sha256="0" * 63),
], ids=["format", "no-model", "dtype", "quant", "has_beta", "layers0", "head_dim-str", "heads-bool", "weights-sha",
        "length-neg", "keep>1", "no-extra", "bos-neg", "digest-short"])
def test_manifest_schema_violations(tmp_path, mutate):
    manifest, tensors = base_parts()
    mutate(manifest)
    exc = raises(craft(tmp_path / "s.kv", manifest, tensors, fix_digest=False), FormatError)
    assert not isinstance(exc, (IntegrityError, UnsupportedVersionError))


def test_extra_metadata_key_is_refused(tmp_path):
    """Spec 1: __metadata__ MUST contain exactly the two kvforge keys."""
    manifest, tensors = base_parts()
    text = canonical_json(manifest)
    meta = {"kvforge.manifest": text, "kvforge.manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "format": "pt"}
    raises(craft(tmp_path / "x.kv", manifest, tensors, metadata=meta), FormatError)


# --------------------------------------------------------------------------- hostile files: tensors


def test_nan_in_values_with_consistent_digest(tmp_path):
    manifest, tensors = base_parts()
    tensors["layer.1.values"][2, 1] = float("nan")
    raises(craft(tmp_path / "nan.kv", manifest, tensors), IntegrityError, match="layer.1.values")


@pytest.mark.parametrize("name,tensor,value", [
    ("f32_beta_L3_H1_D2_T5.kv", "layer.1.beta", float("inf")),
    ("f32_beta_L3_H1_D2_T5.kv", "layer.0.keys", float("-inf")),
    ("bf16_nobeta_L1_H3_D2_T4.kv", "layer.0.values", float("nan")),
    ("f16_nobeta_L2_H2_D4_T6.kv", "layer.0.keys", float("inf")),
])
def test_non_finite_floats(tmp_path, name, tensor, value):
    manifest, tensors = base_parts(name)
    tensors[tensor].view(-1)[0] = value
    raises(craft(tmp_path / "nf.kv", manifest, tensors), IntegrityError, match=tensor)


def test_stale_tensor_digest(tmp_path):
    manifest, tensors = base_parts()
    tensors["layer.0.keys"][0, 0] += 1
    path = craft(tmp_path / "d.kv", manifest, tensors, fix_digest=False)
    raises(path, IntegrityError, match="tensors_sha256")
    assert read(path, verify=False).kv.keys[0][0, 0] == tensors["layer.0.keys"][0, 0]  # verify=False skips only it


def _relengthen(name: str, layer: int, head: int, new_len: int, positions_for_head: list[int]):
    """Change lengths[layer, head] and rebuild that layer's tensors consistently (shapes, counts, digest)."""
    manifest, tensors = base_parts(name)
    lengths = tensors["lengths"].clone()
    offs = [0] + torch.cumsum(lengths[layer], 0).tolist()
    lengths[layer, head] = new_len
    D = manifest["model"]["head_dim"]
    pos = tensors[f"layer.{layer}.positions"].tolist()
    pos = pos[:offs[head]] + positions_for_head + pos[offs[head + 1]:]
    n = len(pos)
    tensors["lengths"] = lengths
    tensors[f"layer.{layer}.positions"] = torch.tensor(pos, dtype=torch.int32)
    for kind in ("keys", "values"):
        dt = tensors[f"layer.{layer}.{kind}"].dtype
        tensors[f"layer.{layer}.{kind}"] = torch.arange(n * D, dtype=torch.float32).reshape(n, D).to(dt)
    if f"layer.{layer}.beta" in tensors:
        tensors[f"layer.{layer}.beta"] = torch.zeros(n)
    set_counts(manifest, lengths)
    return manifest, tensors


def test_lengths_above_logical_length(tmp_path):
    manifest, tensors = _relengthen(BASE, 1, 0, 7, list(range(7)))
    raises(craft(tmp_path / "l.kv", manifest, tensors), FormatError, match="lengths")


def test_lengths_negative(tmp_path):
    # layer 0 = [3, -1]: N_0 = 2, so the tensors hold the first 2 entries of head 0
    manifest, tensors = base_parts()
    tensors["lengths"] = torch.tensor([[3, -1], [6, 1]], dtype=torch.int32)
    tensors["layer.0.positions"] = torch.tensor([0, 2], dtype=torch.int32)
    tensors["layer.0.keys"] = tensors["layer.0.keys"][:2].clone()
    tensors["layer.0.values"] = tensors["layer.0.values"][:2].clone()
    set_counts(manifest, tensors["lengths"])
    raises(craft(tmp_path / "n.kv", manifest, tensors), FormatError, match="lengths")


@pytest.mark.parametrize("head_positions,match", [
    ([0, 2, 6], r"in \[0, 6\)"),          # == logical_length
    ([-1, 2, 5], r"in \[0, 6\)"),         # negative
    ([0, 2, 2**31 - 1], r"in \[0, 6\)"),  # huge
    ([0, 5, 2], "increasing"),            # decreasing inside head 0
    ([0, 2, 2], "increasing"),            # repeated inside head 0
])
def test_positions_invalid(tmp_path, head_positions, match):
    manifest, tensors = base_parts()
    tensors["layer.0.positions"][:3] = torch.tensor(head_positions, dtype=torch.int32)
    raises(craft(tmp_path / "p.kv", manifest, tensors), FormatError, match=match)


def test_positions_not_increasing_in_last_head_and_after_empty_head(tmp_path):
    manifest, tensors = base_parts()
    tensors["layer.0.positions"][3:5] = torch.tensor([4, 1], dtype=torch.int32)  # head 1 of layer 0
    raises(craft(tmp_path / "p1.kv", manifest, tensors), FormatError, match="increasing")
    manifest, tensors = base_parts("bf16_nobeta_L1_H3_D2_T4.kv")  # lengths [[4, 0, 2]]
    tensors["layer.0.positions"][4:6] = torch.tensor([3, 0], dtype=torch.int32)
    raises(craft(tmp_path / "p2.kv", manifest, tensors), FormatError, match="increasing")


def test_positions_may_drop_at_a_head_boundary(tmp_path):
    """[0, 2, 5 | 1, 4]: head 1 restarts lower; that is valid (the golden has it too)."""
    manifest, tensors = base_parts()
    assert tensors["layer.0.positions"].tolist() == [0, 2, 5, 1, 4]
    read(craft(tmp_path / "ok.kv", manifest, tensors))


def test_positions_straddling_a_head_boundary(tmp_path):
    """Every head sorted on its own is required: moving the boundary makes head 0 = [0, 2, 5, 1]."""
    manifest, tensors = base_parts()
    tensors["lengths"] = torch.tensor([[4, 1], [6, 1]], dtype=torch.int32)
    raises(craft(tmp_path / "b.kv", manifest, tensors), FormatError, match="increasing")


@pytest.mark.parametrize("kept,total", [(11, 24), (13, 24), (12, 23), (12, 25)])
def test_kept_or_total_entries_inconsistent(tmp_path, kept, total):
    manifest, tensors = base_parts()
    manifest["compression"].update(kept_entries=kept, total_entries=total, keep_achieved=kept / total)
    raises(craft(tmp_path / "k.kv", manifest, tensors), FormatError, match="kept_entries")


@pytest.mark.parametrize("drop,add", [
    ("layer.1.values", None),
    ("lengths", None),
    (None, "layer.2.keys"),
    (None, "layer.0.beta"),  # beta without has_beta
    (None, "extra"),
])
def test_missing_or_unexpected_tensor(tmp_path, drop, add):
    manifest, tensors = base_parts()
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(5)
    raises(craft(tmp_path / "set.kv", manifest, tensors), FormatError, match="tensor set")


def test_has_beta_true_but_no_beta(tmp_path):
    manifest, tensors = base_parts()
    manifest["storage"]["has_beta"] = True
    raises(craft(tmp_path / "b.kv", manifest, tensors), FormatError, match="tensor set")


@pytest.mark.parametrize("name,replacement", [
    ("lengths", lambda t: t.to(torch.int64)),
    ("lengths", lambda t: t.to(torch.float32)),
    ("lengths", lambda t: t.reshape(4)),
    ("layer.0.positions", lambda t: t.to(torch.int64)),
    ("layer.0.keys", lambda t: t.to(torch.float32)),
    ("layer.0.keys", lambda t: t.to(torch.bfloat16)),
    ("layer.1.values", lambda t: t.reshape(7, 2, 2)),
    ("layer.1.values", lambda t: t[:, :2].contiguous()),
    ("layer.1.keys", lambda t: t[:5].contiguous()),
], ids=["len-i64", "len-f32", "len-1d", "pos-i64", "keys-f32", "keys-bf16", "values-3d", "values-D", "keys-N"])
def test_wrong_dtype_or_shape(tmp_path, name, replacement):
    manifest, tensors = base_parts()
    tensors[name] = replacement(tensors[name])
    exc = raises(craft(tmp_path / "w.kv", manifest, tensors), FormatError, match=f"tensor {name}")
    assert not isinstance(exc, IntegrityError)


def test_wrong_beta_dtype(tmp_path):
    manifest, tensors = base_parts("f32_beta_L3_H1_D2_T5.kv")
    tensors["layer.1.beta"] = tensors["layer.1.beta"].to(torch.float16)
    raises(craft(tmp_path / "b.kv", manifest, tensors), FormatError, match="layer.1.beta")


def test_shape_mismatch_with_manifest(tmp_path):
    """The tensors are a consistent artifact, but the manifest claims another head_dim / head count."""
    manifest, tensors = base_parts()
    manifest["model"]["head_dim"] = 8
    raises(craft(tmp_path / "d.kv", manifest, tensors), FormatError, match="expected")
    manifest, tensors = base_parts()
    manifest["model"]["num_kv_heads"] = 1
    manifest["compression"].update(total_entries=12, keep_achieved=1.0)
    raises(craft(tmp_path / "h.kv", manifest, tensors), FormatError)


@pytest.mark.parametrize("field", ["model.num_layers", "model.num_kv_heads", "model.head_dim",
                                   "document.logical_length", "compression.kept_entries"])
def test_integer_fields_given_as_floats(tmp_path, field):
    """2.0 is an 'integer' for JSON Schema, but the spec's fields are JSON ints: refuse, or hand back ints."""
    manifest, tensors = base_parts()
    section, key = field.split(".")
    manifest[section][key] = float(manifest[section][key])
    try:
        art = read(craft(tmp_path / "f.kv", manifest, tensors))
    except FormatError:
        return
    assert type(art.manifest[section][key]) is int, f"{field} accepted and returned as {art.manifest[section][key]!r}"


# --------------------------------------------------------------------------- property test


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(GOLDEN_BY_NAME)),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)),
       tail=st.binary(max_size=24))
def test_mutated_golden_reads_or_raises_kvforge_error(tmp_path, name, edits, cut, tail):
    data = bytearray((GOLDEN_DIR / name).read_bytes())
    for where, byte in edits:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[:int(cut * len(data))]
    data += tail
    path = tmp_path / "mut.kv"
    path.write_bytes(bytes(data))
    try:
        art = read(path)
    except KvforgeError:
        return
    # accepted: then it must be the golden's content (e.g. a no-op edit or JSON whitespace)
    manifest, kv = GOLDEN_BY_NAME[name]
    assert art.manifest == manifest
    assert_kv_equal(art.kv, kv, DTYPES[manifest["storage"]["dtype"]])


# --------------------------------------------------------------------------- writer


def _folder(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("where", ["keys", "values", "beta"])
def test_writer_refuses_non_finite_and_leaves_nothing(tmp_path, where):
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME["f32_beta_L3_H1_D2_T5.kv"])
    getattr(kv, where)[1].view(-1)[0] = float("nan")
    with pytest.raises(IntegrityError):
        artifact.write(tmp_path / "nan.kv", manifest, kv)
    assert _folder(tmp_path) == []


def test_writer_refuses_float16_overflow(tmp_path):
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME[BASE])
    kv.values[0] = kv.values[0].to(torch.float32)
    kv.values[0][0, 0] = 1e6  # finite in float32, inf once stored as float16
    with pytest.raises(IntegrityError):
        artifact.write(tmp_path / "o.kv", manifest, kv)
    assert _folder(tmp_path) == []


def test_writer_refusal_keeps_existing_file(tmp_path):
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME[BASE])
    path = tmp_path / "a.kv"
    artifact.write(path, manifest, kv)
    before = path.read_bytes()
    kv.keys[0][0, 0] = float("inf")
    with pytest.raises(IntegrityError):
        artifact.write(path, manifest, kv)
    assert path.read_bytes() == before
    assert _folder(tmp_path) == ["a.kv"]


def test_writer_refuses_invalid_manifest(tmp_path):
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME[BASE])
    manifest["model"]["weights_sha256"] = "nothex"
    with pytest.raises(FormatError):
        artifact.write(tmp_path / "m.kv", manifest, kv)
    assert _folder(tmp_path) == []


def test_write_is_atomic_no_temp_left(tmp_path):
    manifest, kv = GOLDEN_BY_NAME[BASE]
    out = tmp_path / "sub" / "dir" / "a.kv"
    artifact.write(out, manifest, kv)
    assert _folder(out.parent) == ["a.kv"]
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*"))


@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch, fail):
    manifest, kv = GOLDEN_BY_NAME[BASE]

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail == "replace":
        monkeypatch.setattr(artifact.os, "replace", boom)
    elif fail == "fsync":
        monkeypatch.setattr(artifact.os, "fsync", boom)
    else:
        real_fdopen = os.fdopen

        class Broken:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(artifact.os, "fdopen", lambda fd, mode: Broken(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        artifact.write(tmp_path / "a.kv", manifest, kv)
    assert _folder(tmp_path) == []


def test_interrupted_overwrite_keeps_old_file(tmp_path, monkeypatch):
    manifest, kv = GOLDEN_BY_NAME[BASE]
    path = tmp_path / "a.kv"
    artifact.write(path, manifest, kv)
    before = path.read_bytes()
    monkeypatch.setattr(artifact.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    other = copy.deepcopy(manifest)
    other["document"]["id"] = "changed"
    with pytest.raises(OSError):
        artifact.write(path, other, kv)
    assert path.read_bytes() == before and _folder(tmp_path) == ["a.kv"]


def test_written_file_has_normal_permissions(tmp_path):
    """An artifact is a shareable file: mode follows the umask like any other file (0644 under umask 022)."""
    manifest, kv = GOLDEN_BY_NAME[BASE]
    old = os.umask(0o022)
    try:
        artifact.write(tmp_path / "a.kv", manifest, kv)
        (tmp_path / "ref").write_bytes(b"")
    finally:
        os.umask(old)
    assert (tmp_path / "a.kv").stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777


@pytest.mark.parametrize("defect", ["kept_entries", "positions", "head_dim", "lengths-shape"])
def test_writer_refuses_what_the_reader_refuses(tmp_path, defect):
    """The writer is 'as strict as the reader': it never leaves a file that read() rejects."""
    manifest, kv = copy.deepcopy(GOLDEN_BY_NAME[BASE])
    if defect == "kept_entries":
        manifest["compression"]["kept_entries"] = 11
    elif defect == "positions":
        kv.positions[0] = kv.positions[0].flip(0)
    elif defect == "head_dim":
        manifest["model"]["head_dim"] = 8
    else:
        kv.lengths = kv.lengths.reshape(1, 4)
    with pytest.raises(FormatError):
        artifact.write(tmp_path / "w.kv", manifest, kv)
    assert _folder(tmp_path) == []
