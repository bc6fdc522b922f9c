"""Where the model runs and in which dtype: ``--device`` / ``--compute-dtype`` resolved and checked.

    resolve_device("auto")            -> "cuda" when CUDA is there, else "mps", else "cpu"
    resolve_device("cuda:7")          -> DeviceError on a machine with fewer GPUs, naming those it has
    resolve_compute_dtype("auto", d)  -> bfloat16 on CUDA (float16 where bfloat16 is missing), float16 on MPS,
                                         on CPU :data:`CPU_DEFAULT_DTYPE` (what measured best, docs/experiments/devices.md)
    training_compute_dtype("auto", d) -> the same, except bfloat16 on a CPU with native bfloat16 arithmetic

The compute dtype is how the model computes, never what an artifact stores (``--dtype``) and never part of
the model's fingerprint: an artifact built on one device or dtype answers on any other.
Environment: ``KVFORGE_DEVICE``, ``KVFORGE_COMPUTE_DTYPE`` (the CLI's ``envvar=``; the Python API reads them
when given ``None``).
"""

from __future__ import annotations

import os

from .errors import DeviceError
from .options import AUTO, COMPUTE_DTYPES, check_choice

DEVICE_ENV = "KVFORGE_DEVICE"
DTYPE_ENV = "KVFORGE_COMPUTE_DTYPE"
# On this project's CPU (2 cores, AVX-512 BF16), quiet machine: bfloat16 was even with float32 for a question's
# forward, 1.5x slower decoding and 1.8-2.2x faster for a long prefill (docs/experiments/devices.md): float32
# answers best; `--compute-dtype bfloat16` is the faster build.
CPU_DEFAULT_DTYPE = "float32"
# Training a distill adapter is prefill-heavy too: with the frozen model in bfloat16 (the LoRA and the scorer stay
# float32) the default man-page fine-tune took 27.2 minutes against 32.7 in float32, at the same quality on unseen
# pages (docs/experiments/distill.md). `train cat` likewise: the shipped CAT recipe ran 1.09x faster and gave the same
# model on the validation split (docs/experiments/cat.md). Only where the CPU has bfloat16 arithmetic: elsewhere it
# is emulated.
CPU_TRAINING_DTYPE = "bfloat16"


def _torch():
    import torch

    return torch


def available_devices() -> list[str]:
    """The devices this machine has, as ``--device`` spells them."""
    torch = _torch()
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | None = None) -> str:
    """``None`` -> ``$KVFORGE_DEVICE`` or ``auto``; returns ``cpu``, ``cuda:N`` or ``mps`` (checked to exist)."""
    torch = _torch()
    spec = str(spec if spec not in (None, "") else os.environ.get(DEVICE_ENV) or AUTO).strip().lower()
    have = available_devices()
    if spec == AUTO:
        return "cuda:0" if any(d.startswith("cuda") for d in have) else ("mps" if "mps" in have else "cpu")
    kind, _, index = spec.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps "
                          f"(this machine has: {', '.join(have)})")
    if kind == "cpu":
        return "cpu"
    if kind == "mps":
        if "mps" not in have:
            raise DeviceError(f"device 'mps' was asked but this machine has no Apple MPS device "
                              f"(available: {', '.join(have)}); pass --device cpu or auto")
        return "mps"
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"device {spec!r} was asked but this machine has no CUDA GPU ({why}; torch "
                          f"{torch.__version__}; available: {', '.join(have)}); pass --device cpu or auto")
    n = torch.cuda.device_count()
    i = int(index or 0)
    if i >= n:
        raise DeviceError(f"device {spec!r} was asked but this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                          f"(cuda:0..cuda:{n - 1}; available: {', '.join(have)})")
    return f"cuda:{i}"


def _dtype_spec(spec: str | None) -> str:
    """``None`` or "" -> ``$KVFORGE_COMPUTE_DTYPE`` or ``auto``; lower-cased."""
    return str(spec if spec not in (None, "") else os.environ.get(DTYPE_ENV) or AUTO).strip().lower()


def resolve_compute_dtype(spec: str | None, device: str) -> str:
    """``None`` -> ``$KVFORGE_COMPUTE_DTYPE`` or ``auto``; a dtype name from :data:`options.COMPUTE_DTYPES`
    that ``device`` runs (checked with a small matrix product there)."""
    torch = _torch()
    spec = _dtype_spec(spec)
    check_choice("compute dtype", spec, (AUTO,) + COMPUTE_DTYPES)
    if spec == AUTO:
        if device.startswith("cuda"):
            spec = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device == "mps":
            spec = "float16"
        else:
            spec = CPU_DEFAULT_DTYPE
    check_runs(spec, device)
    return spec


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), as torch's kernels detect it."""
    cpu = _torch().cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def training_compute_dtype(spec: str | None, device: str) -> str:
    """As :func:`resolve_compute_dtype`, for a training run (``kvforge train distill`` or ``cat``): ``auto`` on a CPU
    with native bfloat16 arithmetic is :data:`CPU_TRAINING_DTYPE`."""
    spec = _dtype_spec(spec)
    if spec == AUTO and device == "cpu" and cpu_has_bfloat16():
        spec = CPU_TRAINING_DTYPE
    return resolve_compute_dtype(spec, device)


_RUNS: dict[tuple[str, str], str | None] = {}


def check_runs(dtype: str, device: str) -> None:
    """DeviceError unless ``device`` computes in ``dtype`` (a matmul, a softmax; cached per pair)."""
    torch = _torch()
    key = (dtype, device)
    if key not in _RUNS:
        _RUNS[key] = None
        try:
            if device.startswith("cuda") and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
                raise RuntimeError("bfloat16 needs compute capability 8.0 or newer")
            x = torch.ones(8, 8, dtype=getattr(torch, dtype), device=device)
            torch.softmax(x @ x, dim=-1).float().sum().item()
        except (RuntimeError, TypeError) as exc:
            _RUNS[key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _RUNS[key] is not None:
        raise DeviceError(f"compute dtype {dtype!r} was asked but device {device!r} cannot run it "
                          f"({_RUNS[key]}); pass --compute-dtype float32 or auto")


def torch_dtype(name: str):
    """The torch dtype named ``name`` (one of :data:`options.COMPUTE_DTYPES`)."""
    return getattr(_torch(), check_choice("compute dtype", name, COMPUTE_DTYPES))
