"""The only module that knows the artifact's file layout: write, read, verify, inspect.

The normative spec is ``formats/kvforge-artifact-v1.md``. The writer is strict
and atomic; the reader trusts nothing and turns every failure into a
:class:`~kvforge.errors.FormatError` (or a subclass).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from . import options as _options
from . import quantize as _quant
from .containers import atomic_write_bytes, canonical_json, guard
from .errors import FormatError, IntegrityError
from .manifest import MANIFEST_KEY, MANIFEST_SHA_KEY, check_version, parse_manifest, validate, version_for
from .ragged import CompressedKV

MAX_HEADER_BYTES = 16 * 1024 * 1024

# the storage dtypes and quantizations are named once, in kvforge.options; here their torch dtypes
STORAGE_DTYPES = {name: getattr(torch, name) for name in _options.STORAGE_DTYPES}
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32",
             torch.uint8: "U8"}
QUANTIZATIONS = _options.QUANTIZATIONS


@dataclass
class Artifact:
    """A loaded artifact: its manifest (a plain dict, see the spec) and its ragged KV."""

    manifest: dict
    kv: CompressedKV
    path: str = ""
    file_bytes: int = 0
    codes: list | None = None  # per layer quantize.QuantizedLayer, when read with keep_codes of a quantized file

    @property
    def logical_length(self) -> int:
        return int(self.manifest["document"]["logical_length"])


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Content digest of the tensors, independent of the container (spec section 4)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode() + b"\0" + _ST_NAMES[t.dtype].encode() + b"\0")
        h.update(canonical_json(list(t.shape)).encode() + b"\0")
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # view as bytes without converting (bfloat16 has no numpy dtype)
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def tensor_names(num_layers: int, has_beta: bool, quantization: str) -> set[str]:
    """The exact tensor set of an artifact (spec section 3)."""
    per_layer = ["positions", "keys", "values"]
    if quantization != "none":
        per_layer += ["key_scale", "key_min", "value_scale"]
    if has_beta:
        per_layer.append("beta")
    return {"lengths"} | {f"layer.{l}.{k}" for l in range(num_layers) for k in per_layer}


def kv_to_tensors(kv: CompressedKV, dtype: torch.dtype, quantization: str = "none") -> dict[str, torch.Tensor]:
    """The tensors an artifact stores for ``kv``: float keys / values, or their integer codes and scales."""
    tensors = {"lengths": kv.lengths.to(torch.int32).contiguous()}
    bits = _quant.bits_of(quantization)
    for layer in range(len(kv.keys)):
        tensors[f"layer.{layer}.positions"] = kv.positions[layer].to(torch.int32).contiguous()
        keys, values = kv.keys[layer].to(dtype), kv.values[layer].to(dtype)
        if quantization == "none":
            tensors[f"layer.{layer}.keys"] = keys.contiguous()
            tensors[f"layer.{layer}.values"] = values.contiguous()
        else:
            counts = [int(c) for c in kv.lengths[layer].tolist()]
            codes, scale, minimum = _quant.quantize_keys(keys, counts, bits)
            tensors |= {f"layer.{layer}.keys": codes, f"layer.{layer}.key_scale": scale,
                        f"layer.{layer}.key_min": minimum}
            codes, scale = _quant.quantize_values(values, bits)
            tensors |= {f"layer.{layer}.values": codes, f"layer.{layer}.value_scale": scale}
        if kv.beta is not None:
            tensors[f"layer.{layer}.beta"] = kv.beta[layer].to(torch.float32).contiguous()
    return tensors


def prepare(manifest: dict, kv: CompressedKV, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked manifest (version, has_beta, tensors_sha256 filled) and the tensors to store, any container.

    The writer is as strict as the reader: the same schema and the same tensor checks.
    """
    manifest = json.loads(canonical_json(manifest))  # a deep copy that is surely JSON
    storage = manifest["storage"]
    quantization = storage.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise FormatError(f"refusing to write {where}: storage.quantization must be one of {QUANTIZATIONS}, "
                          f"got {quantization!r}")
    if quantization == "int4" and kv.keys and kv.keys[0].shape[-1] % 2:
        raise FormatError(f"refusing to write {where}: int4 packs two channels per byte and needs an even "
                          f"head_dim, this model has {kv.keys[0].shape[-1]}; use --quant int8")
    dtype = STORAGE_DTYPES[storage["dtype"]]
    for layer in range(len(kv.keys)):
        for name, t in (("keys", kv.keys[layer]), ("values", kv.values[layer])):
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise IntegrityError(f"refusing to write {where}: layer {layer} {name} hold NaN or Inf "
                                     f"(in {storage['dtype']})")
    tensors = kv_to_tensors(kv, dtype, quantization)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IntegrityError(f"refusing to write {where}: tensor {name} holds NaN or Inf")
    manifest["version"] = version_for(storage)
    storage["has_beta"] = kv.beta is not None
    manifest["tensors_sha256"] = tensor_digest(tensors)
    validate(manifest, where)
    check_version(manifest.get("version"), where)
    _check_tensors(tensors, manifest, f"refusing to write {where}")
    return manifest, tensors


def write(path: str | os.PathLike, manifest: dict, kv: CompressedKV) -> int:
    """Write a ``.kv`` artifact atomically; fills version, ``storage.has_beta`` and ``tensors_sha256``.

    ``manifest["storage"]["quantization"]`` (``none``, ``int8``, ``int4``) decides how keys and
    values are stored. Returns the bytes written.
    """
    manifest, tensors = prepare(manifest, kv, str(path))
    data = encode(manifest, tensors)
    atomic_write_bytes(Path(path), data)
    return len(data)


def encode(manifest: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The exact bytes of a ``.kv`` file holding these (already checked) manifest and tensors."""
    from safetensors.torch import save

    text = canonical_json(manifest)
    metadata = {MANIFEST_KEY: text, MANIFEST_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()}
    return _sorted_metadata(save(tensors, metadata=metadata))


def _sorted_metadata(data: bytes) -> bytes:
    """Re-serialize the safetensors header with ``__metadata__`` keys sorted (spec section 2).

    safetensors keeps its metadata in a hash map, so its key order changes from call
    to call; the spec pins it so that the same input always gives the same bytes.
    The tensor entries and the data section are left exactly as they are.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Read and check the header and manifest only. Returns (manifest, raw header, header end offset)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: {size} bytes is too short to be a kvforge artifact (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise FormatError(
                    f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES} byte cap; "
                    "the file is truncated or not a kvforge artifact"
                )
            raw = fh.read(n)
    except IsADirectoryError as exc:
        raise FormatError(f"{path}: is a folder, not a .kv artifact") from exc
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: no such artifact") from exc
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: the header is not valid UTF-8 JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the header is not a JSON object; the file is corrupt")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise FormatError(f"{path}: not a kvforge artifact (no {MANIFEST_KEY!r} in the safetensors metadata)")
    if set(meta) != {MANIFEST_KEY, MANIFEST_SHA_KEY}:
        extra = sorted(set(meta) - {MANIFEST_KEY, MANIFEST_SHA_KEY})[:3]
        raise FormatError(f"{path}: unexpected safetensors metadata keys {extra} (or {MANIFEST_SHA_KEY!r} is "
                          "missing); the file was altered or not written by kvforge")
    manifest = parse_manifest(meta.get(MANIFEST_KEY), meta.get(MANIFEST_SHA_KEY), str(path))
    return manifest, header, 8 + n


def read(path: str | os.PathLike, *, verify: bool = True, keep_codes: bool = False) -> Artifact:
    """Load and check a ``.kv`` artifact. ``verify=False`` skips only the tensor digest.

    ``keep_codes``: a quantized artifact also keeps its stored codes (``Artifact.codes``), for a runtime
    that holds them resident instead of the dequantized keys and values.
    """
    manifest, tensors, nbytes = read_stored(path)
    kv = from_tensors(tensors, manifest, str(path), verify=verify)
    return Artifact(manifest=manifest, kv=kv, path=str(path), file_bytes=nbytes,
                    codes=stored_codes(tensors, manifest) if keep_codes else None)


def stored_codes(tensors: dict, manifest: dict) -> list | None:
    """Per layer :class:`~kvforge.quantize.QuantizedLayer` of checked stored tensors (None when not quantized)."""
    storage = manifest["storage"]
    if storage["quantization"] == "none":
        return None
    bits, dim = _quant.bits_of(storage["quantization"]), manifest["model"]["head_dim"]
    dtype = STORAGE_DTYPES[storage["dtype"]]
    return [_quant.QuantizedLayer(tensors[f"layer.{l}.keys"], tensors[f"layer.{l}.key_scale"],
                                  tensors[f"layer.{l}.key_min"], tensors[f"layer.{l}.values"],
                                  tensors[f"layer.{l}.value_scale"], bits, dim, dtype)
            for l in range(manifest["model"]["num_layers"])]


def read_stored(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], int]:
    """The checked manifest and the tensors exactly as stored (codes, not dequantized), and the file size."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    manifest, header, _ = read_header(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    check_tensor_set(set(header) - {"__metadata__"}, manifest, str(path))
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError, KeyError) as exc:
        raise FormatError(f"{path}: the tensor data is unreadable ({type(exc).__name__}: {exc}); the file is corrupt") from exc
    return manifest, tensors, len(data)


def check_tensor_set(found: set[str], manifest: dict, where: str) -> None:
    """Refuse a container whose tensor names differ from what the manifest implies (before reading data)."""
    storage = manifest["storage"]
    L = manifest["model"]["num_layers"]
    per_layer = 3 + (3 if storage["quantization"] != "none" else 0) + (1 if storage["has_beta"] else 0)
    if len(found) != 1 + L * per_layer:  # counted first: no name set is built for a lying num_layers
        raise FormatError(f"{where}: tensor set does not match the manifest: {len(found)} tensors, "
                          f"the manifest implies {1 + L * per_layer}")
    expected = tensor_names(L, storage["has_beta"], storage["quantization"])
    if found != expected:
        missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
        raise FormatError(f"{where}: tensor set does not match the manifest (missing {missing}, unexpected {extra})")


def from_tensors(tensors: dict, manifest: dict, where: str, *, verify: bool = True) -> CompressedKV:
    """Check stored tensors against the manifest (and, with ``verify``, the digest); the float ragged KV."""
    kv = _check_tensors(tensors, manifest, where)
    if verify and tensor_digest(tensors) != manifest["tensors_sha256"]:
        raise IntegrityError(f"{where}: tensor data does not match tensors_sha256; the file is corrupt, rebuild it")
    return kv


def _check_tensors(tensors: dict, manifest: dict, where: str) -> CompressedKV:
    m, doc, storage = manifest["model"], manifest["document"], manifest["storage"]
    L, H, D, T = m["num_layers"], m["num_kv_heads"], m["head_dim"], doc["logical_length"]
    dtype = STORAGE_DTYPES[storage["dtype"]]

    def expect(name, want_dtype, shape):
        t = tensors[name]
        if t.dtype != want_dtype or tuple(t.shape) != tuple(shape):
            raise FormatError(f"{where}: tensor {name}: expected {want_dtype} {tuple(shape)}, "
                              f"found {t.dtype} {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IntegrityError(f"{where}: tensor {name} holds NaN or Inf")
        return t

    lengths = expect("lengths", torch.int32, (L, H))
    if bool((lengths < 0).any()) or bool((lengths > T).any()):
        raise FormatError(f"{where}: tensor lengths: every entry must be in [0, {T}], found "
                          f"[{int(lengths.min())}, {int(lengths.max())}]")
    kept = int(lengths.sum())
    comp = manifest["compression"]
    if kept != comp["kept_entries"] or comp["total_entries"] != L * H * T:
        raise FormatError(f"{where}: compression.kept_entries / total_entries disagree with the lengths tensor "
                          f"({comp['kept_entries']}/{comp['total_entries']} vs {kept}/{L * H * T})")
    if abs(comp["keep_achieved"] - kept / (L * H * T)) > 1e-9:
        raise FormatError(f"{where}: compression.keep_achieved is {comp['keep_achieved']}, but the lengths tensor "
                          f"keeps {kept}/{L * H * T} = {kept / (L * H * T)}")
    quantization = storage.get("quantization", "none")
    bits = _quant.bits_of(quantization)
    if quantization == "int4" and D % 2:
        raise FormatError(f"{where}: storage.quantization int4 needs an even head_dim, found {D}")
    positions, keys, values, beta = [], [], [], []
    for layer in range(L):
        n = int(lengths[layer].sum())
        pos = expect(f"layer.{layer}.positions", torch.int32, (n,))
        if quantization == "none":
            keys.append(expect(f"layer.{layer}.keys", dtype, (n, D)))
            values.append(expect(f"layer.{layer}.values", dtype, (n, D)))
        else:
            width = D * bits // 8
            counts = [int(c) for c in lengths[layer].tolist()]
            k = _quant.dequantize_keys(expect(f"layer.{layer}.keys", torch.uint8, (n, width)),
                                       expect(f"layer.{layer}.key_scale", torch.float16, (H, D)),
                                       expect(f"layer.{layer}.key_min", torch.float16, (H, D)), counts, bits, D)
            v = _quant.dequantize_values(expect(f"layer.{layer}.values", torch.uint8, (n, width)),
                                         expect(f"layer.{layer}.value_scale", torch.float16, (n,)), bits, D)
            for name, t in (("keys", k), ("values", v)):
                t = t.to(dtype)
                if not bool(torch.isfinite(t).all()):
                    raise IntegrityError(f"{where}: layer {layer} {name} dequantize to NaN or Inf in {storage['dtype']}")
                (keys if name == "keys" else values).append(t)
        if storage["has_beta"]:
            beta.append(expect(f"layer.{layer}.beta", torch.float32, (n,)))
        if n:
            if int(pos.min()) < 0 or int(pos.max()) >= T:
                raise FormatError(f"{where}: tensor layer.{layer}.positions: positions must be in [0, {T})")
            # strictly increasing inside each head: a drop is allowed only where a new head starts
            starts = torch.zeros(n, dtype=torch.bool)
            off = torch.cumsum(lengths[layer], 0)[:-1]
            starts[off[off < n].long()] = True
            ok = (pos[1:] > pos[:-1]) | starts[1:]
            if not bool(ok.all()):
                raise FormatError(f"{where}: tensor layer.{layer}.positions: not strictly increasing within a head")
        positions.append(pos)
    return CompressedKV(lengths=lengths, positions=positions, keys=keys, values=values,
                        beta=beta if storage["has_beta"] else None)


def kv_bytes(kv: CompressedKV) -> int:
    """Bytes of the ragged tensors (keys, values, positions, beta, lengths) as held."""
    total = kv.lengths.numel() * kv.lengths.element_size()
    for group in (kv.keys, kv.values, kv.positions, kv.beta or []):
        total += sum(t.numel() * t.element_size() for t in group)
    return total


def summarize(art: Artifact) -> dict:
    """What ``kvforge inspect`` shows: the header plus kept counts per layer and head, and bytes."""
    m = art.manifest
    model, comp = m["model"], m["compression"]
    L, H, D, T = model["num_layers"], model["num_kv_heads"], model["head_dim"], art.logical_length
    fp16_full = L * 2 * H * D * 2 * T
    return {
        "path": art.path,
        "format": f"{m['format']} {m['version']}",
        "model": {k: model[k] for k in ("name", "architecture", "num_layers", "num_kv_heads", "head_dim")}
        | {"weights_sha256": model["weights_sha256"][:16], "tokenizer_sha256": model["tokenizer_sha256"][:16]},
        "document": m["document"],
        "method": comp["method"],
        "keep_requested": comp["keep_requested"],
        "keep_achieved": comp["keep_achieved"],
        "kept_entries": comp["kept_entries"],
        "total_entries": comp["total_entries"],
        "storage": m["storage"],
        "artifact_bytes": art.file_bytes,
        "bytes_per_token": art.file_bytes / T,
        "fp16_full_cache_bytes": fp16_full,
        "ratio_to_fp16_full": art.file_bytes / fp16_full,
        "kept_per_layer_head": art.kv.lengths.tolist(),
        "extra": comp.get("extra", {}),
    }


read = guard(read)
read_stored = guard(read_stored)
read_header = guard(read_header)
