"""``kvforge eval`` from option strings to a written report: parse and check the options, run, report.

The CLI hands over what the user typed (comma-separated lists) and prints what comes back;
everything is checked here before the model loads, so a typo costs no model load.
The work itself is :func:`kvforge.eval.runner.run` and :func:`kvforge.eval.report.write_report`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..options import check_tolerance, parse_allocations, parse_keeps, parse_list


def parse_against(value: str) -> list[str]:
    """``"kvpress"`` (its five presses) or ``"kvpress:Press1,Press2"`` -> press names, each made once to fail early."""
    from . import kvpress_adapter

    if not value:
        return []
    name, _, listed = value.partition(":")
    if name != "kvpress":
        raise ConfigError(f"--against {value!r}: only kvpress is supported")
    presses = parse_list(listed) if listed else list(kvpress_adapter.PRESSES)
    for press in presses:
        kvpress_adapter.make_press(press, 0.5)  # fail early: kvpress missing or a press unknown
    return presses


def parse_kinds(value: str | None) -> list[str]:
    """Task kinds, comma-separated; ``None``: every kind."""
    from .tasks import KINDS

    kinds = parse_list(value) if value else list(KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ConfigError(f"unknown task kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    return kinds


def parse_methods(value: str) -> list[str]:
    """kvforge method specs, comma-separated (``sculpt:steps=20:blend=0.5``), each resolved once."""
    from ..methods import get_method

    specs = parse_list(value)
    for spec in specs:
        get_method(spec)
    return specs


def parse_sources(sources: str | None, split: str | None) -> list[str]:
    """``--sources a,b`` or ``--split tuning|heldout|validation`` (every source of that split); neither:
    python-reference."""
    from .sources import check_sources, of_split

    if sources and split:
        raise ConfigError("give --sources or --split, not both")
    if split:
        return check_sources(of_split(split))
    return check_sources(parse_list(sources) if sources else ["python-reference"])


def eval_config(*, methods: str, keeps: str, tolerance: float, allocations: str, tasks: str | None, lengths: str,
                samples: int, against: str, seed: int, max_new_tokens: int, sources: str | None = None,
                split: str | None = None, phrasings: str | None = None):
    """The checked :class:`~kvforge.eval.runner.EvalConfig` of ``kvforge eval``'s option strings."""
    from .phrasings import check_phrasings
    from .runner import EvalConfig

    source_list = parse_sources(sources, split)
    if phrasings is not None:
        check_phrasings(phrasings)

    presses = parse_against(against)
    kinds = parse_kinds(tasks)
    method_specs = parse_methods(methods)
    keep_list = parse_keeps(keeps)
    tolerance = check_tolerance(tolerance)
    allocation_list = parse_allocations(allocations)
    return EvalConfig(methods=method_specs, keeps=keep_list, kinds=kinds,
                      lengths=parse_list(lengths, int, "--lengths"), samples=samples, seed=seed, against=presses,
                      max_new_tokens=max_new_tokens, tolerance=tolerance, allocations=allocation_list,
                      sources=source_list, phrasings=phrasings)


def evaluate(cfg, out: str | Path, model=None, progress: bool = True) -> dict:
    """Run (or resume) ``cfg`` into ``out`` and write the report; returns the summary.

    The budget heat maps show every kvforge method at the smallest numeric keep (the first task's).
    """
    from .report import write_report
    from .runner import model_identity, run
    from ..model import load_model

    lm = load_model(model)
    budgets: dict = {}
    numeric = [k for k in cfg.keeps if k != "auto"]

    def keep_budget(task, method, keep, compressed):
        label = f"{method} keep {keep}"
        if method != "full" and numeric and keep == min(numeric) and label not in budgets:
            budgets[label] = compressed.lengths.float().numpy()

    out = Path(out)
    rows = run(lm, cfg, out, progress=progress, on_kv=keep_budget)
    return write_report(rows, out, budgets, model=model_identity(lm))
