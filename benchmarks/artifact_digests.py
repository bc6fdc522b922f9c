"""Digests of the artifacts a fixed set of builds writes: proof that a refactoring changed no byte.

Builds a small corpus (three passages of Python's own documentation) with the tiny random
Llama the tests use (``tests/conftest.py``; seeded, built offline) through the real CLI, over
a matrix of methods, keeps, storage and containers: ``.kv`` folders, a zarr library, its zip
and the ``.kv`` files converted back out of it. Every file written is hashed (sha256), after
dropping the fields that are wall-clock times, wherever they are (``library.json``, a zarr
group's build entry, the manifest inside a ``.kv`` header or a zarr group): ``build_seconds``,
the calibration's ``seconds``, and the manifest digests that cover them. Nothing else is
normalized: tensor bytes, every other manifest field and the layout are compared as written.

    python benchmarks/artifact_digests.py --out before.json            # at the old commit
    python benchmarks/artifact_digests.py --check before.json          # at the new one: exit 1 on any difference
    python benchmarks/artifact_digests.py --tree ../old-checkout --out before.json   # another checkout's code

The work folder has a fixed path, because a manifest records the model's path. The digests
depend on the CPU's floating-point results as well as on the code: compare runs
made on one machine with one torch version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (output name, build options); every build reads the same corpus with the same tiny model
BUILDS = [
    ("full", ["--method", "full"]),
    ("compactor-0.5", ["--method", "compactor", "--keep", "0.5"]),
    ("compactor-auto", ["--method", "compactor", "--keep", "auto"]),
    ("knorm-0.25-int8", ["--method", "knorm", "--keep", "0.25", "--quant", "int8"]),
    ("compactor-0.25-int4", ["--method", "compactor", "--keep", "0.25", "--quant", "int4"]),
    ("select_fit-0.3-pilot", ["--method", "select_fit", "--keep", "0.3", "--allocate", "pilot"]),
    ("sculpt-0.3", ["--method", "sculpt:init=select_fit:grad=0:steps=4", "--keep", "0.3", "--dtype", "float32"]),
    ("sculpt-0.2-pilot-bf16", ["--method", "sculpt:init=select_fit:grad=0:steps=4", "--keep", "0.2", "--allocate", "pilot",
                               "--dtype", "bfloat16"]),
    ("lib.zarr", ["--method", "compactor", "--keep", "0.5", "--quant", "int8"]),
]
CONVERTS = [("lib.zarr", "lib.zarr.zip"), ("lib.zarr.zip", "from-zip")]


TIMES = {"build_seconds", "seconds", "manifest_sha256", "kvforge.manifest_sha256"}


def _drop_times(obj):
    """``obj`` without wall-clock fields; JSON held in strings (manifests) is normalized too."""
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("{"):
        try:
            return _drop_times(json.loads(obj))
        except ValueError:
            return obj
    return obj


def _canonical(obj) -> bytes:
    return json.dumps(_drop_times(obj), sort_keys=True).encode()


def _digest(name: str, data: bytes) -> str:
    if name.endswith(".json"):
        data = _canonical(json.loads(data))
    elif name.endswith(".kv"):  # safetensors: u64 header size, JSON header, tensor bytes
        n = int.from_bytes(data[:8], "little")
        data = _canonical(json.loads(data[8:8 + n])) + data[8 + n:]
    return hashlib.sha256(data).hexdigest()


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (zip files: of every member, and of the member list)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                out[rel + "!names"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
                for n in names:
                    out[f"{rel}!{n}"] = _digest(n, zf.read(n))
        else:
            out[rel] = _digest(path.name, path.read_bytes())
    return out


def run(tree: Path, work: Path) -> dict[str, str]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import _make_model  # the tests' tiny model, seeded and built offline

    import pydoc_data.topics as topics

    model = _make_model(work / "model", "llama", seed=0)
    corpus = work / "corpus"
    corpus.mkdir()
    for name in ("assert", "pass", "del"):
        (corpus / f"{name}.txt").write_text(topics.topics[name][:1200])
    env = dict(os.environ, PYTHONPATH=str(tree), KVFORGE_HOME=str(work / "home"))
    out = work / "out"
    out.mkdir()

    def kvforge(*args):
        subprocess.run([sys.executable, "-m", "kvforge", *args], env=env, check=True, cwd=work,
                       stdout=subprocess.DEVNULL)

    for name, opts in BUILDS:
        kvforge("build", str(corpus), "-o", str(out / name), "--model", str(model), "--no-progress", *opts)
    for src, dst in CONVERTS:
        kvforge("convert", str(out / src), str(out / dst))
    return digests(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose kvforge/ builds (default: this one)")
    ap.add_argument("--out", type=Path, help="write the digests here (JSON)")
    ap.add_argument("--check", type=Path, help="compare with digests written earlier; exit 1 on any difference")
    args = ap.parse_args(argv)
    # a fixed folder: the model's path is recorded in every manifest (model.source)
    work = Path(tempfile.gettempdir()) / "kvforge-artifact-digests"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        found = run(args.tree.resolve(), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"{len(found)} files hashed")
    if args.check:
        want = json.loads(args.check.read_text())
        diff = sorted(k for k in want.keys() | found.keys() if want.get(k) != found.get(k))
        for k in diff:
            print(f"differs: {k}  ({want.get(k, 'missing')[:12]} -> {found.get(k, 'missing')[:12]})")
        print("identical" if not diff else f"{len(diff)} of {len(want)} differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
