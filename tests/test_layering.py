"""The package's import structure: no import circle, and no import up the layers.

Read from the source with ``ast`` (nothing is imported), counting every ``import`` of an anllm module,
at module level or inside a function (a function-level import is still a dependency; it only hides
the circle from the interpreter), except those under ``if TYPE_CHECKING:`` (annotations only). Runs
in well under a second.

The layers, lowest first; a module may import its own layer and those below it, never one above:

    errors, utils -> masks -> anchors -> cache -> attention/modeling/models
      -> the config sections the data reads (schema.core/confdir/train) -> data
      -> train, eval and the programs' schemas (schema) -> study, cli, lm_eval, testing, the package
         root (its public facade) and every ``__main__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("anllm.errors", "anllm.utils"),
    ("anllm.masks",),
    ("anllm.anchors",),
    ("anllm.cache",),
    ("anllm.attention", "anllm.modeling", "anllm.models"),
    ("anllm.schema.confdir", "anllm.schema.core", "anllm.schema.train"),
    ("anllm.data",),
    ("anllm.train", "anllm.eval", "anllm.schema"),
    ("anllm.study", "anllm.cli", "anllm.lm_eval", "anllm.testing", "anllm"),
)
TOP = len(LAYERS) - 1


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "anllm").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported anllm module: first line}}``; ``from pkg import name`` counts as importing
    the submodule ``pkg.name`` when there is one, else ``pkg`` itself."""

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    out: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        here = out.setdefault(mod, {})
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == "anllm" or a.name.startswith("anllm.")]
            else:
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base != "anllm" and not base.startswith("anllm."):
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                t = known(t)
                if t != mod:
                    here.setdefault(t, node.lineno)
    return out


def layer_of(mod: str) -> int:
    if mod.rpartition(".")[2] == "__main__":
        return TOP  # a program, not a library module: nothing imports it
    best, rank = "", None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank is not None, f"{mod} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return rank


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _describe(component: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    inside = set(component)
    edges = [f"  {mods[a].relative_to(SRC)}:{line} imports {b}" for a in component
             for b, line in sorted(graph[a].items()) if b in inside]
    return "circle " + " <-> ".join(component) + "\n" + "\n".join(edges)


def test_no_import_circle_inside_anllm():
    mods = modules()
    graph = imports(mods)
    found = circles(graph)
    assert not found, "\n".join(_describe(c, graph, mods) for c in found)


def test_no_module_imports_a_layer_above_its_own():
    mods = modules()
    upward = [f"{mods[a].relative_to(SRC)}:{line} imports {b} (layer {layer_of(b)} > {layer_of(a)})"
              for a, targets in imports(mods).items() for b, line in targets.items() if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_the_checker_sees_circles_and_upward_imports(tmp_path):
    """The check itself: a planted circle (function-level, as the data <-> sft one was) and an upward
    import are found; an import under ``if TYPE_CHECKING:`` is not a dependency."""
    pkg = tmp_path / "anllm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "masks.py").write_text("def f():\n    from .data import sft\n")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "processing.py").write_text("def f():\n    from .sft import g\n")
    (pkg / "data" / "sft.py").write_text("from .processing import f\n")
    (pkg / "data" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import masks\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        mods = modules()
        graph = imports(mods)
        assert circles(graph) == [["anllm.data.processing", "anllm.data.sft"]]
        assert "anllm.masks" not in graph["anllm.data.typed"]
        assert graph["anllm.masks"] == {"anllm.data.sft": 2}
        assert layer_of("anllm.data.sft") > layer_of("anllm.masks")
    finally:
        SRC = saved
