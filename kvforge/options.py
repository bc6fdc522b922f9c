"""The one home of build-option validation: the allowed values, and the checks every entry point shares.

``BuildConfig.make`` (the Python API), the ``kvforge build`` / ``kvforge eval`` options,
:class:`~kvforge.eval.runner.EvalConfig` and :class:`~kvforge.methods.Budget` all check through
these functions, so an option is refused the same way, with the same message, wherever it
enters. Light on purpose (no torch): the CLI builds its ``click.Choice`` lists from these
constants at import time.
"""

from __future__ import annotations

import math

from .errors import ConfigError

AUTO = "auto"  # --keep auto: calibrated per document (kvforge.calibrate)
ALLOCATIONS = ("uniform", "pilot")  # per-head budgets: the method's own split, or a pilot run's (kvforge.budget)
FORMATS = ("kv", "zarr")  # build output: a folder of .kv files, or one zarr v3 library
# The storage dtypes and quantizations the artifact writer knows, as plain names so that parsing imports no
# torch (kvforge.artifact maps them to torch dtypes, kvforge.quantize.SCHEMES to bits; tests/test_options.py
# checks that every quantization has its bits).
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "int8", "int4")
EXECUTORS = ("local", "ray")  # who maps build_document over the corpus: this process, or a Ray actor pool
# Where the model runs and how it computes (kvforge.devices resolves and checks them; neither enters an artifact).
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # cuda:N spelled with the GPU's index
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_choice(option: str, value, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of ``allowed``, else a ConfigError naming the option and the choices."""
    if value not in allowed:
        choices = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
        raise ConfigError(f"{option} must be {choices}, got {value!r}")
    return value


def is_auto(keep) -> bool:
    return isinstance(keep, str) and keep.strip().lower() == AUTO


def check_keep(keep, *, auto: bool = True) -> float | str:
    """A keep ratio as a float in (0, 1], or ``"auto"`` (when ``auto`` allows it)."""
    if auto and is_auto(keep):
        return AUTO
    allowed = "(0, 1] or 'auto'" if auto else "(0, 1]"
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise ConfigError(f"keep must be a number in {allowed}, got {keep!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"keep must be in {allowed}, got {value}")
    return value


def check_tolerance(tolerance) -> float:
    """The tolerance of ``--keep auto``: a finite number > 0 (mean KL in nats per token)."""
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise ConfigError(f"tolerance must be a number > 0, got {tolerance!r}") from None
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"tolerance must be a finite number > 0 (mean KL in nats per token), got {value}")
    return value


def check_keep_and_tolerance(keep, tolerance, default_tolerance: float) -> tuple[float | str, float | None]:
    """(keep, tolerance) of one build: a tolerance goes with keep ``auto`` only, and defaults there."""
    keep = check_keep(keep)
    if keep == AUTO:
        return keep, check_tolerance(default_tolerance if tolerance is None else tolerance)
    if tolerance is not None:
        raise ConfigError("--tolerance applies to --keep auto only; drop it or pass --keep auto")
    return keep, None


def check_storage(dtype: str, quant: str) -> None:
    """The storage dtype of keys and values, and their quantization."""
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if quant not in QUANTIZATIONS:
        raise ConfigError(f"quant must be one of {', '.join(QUANTIZATIONS)}, got {quant!r}")


def check_executor(executor: str, workers=None, threads_per_worker=None,
                   ray_address: str | None = None) -> tuple[str, int | None, int | None, str | None]:
    """(executor, workers, threads per worker, Ray address), checked; ``None`` leaves a default to the executor.

    The local executor is one worker in this process (``threads_per_worker`` sets its torch
    threads); ``workers`` above 1 and a Ray address need ``executor="ray"``.
    """
    check_choice("executor", executor, EXECUTORS)
    workers = _positive_int("workers", workers)
    threads_per_worker = _positive_int("threads-per-worker", threads_per_worker)
    if ray_address is not None and not str(ray_address).strip():
        ray_address = None
    if executor == "local":
        if workers is not None and workers > 1:
            raise ConfigError(f"--workers {workers} needs --executor ray; the local executor is one worker "
                              "(set its torch threads with --threads-per-worker)")
        if ray_address is not None:
            raise ConfigError("--ray-address applies to --executor ray only; drop it or pass --executor ray")
    return executor, workers, threads_per_worker, ray_address


def _positive_int(option: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ConfigError(f"--{option} must be a whole number >= 1, got {value!r}")
    if int(value) < 1:
        raise ConfigError(f"--{option} must be >= 1, got {value!r}")
    return int(value)


def check_allocations(allocations, option: str = "allocations") -> list[str]:
    """A non-empty list of allocations, each one of :data:`ALLOCATIONS`."""
    allocations = list(allocations)
    if not allocations or set(allocations) - set(ALLOCATIONS):
        raise ConfigError(f"{option} {','.join(map(str, allocations))!r}: give {', '.join(ALLOCATIONS)} or both")
    return allocations


# -- option strings (comma-separated lists), as kvforge eval takes them ------------------------------
def parse_list(value: str, cast=str, option: str = "") -> list:
    """``"a, b,c"`` -> ``[cast("a"), cast("b"), cast("c")]``; empty items are dropped."""
    try:
        return [cast(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option + ': ' if option else ''}{value!r}: {exc}") from None


def parse_number(value: str, option: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{option}: {value!r} is not a number") from None


def parse_keeps(value: str, option: str = "--keep") -> list[float | str]:
    """``"auto,0.5,0.25"`` -> ``["auto", 0.5, 0.25]``, every keep checked."""
    keeps = [k if k == AUTO else parse_number(k, option) for k in parse_list(value)]
    for k in keeps:
        try:
            check_keep(k)
        except ConfigError:
            raise ConfigError(f"{option} {value!r}: every keep must be in (0, 1] or 'auto'") from None
    return keeps


def parse_allocations(value: str, option: str = "--allocate") -> list[str]:
    """``"uniform,pilot"`` -> ``["uniform", "pilot"]``, each one of :data:`ALLOCATIONS`."""
    return check_allocations(parse_list(value), option)
