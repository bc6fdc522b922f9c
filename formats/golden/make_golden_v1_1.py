"""Build the golden files of artifact format 1.1.0 (quantized storage) and library format 1.0.0 (zarr).

Inputs are the formulas of ``make_golden.py`` (no model, no randomness). Written
with kvforge's writer; never regenerated once released (a change gets a new
version folder). The tests read these files forever.

    python formats/golden/make_golden_v1_1.py            # writes formats/golden/v1.1.0/
    python formats/golden/make_golden_v1_1.py --check    # compares released .kv files with the writer's output
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VERSION = "1.1.0"
OUT_DIR = HERE / f"v{VERSION}"
LIBRARY = "library.zarr.zip"


def _base():
    spec = importlib.util.spec_from_file_location("kvforge_make_golden", HERE / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def golden_inputs() -> list[tuple[str, dict, object]]:
    """(file name, manifest without tensors_sha256, float CompressedKV) of every 1.1.0 .kv golden."""
    mg = _base()
    out = []
    # (d) int8 codes of float16 keys / values: 2 layers x 2 KV heads x head_dim 4, logical length 6
    lengths, positions = [[3, 2], [6, 1]], [[[0, 2, 5], [1, 4]], [[0, 1, 2, 3, 4, 5], [5]]]
    kv = mg._kv(lengths, positions, 4, torch.float16, with_beta=False)
    m = mg._manifest(doc_id="golden-d", doc_text="golden document d", L=2, A=4, H=2, D=4, T=6, kept=12,
                     dtype="float16", has_beta=False, method={"name": "compactor", "config": {}},
                     keep_requested=0.5, seed=0, extra={}, bos=None)
    m["version"], m["storage"]["quantization"] = VERSION, "int8"
    out.append(("int8_f16_L2_H2_D4_T6.kv", m, kv))
    # (e) int4 with beta and an empty head: 1 layer x 3 KV heads x head_dim 2, logical length 4
    lengths, positions = [[4, 0, 2]], [[[0, 1, 2, 3], [], [0, 3]]]
    kv = mg._kv(lengths, positions, 2, torch.float32, with_beta=True)
    m = mg._manifest(doc_id="golden-e", doc_text="golden document e", L=1, A=3, H=3, D=2, T=4, kept=6,
                     dtype="float32", has_beta=True, method={"name": "sculpt", "config": {"steps": 4}},
                     keep_requested=0.5, seed=3, extra={}, bos=0)
    m["version"], m["storage"]["quantization"] = VERSION, "int4"
    out.append(("int4_f32_beta_L1_H3_D2_T4.kv", m, kv))
    return out


def render(manifest: dict, kv) -> bytes:
    from kvforge import artifact

    manifest = copy.deepcopy(manifest)
    manifest["tensors_sha256"] = "0" * 64
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "golden.kv"
        artifact.write(path, manifest, kv)
        return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    from kvforge import convert

    kvs = [(name, render(m, kv)) for name, m, kv in golden_inputs()]
    if args.check:
        bad = [n for n, data in kvs if (args.out / n).read_bytes() != data]
        print("differs: " + ", ".join(bad) if bad else "all .kv goldens match the writer")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in kvs:
        if (args.out / name).exists():
            print(f"{name} exists; released goldens are never regenerated", file=sys.stderr)
            return 1
        (args.out / name).write_bytes(data)
    lib = args.out / LIBRARY
    if not lib.exists():
        # the library golden: the 1.0.0 float16 golden next to the two quantized ones, zipped
        sources = [HERE / "v1.0.0" / "f16_nobeta_L2_H2_D4_T6.kv"] + [args.out / n for n, _ in kvs]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "kv"
            folder.mkdir()
            for i, src in enumerate(sources):
                (folder / f"{i}.kv").write_bytes(src.read_bytes())
            convert.convert(folder, lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
