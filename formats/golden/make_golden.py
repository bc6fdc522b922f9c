"""Build the golden kvforge artifacts of format version 1.0.0, deterministically.

No model and no randomness: every tensor is a simple formula of ``torch.arange``
with values exactly representable in the storage dtype. ``golden_inputs()`` is
the source of truth the tests compare the released files against; ``main()``
writes them with the current writer (it refuses to overwrite a released file
unless ``--force`` is given: released goldens are never regenerated, a format
change gets a new version folder).

    python formats/golden/make_golden.py            # writes formats/golden/v1.0.0/*.kv
    python formats/golden/make_golden.py --check    # compares the released files with the writer's output
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VERSION = "1.0.0"
OUT_DIR = HERE / f"v{VERSION}"

_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def spec_digest(tensors: dict[str, torch.Tensor]) -> str:
    """``tensors_sha256`` exactly as spec section 4 words it, written independently of kvforge.artifact."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode("utf-8") + b"\0")
        h.update(_ST_NAMES[t.dtype].encode() + b"\0")
        h.update(_canonical(list(t.shape)).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # little-endian host, as the spec requires
    return h.hexdigest()


def spec_tensors(kv, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensor set of spec section 3, built independently of kvforge.artifact."""
    out = {"lengths": kv.lengths.to(torch.int32).contiguous()}
    for layer in range(len(kv.keys)):
        out[f"layer.{layer}.positions"] = kv.positions[layer].to(torch.int32).contiguous()
        out[f"layer.{layer}.keys"] = kv.keys[layer].to(dtype).contiguous()
        out[f"layer.{layer}.values"] = kv.values[layer].to(dtype).contiguous()
        if kv.beta is not None:
            out[f"layer.{layer}.beta"] = kv.beta[layer].to(torch.float32).contiguous()
    return out


def _kv(lengths: list[list[int]], positions: list[list[list[int]]], head_dim: int, dtype: torch.dtype,
        with_beta: bool):
    from kvforge.ragged import CompressedKV

    keys, values, pos, beta = [], [], [], []
    for layer, heads in enumerate(positions):
        flat = [p for head in heads for p in head]
        n = len(flat)
        grid = torch.arange(n * head_dim, dtype=torch.float32).reshape(n, head_dim)
        # quarters and halves in a small range: exact in float16, bfloat16 and float32
        keys.append(((grid - 8) / 4 + layer).to(dtype))
        values.append((-(grid / 2) + 3 * layer + 1).to(dtype))
        pos.append(torch.tensor(flat, dtype=torch.int32))
        if with_beta:
            beta.append(torch.arange(n, dtype=torch.float32) * -0.25 + layer)
    return CompressedKV(lengths=torch.tensor(lengths, dtype=torch.int32), positions=pos, keys=keys,
                        values=values, beta=beta if with_beta else None)


def _manifest(*, doc_id: str, doc_text: str, L: int, A: int, H: int, D: int, T: int, kept: int, dtype: str,
              has_beta: bool, method: dict, keep_requested: float, seed: int, extra: dict, bos) -> dict:
    total = L * H * T
    return {
        "format": "kvforge-artifact",
        "version": VERSION,
        "created_by": "kvforge 0.1.0",
        "model": {
            "name": "golden-tiny",
            "source": "embedded",
            "weights_sha256": _sha("golden-tiny weights"),
            "tokenizer_sha256": _sha("golden-tiny tokenizer"),
            "architecture": "LlamaForCausalLM",
            "num_layers": L,
            "num_attention_heads": A,
            "num_kv_heads": H,
            "head_dim": D,
            "max_context": 2048,
        },
        "document": {"id": doc_id, "sha256": _sha(doc_text), "logical_length": T},
        "template": {
            "doc_prefix": "<|im_start|>system\n",
            "question_prefix": "<|im_end|>\n<|im_start|>user\n",
            "question_suffix": "<|im_end|>\n<|im_start|>assistant\n",
            "bos_token_id": bos,
        },
        "compression": {
            "method": method,
            "keep_requested": keep_requested,
            "keep_achieved": kept / total,
            "kept_entries": kept,
            "total_entries": total,
            "seed": seed,
            "extra": extra,
        },
        "storage": {"dtype": dtype, "quantization": "none", "has_beta": has_beta},
    }


def _golden(filename: str, manifest: dict, kv) -> tuple[str, dict, object]:
    manifest = copy.deepcopy(manifest)
    manifest["tensors_sha256"] = spec_digest(spec_tensors(kv, _DTYPES[manifest["storage"]["dtype"]]))
    return filename, manifest, kv


def golden_inputs() -> list[tuple[str, dict, object]]:
    """(file name, complete manifest as the reader returns it, CompressedKV) of every v1.0.0 golden."""
    goldens = []

    # (a) float16, no beta, 2 layers x 2 KV heads x head_dim 4, logical length 6, ragged per head
    lengths = [[3, 2], [6, 1]]
    positions = [[[0, 2, 5], [1, 4]], [[0, 1, 2, 3, 4, 5], [5]]]
    kv = _kv(lengths, positions, 4, torch.float16, with_beta=False)
    m = _manifest(doc_id="golden/a.txt", doc_text="golden document a", L=2, A=4, H=2, D=4, T=6, kept=12,
                  dtype="float16", has_beta=False, method={"name": "snapkv", "config": {"window": 2}},
                  keep_requested=0.5, seed=0, extra={}, bos=None)
    goldens.append(_golden("f16_nobeta_L2_H2_D4_T6.kv", m, kv))

    # (b) float32 with beta, 3 layers x 1 KV head x head_dim 2, logical length 5, one layer keeps nothing,
    #     non-ASCII text in the manifest (canonical JSON writes it as UTF-8)
    lengths = [[2], [5], [0]]
    positions = [[[1, 3]], [[0, 1, 2, 3, 4]], [[]]]
    kv = _kv(lengths, positions, 2, torch.float32, with_beta=True)
    m = _manifest(doc_id="golden/b-übung-日本.txt", doc_text="Übung macht den Meister. 日本", L=3, A=2, H=1, D=2,
                  T=5, kept=7, dtype="float32", has_beta=True,
                  method={"name": "compactor", "config": {"chunk": 4, "fit_beta": True, "ratio": 0.5}},
                  keep_requested=0.5, seed=1234, extra={"calibration": {"layers": [0.25, 1.0, 0.0]}}, bos=1)
    goldens.append(_golden("f32_beta_L3_H1_D2_T5.kv", m, kv))

    # (c) bfloat16, no beta, 1 layer x 3 KV heads x head_dim 2, logical length 4, a head that keeps nothing
    lengths = [[4, 0, 2]]
    positions = [[[0, 1, 2, 3], [], [0, 3]]]
    kv = _kv(lengths, positions, 2, torch.bfloat16, with_beta=False)
    m = _manifest(doc_id="golden/c.txt", doc_text="golden document c", L=1, A=3, H=3, D=2, T=4, kept=6,
                  dtype="bfloat16", has_beta=False, method={"name": "streaming", "config": {"sink": 1}},
                  keep_requested=0.5, seed=7, extra={}, bos=0)
    goldens.append(_golden("bf16_nobeta_L1_H3_D2_T4.kv", m, kv))
    return goldens


def metadata_keys(data: bytes) -> list[str]:
    """The ``__metadata__`` keys of a .kv file's header, in file order."""
    n = int.from_bytes(data[:8], "little")
    return list(json.loads(data[8:8 + n])["__metadata__"])


def render(manifest: dict, kv, tries: int = 64) -> bytes:
    """The bytes the current writer produces for one golden, with the ``__metadata__`` keys in sorted order.

    safetensors' ``save`` (0.8) emits ``__metadata__`` in Rust HashMap order, which is random per call, so
    the writer has two possible outputs; the goldens are pinned to the canonical one (keys sorted, as in the
    manifest's canonical JSON). The tests require the writer to produce exactly these bytes.
    """
    import tempfile

    from kvforge import artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "golden.kv"
        for _ in range(tries):
            artifact.write(path, manifest, kv)
            data = path.read_bytes()
            if metadata_keys(data) == sorted(metadata_keys(data)):
                return data
    raise RuntimeError("the writer never emitted the __metadata__ keys in sorted order")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--force", action="store_true", help="overwrite existing files (never for a released version)")
    ap.add_argument("--check", action="store_true", help="only compare existing files with the writer's output")
    args = ap.parse_args(argv)

    from kvforge import artifact

    status = 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, manifest, kv in golden_inputs():
        path = args.out / name
        data = render(manifest, kv)
        if args.check:
            same = path.exists() and path.read_bytes() == data
            print(f"{'ok' if same else 'DIFFERS'}  {path}")
            status |= not same
            continue
        if path.exists() and not args.force:
            print(f"exists, not overwritten: {path}")
            continue
        artifact.atomic_write_bytes(path, data)
        print(f"wrote {path} ({len(data)} bytes)")
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    sys.exit(main())
