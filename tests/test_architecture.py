"""The package's import graph, built from the source: no cycle, imports only point down the
floors written here once, and no function-level import of a switchmoe module (the way a cycle
hides) outside a short allow-list.

The floors read bottom-up, as the README's module table and the package's folders do:
foundations, data, the MoE core, the models, settings, runs, interop, training, and the tools
that use a trained run. A module may import its own floor and the floors below it.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "switchmoe")

FLOORS = (
    ("base", ("switchmoe.bootstrap", "switchmoe.sharding", "switchmoe.distributed")),
    ("data", ("switchmoe.data",)),
    ("moe", ("switchmoe.moe",)),
    ("models", ("switchmoe.models",)),
    ("settings", ("switchmoe.config", "switchmoe.optim", "switchmoe.muon", "switchmoe.presets")),
    ("runs", ("switchmoe.runs",)),
    ("interop", ("switchmoe.interop",)),
    ("training", ("switchmoe.training",)),
    ("tools", ("switchmoe.generation", "switchmoe.compress", "switchmoe.analysis",
               "switchmoe.sweeps", "switchmoe.cli")),
)  # fmt: skip

# Function-level imports of switchmoe modules that are allowed: the router registry imports
# every router module, whose base class looks routers up in it when called.
ALLOWED_LOCAL = {("switchmoe.moe.routers.base", "switchmoe.moe.routers")}


def modules(package_dir=PACKAGE, name="switchmoe") -> dict[str, str]:
    """{dotted module name: file} of a package directory."""
    out = {}
    for directory, _, files in os.walk(package_dir):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(directory, file), package_dir)
                dotted = ".".join([name, *rel[:-3].split(os.sep)])
                out[dotted.removesuffix(".__init__")] = os.path.join(directory, file)
    return out


def imports(mods: dict[str, str]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported, at module level, line) for every import of a package module."""
    edges = []
    for module, path in mods.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports the submodule; `from mod import name` the module.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target in mods and target != module:
                    edges.append((module, target, id(node) in top, node.lineno))
    return edges


def floor_of(module: str) -> int:
    for level, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise KeyError(module)


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(mods) -> list[str]:
    edges = imports(mods)
    allowed = [(a, b, t, n) for a, b, t, n in edges if t or (a, b) not in ALLOWED_LOCAL]
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(allowed)]
    for a, b, at_top, line in edges:
        if not at_top and (a, b) not in ALLOWED_LOCAL:
            found.append(f"function-level import: {a}:{line} imports {b}")
        if floor_of(b) > floor_of(a):
            found.append(
                f"upward import: {a}:{line} ({FLOORS[floor_of(a)][0]}) imports {b} "
                f"({FLOORS[floor_of(b)][0]})"
            )
    return found


def test_every_module_has_a_floor():
    missing = [m for m in modules() if m != "switchmoe" and _floorless(m)]
    assert not missing, f"give these a floor in FLOORS: {missing}"


def _floorless(module):
    try:
        floor_of(module)
    except KeyError:
        return True
    return False


def test_the_import_graph_is_a_layered_dag():
    assert problems({m: p for m, p in modules().items() if m != "switchmoe"}) == []


@pytest.mark.parametrize("plant", ["cycle", "upward", "local"])
def test_a_planted_violation_is_caught(tmp_path, plant):
    pkg = tmp_path / "switchmoe"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "pipeline.py").write_text("import numpy\n")
    (pkg / "config.py").write_text("from switchmoe.data import pipeline\n")
    (pkg / "optim.py").write_text("from switchmoe import config\n")
    mods = {m: p for m, p in modules(str(pkg)).items() if m != "switchmoe"}
    assert problems(mods) == []
    if plant == "cycle":
        (pkg / "config.py").write_text(
            "from switchmoe.data import pipeline\nfrom switchmoe import optim\n"
        )
        expected = "cycle: switchmoe.config <-> switchmoe.optim"
    elif plant == "upward":
        (pkg / "data" / "pipeline.py").write_text("from switchmoe.config import x\n")
        expected = (
            "upward import: switchmoe.data.pipeline:1 (data) imports switchmoe.config (settings)"
        )
    else:
        (pkg / "optim.py").write_text("def f():\n    from switchmoe import config\n")
        expected = "function-level import: switchmoe.optim:2 imports switchmoe.config"
    assert expected in problems(mods)
