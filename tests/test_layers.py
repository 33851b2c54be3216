"""Honest layers: no ctrkit module imports a layer above its own, the imports have no cycle, and
package imports sit at the top of modules.

The layers follow the folder layout, bottom to top (a module may import its own layer and those
below it): errors/version/registry, ownership, config, data, metrics, models, comm, optim,
distributed, strategies, train, serving (using a trained run), then the front ends (cli, bench,
the package's API). Imports inside functions count too, so a lazy import cannot hide an upward
edge. Registries (ctrkit/registry.py) are how a lower layer names what an upper one implements.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctrkit"

LAYERS = [("errors", "version", "registry"), ("ownership",), ("config",), ("data",), ("metrics",),
          ("models",), ("comm",), ("optim",), ("distributed",), ("strategies",), ("train",),
          ("serving",),
          ("cli", "config_doc", "bench", "__main__", "")]   # "": the package's own __init__ (the API)

# Known upward edges, each with what removes it; the test fails if one disappears, so the list
# only shrinks.
KNOWN_UPWARD: dict = {}
# Modules that may import ctrkit inside functions: the API facade keeps `import ctrkit` light,
# the CLI imports a command's module when it runs.
LAZY_ALLOWED = {"ctrkit", "ctrkit.cli", "ctrkit.bench"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), str(path))


def _imports(tree):
    """(imported ctrkit module, at module top?) for every import statement in the module."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "ctrkit" or name.startswith("ctrkit."):
                yield name, id(node) in top


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if first in names:
            return i
    raise AssertionError(f"{module}: no layer for '{first}'; add it to LAYERS")


def _graph():
    return {name: list(_imports(tree)) for name, tree in _modules()}


def test_no_module_imports_a_layer_above_its_own():
    upward = {(a, b) for a, edges in _graph().items() for b, _ in edges if _layer(b) > _layer(a)}
    new = sorted(upward - set(KNOWN_UPWARD))
    assert not new, "upward imports: " + ", ".join(f"{a} -> {b}" for a, b in new)
    gone = sorted(set(KNOWN_UPWARD) - upward)
    assert not gone, f"remove from KNOWN_UPWARD, they are gone: {gone}"


def test_imports_have_no_cycle():
    graph = _graph()
    edges = {a: {b for b, _ in bs if b in graph and b != a} for a, bs in graph.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_package_imports_sit_at_the_top_of_modules():
    lazy = sorted({f"{a} -> {b}" for a, edges in _graph().items() for b, at_top in edges
                   if not at_top and a not in LAZY_ALLOWED})
    assert not lazy, "imports inside functions: " + ", ".join(lazy)


def test_the_checks_see_a_violation(monkeypatch):
    """An upward edge, a cycle and a lazy import written into a module are each caught."""
    real = _modules

    def doctored():   # data.shards -> metrics (-> data.loader -> data.shards), and -> train lazily
        for name, tree in real():
            if name == "ctrkit.data.shards":
                tree.body += ast.parse("import ctrkit.metrics\n"
                                       "def f():\n    from ctrkit.train import trainer\n").body
            yield name, tree
    monkeypatch.setitem(globals(), "_modules", doctored)
    for check, what in [(test_no_module_imports_a_layer_above_its_own, "ctrkit.data.shards -> ctrkit.train"),
                        (test_package_imports_sit_at_the_top_of_modules, "ctrkit.data.shards -> ctrkit.train"),
                        (test_imports_have_no_cycle, "'ctrkit.data.shards'")]:
        try:
            check()
        except AssertionError as e:
            assert what in str(e), str(e)
        else:
            raise AssertionError(f"{check.__name__} missed the doctored import")
