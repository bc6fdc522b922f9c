"""What every benchmark script records and how it writes its results."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch


def environment(lm) -> dict:
    """Date, machine and versions: the header every result carries."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": lm.info.name,
    }


def write_results(out: str | Path, name: str, result: dict, render: Callable[[dict], str]) -> None:
    """OUT/<name>.json (raw numbers) and OUT/<name>.md (the table for BENCHMARKS.md); prints the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(render(result))
    print(render(result))
