"""The package in floors: its import graph has no cycle, every module imports in a fresh interpreter in
dependency order, no module is over 700 lines, imports sit at the top of modules (but for optional
dependencies), and no public function takes more than eight parameters unless its docstring says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("landscape", "analyses")
MAX_LINES = 700
MAX_PARAMETERS = 8
WHY_SO_MANY = "Why so many parameters:"  # the docstring phrase that explains a longer signature
# imported where used: a missing one fails only that feature
OPTIONAL_DEPENDENCIES = {"datasets", "kaleido", "submitit"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports at run time (``if TYPE_CHECKING:`` blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    try:
        order = list(TopologicalSorter(GRAPH).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle among the project's modules: {' -> '.join(err.args[1])}")
    assert set(order) == set(MODULES)


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    order = [m for m in TopologicalSorter(GRAPH).static_order() if not m.endswith("__main__")]  # those run
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\nprint(len(sys.argv) - 1)")
    done = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(len(order))


ENTRY_POINTS = ("landscape.__main__", "landscape.start")  # above the command line: they start it


def test_the_library_floors_import_nothing_above_them():
    """Foundations import no floor above them; the engine, curvature and quantization core no study, CLI or
    plot."""
    above = {
        "landscape.cache": {"landscape"}, "landscape.outputs": {"landscape"},
        "landscape.version": {"landscape"}, "landscape.weights": {"landscape"},
        "landscape.stats": {"landscape"}, "landscape.figio": {"landscape"},
        "landscape.data": {"landscape.models", "landscape.quant", "landscape.engine", "landscape.curvature",
                           "landscape.studies", "landscape.cli", "landscape.plots"},
    }
    for floor in ("landscape.quant", "landscape.engine", "landscape.curvature"):
        above |= {m: {"landscape.studies", "landscape.cli", "landscape.plots", "analyses"}
                  for m in MODULES if m.startswith(floor)}
    above |= {m: {"landscape.cli", "analyses"} for m in MODULES if m.startswith("landscape.")
              and not m.startswith("landscape.cli") and m not in ENTRY_POINTS}
    for name, forbidden in above.items():
        bad = {m for m in GRAPH[name] if any(m == f or m.startswith(f + ".") for f in forbidden)}
        if forbidden == {"landscape"}:  # a foundation: nothing of the project at all
            bad = set(GRAPH[name])
        assert not bad, f"{name} imports {sorted(bad)} from a floor above it"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("landscape")))
def test_no_library_module_is_over_700_lines(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES})"


def function_imports(path: Path) -> list[str]:
    """``line: statement`` of every import inside a function, but for optional dependencies."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    roots = ({a.name.split(".")[0] for a in inner.names} if isinstance(inner, ast.Import)
                             else {(inner.module or "").split(".")[0]})
                    if not roots <= OPTIONAL_DEPENDENCIES:
                        out.append(f"{inner.lineno}: {ast.unparse(inner)}")
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_sit_at_the_top_of_modules(name):
    if "marimo.App(" in MODULES[name].read_text(encoding="utf-8"):
        pytest.skip("a marimo notebook: each cell is a function that imports what it uses, by design")
    assert function_imports(MODULES[name]) == []


def long_signatures(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            n = len([a for a in names if a not in ("self", "cls")])
            if n > MAX_PARAMETERS and WHY_SO_MANY not in (ast.get_docstring(node) or ""):
                out.append(f"{node.lineno}: {node.name} takes {n} parameters")
    return out


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("landscape")))
def test_public_functions_take_at_most_eight_parameters_or_say_why(name):
    assert long_signatures(MODULES[name]) == []


def test_a_cycle_or_a_function_level_import_would_be_found(tmp_path):
    """The checks above can fail: a two-module cycle is reported, and so is an import inside a function."""
    graph = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import json\n    from datasets import load_dataset\n"
                      "    return json\n\n\ndef g(a, b, c, d, e, f, g, h, i):\n    pass\n")
    assert function_imports(module) == ["4: import json"]
    assert long_signatures(module) == ["9: g takes 9 parameters"]
