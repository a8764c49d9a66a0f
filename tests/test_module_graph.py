"""The package's folders show its layers: from the import graph of every module, imports inside
functions counted, no module imports another in a cycle, and none imports from a layer above its own.

Layers, bottom to top (docs/architecture.md, "Layout of the repository"): base < core < data < modelio, vllm_env <
run, evaluate < methods, publish < training < the application (``pard_train.__main__``, every ``__main__``, the thin
command modules ``export``, ``derive``, ``gguf``, ``teacher_cache``). ``testing`` (tiny models) sits beside evaluate,
and the tiny presets may import it from any layer. Imports under ``if TYPE_CHECKING:`` are annotations, not imports,
and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pard_train"
LAYERS = {
    "base": 0,
    "core": 1,
    "data": 2,
    "modelio": 3,
    "vllm_env": 3,
    "run": 4,
    "evaluate": 4,
    "testing": 4,
    "methods": 5,
    "publish": 5,
    "training": 6,
}
APPLICATION = 7
EVERYWHERE = {"testing"}  # the tiny presets build their models with it


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Every pard_train module ``tree`` imports, at any depth, except under ``if TYPE_CHECKING:``."""

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names if alias.name.startswith("pard_train"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pard_train"):
            for alias in node.names:  # ``from pard_train.x import y`` imports the module x.y when there is one
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else resolve(node.module))
        stack.extend(ast.iter_child_nodes(node))
    return found - {""}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = _imported(ast.parse(path.read_text(), str(path)), modules) - {name}
    return graph


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if parts[-1] == "__main__" or len(parts) <= 2 and parts[-1] not in LAYERS:
        return "application", APPLICATION  # pard_train, its __main__s and its thin command modules
    return parts[1], LAYERS[parts[1]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    assert "pard_train.core.layout" in graph and "pard_train.training.train" in graph  # the graph is the package's
    unplaced = [m for m in graph if layer(m)[0] == "application" and m.count(".") == 1 and not m.endswith("__main__")]
    assert sorted(unplaced) == [
        "pard_train.derive",
        "pard_train.export",
        "pard_train.gguf",
        "pard_train.teacher_cache",
    ], unplaced


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, imports in import_graph().items():
        name, rank = layer(module)
        for other in imports:
            other_name, other_rank = layer(other)
            if other_name == name or other_name in EVERYWHERE or other_name == "application" and name == "application":
                continue
            if other_rank >= rank:
                upward.append(f"{module} ({name}) imports {other} ({other_name})")
    assert upward == []


def test_the_checks_see_cycles_and_upward_imports():
    """The checks can fail: a cycle and an upward import, in a made-up graph, are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from pard_train.training import train\n")
    assert _imported(tree, {"pard_train.training.train": PACKAGE}) == {"pard_train.training.train"}
    assert layer("pard_train.core.layout") < layer("pard_train.training.train")
