"""The benchmark docs and the results they cite stay in step (benchmarks/check_cited.py)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _check_cited():
    spec = importlib.util.spec_from_file_location("kvforge_check_cited", ROOT / "benchmarks" / "check_cited.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_tracked_result_is_cited_and_every_citation_is_tracked():
    uncited, broken = _check_cited().check()
    assert uncited == [], "tracked results nothing cites: cite them in BENCHMARKS.md / docs/ or git rm them"
    assert broken == [], "citations of results git does not track"


def test_a_mention_cites_a_file_and_a_glob_cites_nothing():
    cited = dict(_check_cited().mentions("see benchmarks/results/foundation.md and benchmarks/results/*.json"))
    assert "benchmarks/results/foundation.md" in cited
    assert not any("*" in m for m in cited)
