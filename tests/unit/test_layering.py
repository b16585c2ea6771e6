"""Imports flow one way: the public modules sit on top of ``farpool._private``.

Every ``import`` statement in the package is read with ``ast`` (those inside
functions too: a lazy import is still a dependency), and the test fails on

- a module of ``farpool._private`` importing anything of ``farpool`` outside
  ``farpool._private`` except the leaf ``farpool.exceptions``;
- any cycle among the package's modules, named module by module;
- any source file longer than ``MAX_LINES`` (the package is all of src/).
"""

import ast
import os

import farpool

PACKAGE_DIR = os.path.dirname(farpool.__file__)
# What _private may import from above it: leaves that import nothing of farpool.
PRIVATE_MAY_IMPORT = {"farpool.exceptions", "farpool._version"}
# No source file longer than this: a module that outgrows it is split into parts
# (as node.py and head.py are: node_*.py, head_actors.py).
MAX_LINES = 800


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[_module_name(path)] = path
    return found


def _imports(module: str, path: str, known: set) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from farpool._private import client` imports the submodule client.
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import farpool.x.y` -> the deepest module we have
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_the_walker_sees_imports_of_every_kind():
    graph = _graph()
    assert "farpool._private.protocol" in graph["farpool._private.client"]  # from farpool._private import x
    assert "farpool.exceptions" in graph["farpool._private.client"]           # from farpool import x
    assert "farpool._private.runtime" in graph["farpool.actor"]               # lazy or not, by name
    assert "farpool._private.client" in graph["farpool._private.runtime"]


def test_private_never_imports_the_public_modules():
    upward = []
    for module, imported in sorted(_graph().items()):
        if not module.startswith("farpool._private"):
            continue
        for name in sorted(imported):
            if not name.startswith("farpool._private") and name not in PRIVATE_MAY_IMPORT:
                upward.append(f"{module} imports {name}")
    assert not upward, ("farpool._private must not import the public modules above it (only "
                        f"{sorted(PRIVATE_MAY_IMPORT)}):\n  " + "\n  ".join(upward))


def test_the_leaves_import_nothing_of_farpool():
    graph = _graph()
    for leaf in PRIVATE_MAY_IMPORT:
        assert not graph[leaf], f"{leaf} is a leaf but imports {sorted(graph[leaf])}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a cycle path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph, component) -> str:
    """The component's modules and every import among them: each is an edge that could be cut."""
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return f"{', '.join(component)}: " + "; ".join(edges)


def test_no_import_cycles():
    graph = _graph()
    cycles = [_one_cycle(graph, c) for c in _cycles(graph)]
    assert not cycles, "import cycles in farpool:\n  " + "\n  ".join(cycles)


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _one_cycle(graph, ["a", "b", "c"]) == "a, b, c: a -> b; b -> c; c -> a"


def _line_count(path: str) -> int:
    """Lines as ``wc -l`` counts them: newline characters."""
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def test_no_source_file_is_longer_than_max_lines():
    counts = sorted(((_line_count(path), os.path.relpath(path, os.path.dirname(PACKAGE_DIR)))
                     for path in _modules().values()), reverse=True)
    too_long = [f"{name}: {count} lines" for count, name in counts if count > MAX_LINES]
    assert not too_long, (f"source files longer than {MAX_LINES} lines (split them into parts):\n  "
                          + "\n  ".join(too_long))
