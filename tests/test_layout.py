"""The import graph of the repository, read from the source (``ast``, nothing imported): layers only import
downwards (the operator, then the shared task code, then each task, then the reproduction, then the scripts), no
task imports another, and no module takes part in an import cycle, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("carafe", "tasks", "reproduction")
LAYERS = ("carafe", "tasks.common", "tasks.<task>", "reproduction", "scripts")


def _modules() -> dict[str, Path]:
    modules = {}
    for root in (*PACKAGES, "scripts"):
        for path in (REPO / root).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that defines ``name`` (a module, or an object inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_owner(a.name, modules) for a in node.names if a.name.split(".")[0] in PACKAGES}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in PACKAGES:
                # ``from pkg import submodule`` imports the submodule; ``from module import name`` the module
                targets |= {_owner(f"{node.module}.{a.name}", modules) for a in node.names}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def layer(module: str) -> int:
    if module.startswith("scripts"):
        return 4
    if module.startswith("reproduction"):
        return 3
    if module in ("tasks", "tasks.common") or module.startswith("tasks.common."):
        return 1
    return 2 if module.startswith("tasks.") else 0


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_on_a_hand_built_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e", "e2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_local_and_from_imports() -> None:
    graph = import_graph()
    assert "tasks.common.run_folder" in graph["tasks.common.engine"]
    assert "tasks.common.experiment" in graph["scripts.train"]
    assert {"carafe.downsamplers", "carafe.upsamplers"} <= graph["tasks.common.factories"]   # inside a function
    assert "reproduction.figures" in graph["reproduction.reproduce"]                          # inside a function
    assert len(graph) > 80 and sum(map(len, graph.values())) > 200


def test_every_import_points_down_the_layers_and_no_task_imports_another() -> None:
    graph = import_graph()
    upward = [f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if layer(t) > layer(m)]
    sideways = [f"{m} imports {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
                if layer(m) == layer(t) == 2 and m.split(".")[1] != t.split(".")[1]]
    assert not upward, "\n".join(upward)
    assert not sideways, "\n".join(sideways)


def test_no_module_takes_part_in_an_import_cycle() -> None:
    assert cycles(import_graph()) == []
