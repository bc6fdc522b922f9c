"""Training: learned compressors trained offline on the library they will compress.

``distill`` trains a KV-Distill adapter (a token scorer and LoRA adapters routed to the kept tokens;
kvforge.train.adapter) on a corpus. peft is imported in this package only, and only the build side
imports the package: an artifact built with an adapter is answered by the base model.
"""

from __future__ import annotations


def distill(sources, out, **options) -> dict:
    """Train a distill adapter on ``sources`` into ``out`` (see :func:`kvforge.train.loop.distill`)."""
    from .loop import distill as run

    return run(sources, out, **options)


__all__ = ["distill"]
