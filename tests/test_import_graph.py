"""No import cycles inside boltzflow.

Every module under ``boltzflow/`` (found with :func:`pkgutil.walk_packages`) is parsed with
:mod:`ast`, without importing it. Each ``import boltzflow.x.y`` and ``from boltzflow.x import y``
(relative imports resolved too) becomes an edge to a boltzflow module: ``from boltzflow.x import
y`` points at ``boltzflow.x.y`` when that is a module, else at ``boltzflow.x``. An edge is
*module-level* when the import runs while the module is imported (at the top, or inside a
module-level ``if``/``try``/``with`` or a class body, but not under ``if TYPE_CHECKING:``) and
*lazy* when it sits inside a function (it runs only when the function is called).

What is checked:

1. the module graph of module-level imports has no cycle, without exception (such a cycle is a
   real circular import: which module wins depends on who is imported first);
2. the module graph of all imports, lazy ones included, has no cycle, except through the lazy
   edges listed in :data:`ALLOWED_LAZY_EDGES` (each of which must still exist and be lazy, so
   the list only shrinks). A lazy import that closes a cycle (as ``workflow.runner`` importing
   ``build_stages`` from ``workflow.stages``, which imported ``workflow.runner``, once did) fails;
3. the package graph of all imports, lazy ones included, has no cycle: modules are grouped by
   their top-level package (``boltzflow.workflow.runner`` -> ``boltzflow.workflow``; a top-level
   module such as ``boltzflow.constants`` is its own group), imports within one package ignored.

Imports through ``importlib.import_module`` (the CLI's subcommands, the system builders) are
dynamic and not seen. A failure names the cycle, e.g. ``a -> b -> a``, and for each edge whether
it is module-level or lazy and on which line.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import pkgutil
from pathlib import Path

import boltzflow

ROOT = "boltzflow"

#: Known lazy edges that close a module cycle, ``(importer, imported)``; none remain. An entry
#: must name an edge that still exists and is lazy, so this set only shrinks.
ALLOWED_LAZY_EDGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """``{module name: source file}`` for every module and package under boltzflow."""
    found = {ROOT: Path(boltzflow.__file__)}
    for info in pkgutil.walk_packages(boltzflow.__path__, prefix=f"{ROOT}."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        found[info.name] = Path(spec.origin)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """Yield ``(import node, lazy)`` for every import statement of a parsed module."""

    def walk(node: ast.AST, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # the ``else`` of ``if TYPE_CHECKING`` does run
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy)
            else:
                yield from walk(child, lazy)

    yield from walk(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, modules) -> list[str]:
    """The boltzflow modules an import statement of module ``name`` points at."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == ROOT or a.name.startswith(f"{ROOT}.")]
    base = node.module or ""
    if node.level:
        parts = name.split(".") if is_pkg else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    if base != ROOT and not base.startswith(f"{ROOT}."):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else base)
    return out


def import_graph() -> dict[str, dict[str, tuple[bool, int]]]:
    """``{module: {imported module: (lazy, line)}}``; a module-level import of a target wins
    over a lazy one."""
    modules = _modules()
    graph: dict[str, dict[str, tuple[bool, int]]] = {m: {} for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node, lazy in _imports(tree):
            for target in _targets(node, name, is_pkg, modules):
                assert target in modules, f"{name}:{node.lineno} imports unknown {target}"
                if target == name:
                    continue
                old = graph[name].get(target)
                if old is None or (old[0] and not lazy):
                    graph[name][target] = (lazy, node.lineno)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of a directed graph, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _describe(cycle: list[str], resolve) -> str:
    steps = []
    for a, b in itertools.pairwise(cycle):
        src, dst, (lazy, line) = resolve(a, b)
        steps.append(f"  {src}:{line} imports {dst} ({'lazy' if lazy else 'module-level'})")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def module_level_edges(graph) -> dict[str, set[str]]:
    return {m: {t for t, (lazy, _) in ts.items() if not lazy} for m, ts in graph.items()}


def all_edges(graph, allowed=frozenset()) -> dict[str, set[str]]:
    return {m: {t for t in ts if (m, t) not in allowed} for m, ts in graph.items()}


def package_edges(graph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for m, ts in graph.items():
        pm = _package(m)
        edges.setdefault(pm, set())
        edges[pm].update(_package(t) for t in ts if _package(t) != pm)
    return edges


def test_module_level_imports_are_acyclic():
    graph = import_graph()
    cycle = find_cycle(module_level_edges(graph))
    assert cycle is None, "module-level import cycle:\n" + _describe(
        cycle, lambda a, b: (a, b, graph[a][b])
    )


def test_module_imports_including_lazy_are_acyclic():
    graph = import_graph()
    for edge in sorted(ALLOWED_LAZY_EDGES):
        assert graph[edge[0]].get(edge[1], (False,))[0], (
            f"{edge} is no longer a lazy import: drop it from ALLOWED_LAZY_EDGES"
        )
    cycle = find_cycle(all_edges(graph, ALLOWED_LAZY_EDGES))
    assert cycle is None, "import cycle (lazy imports included):\n" + _describe(
        cycle, lambda a, b: (a, b, graph[a][b])
    )


def test_package_imports_including_lazy_are_acyclic():
    graph = import_graph()
    cycle = find_cycle(package_edges(graph))

    def resolve(pa, pb):  # one module-level edge if there is one, else a lazy one
        pairs = [
            (m, t, e)
            for m, ts in graph.items()
            if _package(m) == pa
            for t, e in ts.items()
            if _package(t) == pb
        ]
        return min(pairs, key=lambda p: (p[2][0], p[0], p[1]))

    assert cycle is None, "package import cycle (lazy imports included):\n" + _describe(
        cycle, resolve
    )


def test_the_checks_see_cycles():
    """The checks are not vacuous: they find the runner <-> stages cycle this package once had
    (stages imported runner at module level, runner imported stages lazily), and a package
    cycle made by one upward import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    # the parser sees module-level and lazy imports for what they are
    assert graph["boltzflow.workflow.runner"]["boltzflow.workflow.stage"][0] is False
    assert graph["boltzflow.workflow.pipeline"]["boltzflow.workflow.stages"][0] is True
    old = all_edges(graph, ALLOWED_LAZY_EDGES)
    old["boltzflow.workflow.stages"].add("boltzflow.workflow.runner")  # module-level
    old["boltzflow.workflow.runner"].add("boltzflow.workflow.stages")  # lazy
    assert find_cycle(old) is not None
    edges = package_edges(graph)
    edges["boltzflow.sampling"].add("boltzflow.workflow")
    assert find_cycle(edges) is not None
