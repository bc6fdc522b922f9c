"""The import rules of docs/architecture.md, checked on the source (every import, lazy ones included).

The runtime side (what an app ships to answer from artifacts) never imports the build,
evaluation or training side; nothing imports the CLI; methods do not reach back into the
build driver. A new module lands on one side by being listed here and in docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvforge"

RUNTIME_SIDE = ["kvforge.runtime", "kvforge.doccache", "kvforge.decoder", "kvforge.serve", "kvforge.attention", "kvforge.artifact", "kvforge.library", "kvforge.manifest",
                "kvforge.containers", "kvforge.quantize", "kvforge.ragged", "kvforge.model", "kvforge.catmodel", "kvforge.errors",
                "kvforge.options", "kvforge.verify", "kvforge.convert", "kvforge.devices", "kvforge.architectures"]
BUILD_SIDE = ["kvforge.builder", "kvforge.methods", "kvforge.calibrate", "kvforge.budget", "kvforge.prefill",
              "kvforge.corpus", "kvforge.eval", "kvforge.train", "kvforge.executors"]
CLI = ["kvforge.cli", "kvforge.cli_options", "kvforge.cli_train"]  # the interface: parses and prints
MAX_LINES = 400  # past this a module is a room that has grown past what a newcomer can hold: split it


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every kvforge module ``name`` imports, at any depth of its source (functions included).

    The package facade ``kvforge`` is the exception: its functions import each side on first use
    (``kvforge.build`` the builder, ``kvforge.load`` the runtime), so only its module-level imports count.
    """
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in (tree.body if name == "kvforge" else ast.walk(tree)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES}
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _closure(roots) -> dict[str, list[str]]:
    """Every module reachable from ``roots``, with one import chain that reaches it."""
    chains = {r: [r] for r in roots if r in GRAPH}
    todo = list(chains)
    while todo:
        current = todo.pop()
        for nxt in sorted(GRAPH[current]):
            if nxt not in chains:
                chains[nxt] = chains[current] + [nxt]
                todo.append(nxt)
    return chains


def _on_side(module: str, side: list[str]) -> bool:
    return any(module == s or module.startswith(s + ".") for s in side)


def test_the_graph_sees_the_known_imports():  # the checker itself works: a rule on an empty graph proves nothing
    assert "kvforge.artifact" in GRAPH["kvforge.runtime"]
    assert "kvforge.library.reader" in GRAPH["kvforge.library"]
    assert "kvforge.methods" in GRAPH["kvforge.builder"]


def test_every_module_is_on_one_side():
    for name in MODULES:
        sides = _on_side(name, RUNTIME_SIDE) + _on_side(name, BUILD_SIDE)
        assert sides == 1 or name in ["kvforge", "kvforge.__main__"] + CLI, \
            f"{name} is on no side (or both): list it in tests/test_architecture.py and docs/architecture.md"


@pytest.mark.parametrize("root", [m for m in MODULES if _on_side(m, RUNTIME_SIDE)])
def test_the_runtime_side_never_imports_the_build_side(root):
    for module, chain in _closure([root]).items():
        assert not _on_side(module, BUILD_SIDE), f"runtime-side {root} reaches {' -> '.join(chain)}"
        assert module not in CLI, f"{' -> '.join(chain)}: only the entry point imports the CLI"


def test_nothing_imports_the_cli():
    for name, deps in GRAPH.items():
        if name not in ["kvforge.__main__"] + CLI:
            assert not deps & set(CLI), f"{name} imports the CLI; the CLI parses and prints only"


def test_methods_do_not_reach_back_into_the_build_driver():
    for root in [m for m in MODULES if _on_side(m, ["kvforge.methods"])]:
        for module, chain in _closure([root]).items():
            assert not _on_side(module, ["kvforge.builder", "kvforge.eval", "kvforge.calibrate", "kvforge.budget",
                                         "kvforge.executors", "kvforge.train.loop", "kvforge.train.data",
                                         "kvforge.train.targets"]), \
                " -> ".join(chain)  # a learned method loads its adapter (kvforge.train.adapter), never the training loop


def test_loading_the_runtime_loads_no_build_module():
    code = ("import sys, kvforge.runtime, kvforge.library, kvforge.verify\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('kvforge')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if _on_side(m, BUILD_SIDE)] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines; split it by concern (docs/architecture.md)"
