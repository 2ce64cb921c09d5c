"""The package's layers import one way (DESIGN.md, "Layering"), read from the source with ``ast``.

Every import counts: module level, inside functions, under ``if TYPE_CHECKING``, relative ones
resolved. ``from package import name`` is an edge to the submodule ``package.name`` when there is
one, else to the package itself (its ``__init__``). Importing ``a.b.c`` also runs the packages
``a`` and ``a.b``, but those implicit edges are not counted: a layer checker that counted them
would see every module depend on ``protozoo/__init__.py``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "protozoo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str, modules) -> str | None:
    """``name`` or its longest prefix that is a protozoo module (None outside the package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules) -> set[str]:
    """The protozoo modules ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level-1 packages
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                     for alias in node.names]
        else:
            continue
        found.update(t for t in (_target(n, modules) for n in names) if t and t != module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_reader_sees_every_kind_of_import(tmp_path):
    modules = {"protozoo", "protozoo.a", "protozoo.pkg", "protozoo.pkg.b", "protozoo.pkg.c"}
    source = tmp_path / "c.py"
    source.write_text("import os\nfrom . import b\nfrom .. import a\n"
                      "def f():\n    from protozoo import pkg\n    import protozoo.pkg.b as x\n"
                      "if True:\n    from ..a import thing\n")
    assert imports_of("protozoo.pkg.c", source, modules) == {"protozoo.pkg.b", "protozoo.a",
                                                            "protozoo.pkg"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("importer, forbidden", [
    ("protozoo.data", "protozoo.models"),  # datasets never know the models
    ("protozoo.render", "protozoo.evaluation"),  # drawing never runs an evaluation
    ("protozoo.engine", "protozoo.models"),  # the loop knows no family module
    ("protozoo.render", "protozoo.explain"),  # drawing never runs an explainer
    ("protozoo.explain", "protozoo.evaluation"),  # explainers judged without the run evaluation
])
def test_forbidden_imports(importer, forbidden):
    bad = sorted(f"{a} imports {b}" for a, targets in import_graph().items()
                 if _within(a, importer) for b in targets if _within(b, forbidden))
    assert not bad, "; ".join(bad)


GENERIC = ["engine.py", "evaluation.py", "render/reports.py", "render/vqa_report.py"]


@pytest.mark.parametrize("name", GENERIC)
def test_generic_code_names_no_family(name):
    """The engine, the evaluation and the report dispatch ask the model; they never test its
    name (every registered family, as a whole word, anywhere in the file)."""
    import protozoo

    families = set(protozoo.list_models()) | {"protopnet", "cam", "han", "san", "rn",
                                              "cnn_lstm", "niwt"}
    text = (PACKAGE / name).read_text()
    found = sorted({m.group(0) for family in families
                    for m in re.finditer(rf"\b{re.escape(family)}\b", text, re.IGNORECASE)})
    assert not found, f"{name} names {', '.join(found)}"
