"""Training: learned compressors trained offline on the library they will compress.

``distill`` trains a KV-Distill adapter (a token scorer and LoRA adapters routed to the kept tokens;
kvforge.train.adapter) on a corpus; ``cat`` continues training the model itself so that its cache
compresses better (KV-CAT; the result is a CAT model, kvforge.catmodel). peft is imported in this package only, and only the build side
imports the package: an artifact built with an adapter is answered by the base model.
"""

from __future__ import annotations


def distill(sources, out, **options) -> dict:
    """Train a distill adapter on ``sources`` into ``out`` (see :func:`kvforge.train.loop.distill`)."""
    from .loop import distill as run

    return run(sources, out, **options)


def cat(sources, out, **options) -> dict:
    """Train a CAT model on ``sources`` into ``out`` (see :func:`kvforge.train.cat_train.train_cat`)."""
    from .cat_train import train_cat

    return train_cat(sources, out, **options)


__all__ = ["cat", "distill"]
