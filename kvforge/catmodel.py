"""A model trained by ``kvforge train cat``: a base model plus a low-rank weight delta, merged at load.

A CAT model is a directory of a few MB, not a copy of the model (the embedded model's delta is 3.6 MB
against 540 MB of merged float32 weights, small enough to ship inside the package):

    kvforge-cat.json     format, the base model (its spec and identity), the delta's sha256 and scale,
                         the training record
    delta.safetensors    per adapted linear layer ``NAME``: ``NAME.A`` (r, in) and ``NAME.B`` (out, r),
                         float32; the merged weight is ``W + scale * B @ A``

Loading reads the base model (the embedded default or the local directory it records, whose weights
and tokenizer must hash as recorded), adds every delta to its weight in place, and gives the result its
own identity: ``weights_sha256 = sha256("kvforge-cat:" + base weights sha256 + ":" + delta sha256)``.
Artifacts built with a CAT model are therefore refused by its base model and the other way round.

Merging needs only torch and safetensors: the runtime loads a CAT model without peft or kvforge.train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .errors import FormatError, IncompatibleModelError, ModelNotFoundError

FORMAT = "kvforge-cat-model"
FORMAT_VERSION = 1
CAT_FILE = "kvforge-cat.json"
DELTA_FILE = "delta.safetensors"
EMBEDDED_CAT = "embedded-cat"


def shipped_cat_dir() -> Path:
    """The CAT model shipped inside the package for the embedded model (trained on Python's documentation)."""
    return Path(__file__).resolve().parent / "adapters" / "cat-smollm2"


def is_cat_dir(path: Path) -> bool:
    return (Path(path) / CAT_FILE).is_file()


def read_cat_meta(directory: Path) -> dict:
    try:
        meta = json.loads((Path(directory) / CAT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{directory}: cannot read {CAT_FILE}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{directory}: not a {FORMAT} v{FORMAT_VERSION} (found {meta.get('format')!r} "
                          f"v{meta.get('format_version')!r}); retrain it with `kvforge train cat`")
    return meta


def delta_sha256(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / DELTA_FILE).read_bytes()).hexdigest()


def read_delta(directory: Path, meta: dict) -> tuple[dict, str]:
    """The delta's tensors (``NAME.A`` (r, in), ``NAME.B`` (out, r)) and sha256, checked against ``meta``."""
    from safetensors.torch import load_file

    path = Path(directory) / DELTA_FILE
    if not path.is_file():
        raise FormatError(f"{directory}: {DELTA_FILE} is missing; the CAT model is incomplete")
    digest = delta_sha256(directory)
    if digest != meta["delta"].get("sha256"):
        raise FormatError(f"{directory}: {DELTA_FILE} does not match the sha256 its {CAT_FILE} records")
    return load_file(str(path)), digest


def cat_weights_sha256(base_weights_sha256: str, delta_sha: str) -> str:
    """The identity of base + delta (what artifacts built with the CAT model record)."""
    return hashlib.sha256(f"kvforge-cat:{base_weights_sha256}:{delta_sha}".encode()).hexdigest()


def merge_delta(model, delta: dict, scale: float) -> int:
    """Add ``scale * B @ A`` to every named linear weight of ``model`` in place; returns the layers merged."""
    import torch

    names = sorted({key.rsplit(".", 1)[0] for key in delta})
    with torch.no_grad():
        for name in names:
            try:
                linear = model.get_submodule(name)
            except AttributeError as exc:
                raise IncompatibleModelError(f"the CAT delta adapts {name!r}, which the base model does not have") \
                    from exc
            a, b = delta.get(f"{name}.A"), delta.get(f"{name}.B")
            if a is None or b is None or tuple(linear.weight.shape) != (b.shape[0], a.shape[1]):
                raise FormatError(f"the CAT delta for {name!r} is incomplete or has the wrong shape")
            w = linear.weight
            w.add_((scale * (b.double() @ a.double())).to(device=w.device, dtype=w.dtype))
    return len(names)


def load_cat(directory: Path, *, source: str, device: str, dtype: str, load_base):
    """A :class:`~kvforge.model.LoadedModel` of the CAT model in ``directory``.

    ``load_base(spec, device, dtype)`` loads a fresh (uncached: it is changed in place) copy of the base.
    """
    directory = Path(directory)
    meta = read_cat_meta(directory)
    base = meta["base"]
    delta, digest = read_delta(directory, meta)
    try:
        lm = load_base(base["spec"], device, dtype)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the CAT model {directory} is trained on {base.get('name')!r} "
                                 f"({base['spec']}), which cannot be loaded here: {exc}") from exc
    for key in ("weights_sha256", "tokenizer_sha256"):
        have = getattr(lm.info, key)
        if have != base.get(key):
            raise IncompatibleModelError(
                f"the CAT model {directory} was trained on {base.get('name')!r} ({key} {str(base.get(key))[:12]}...), "
                f"but {base['spec']} now has {have[:12]}...; retrain it with `kvforge train cat --model ...`")
    merge_delta(lm.model, delta, float(meta["delta"]["scale"]))
    name = meta.get("name") or directory.name
    info = dataclasses.replace(lm.info, name=name, source=source,
                               weights_sha256=cat_weights_sha256(lm.info.weights_sha256, digest))
    return dataclasses.replace(lm, info=info)


__all__ = ["CAT_FILE", "DELTA_FILE", "EMBEDDED_CAT", "cat_weights_sha256", "is_cat_dir", "load_cat", "merge_delta",
           "read_cat_meta", "read_delta", "shipped_cat_dir"]
