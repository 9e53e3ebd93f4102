"""The import graph of the `dsv4c` package has no cycles, no module imports another's private names, and `import
dsv4c` gives the public API cheaply.

The graph is read from the source (ast, nothing is imported): one edge per intra-package import, absolute
(`import dsv4c.x`, `from dsv4c.x import y`, `from dsv4c import x`) or relative (`from .x import y`). An import
names the module it loads: `from dsv4c.compiler import stages` is an edge to dsv4c.compiler.stages, `from
dsv4c.runtime import Engine` one to the package dsv4c.runtime (whose __init__ imports the engine). The parent
packages Python imports on the way are not edges of their own (every submodule would otherwise be in a cycle
with its package's __init__). Imports under `if TYPE_CHECKING:` never run and are left out; imports inside
functions run on first call and are kept, but apart: a cycle made only of module-level imports can break `import`
itself, one through a function-level import is a hidden coupling that a lazy import papers over.

Private names: an underscore name (`_helper`, or a module `_common`) is its module's own; importing it from another
module couples the two through something the owner may change freely. `_version` is the package's version module,
the one exception (its name is the setuptools-scm convention).
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dsv4c"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    source: str  # the importer's file, relative to the repository
    line: int
    in_function: bool

    def describe(self) -> str:
        where = "inside a function" if self.in_function else "module level"
        return f"{self.importer} -> {self.imported} ({where}, {self.source}:{self.line})"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, source: str, is_package: bool, known: set[str]):
        self.module, self.source, self.known = module, source, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.function_depth = 0
        self.imports: list[Import] = []

    def _add(self, name: str, node: ast.AST) -> None:
        target = self._nearest_module(name)
        if target is None:
            return
        imp = Import(self.module, target, self.source, node.lineno, self.function_depth > 0)
        if imp not in self.imports:  # `from m import a, b` is one import of m
            self.imports.append(imp)

    def _nearest_module(self, name: str) -> str | None:
        """`name` if it is a module of the package, else its closest enclosing one (an attribute of a module)."""
        while name:
            if name in self.known:
                return name
            name = name.rpartition(".")[0]
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module or "", node.level)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else base, node)

    def _absolute(self, module: str, level: int) -> str:
        if level == 0:
            return module
        package = self.package
        for _ in range(level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{module}" if module else package

    def _visit_function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: no edge
            for statement in node.orelse:
                self.visit(statement)
            return
        self.generic_visit(node)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_version"


def private_imports(root: Path = ROOT) -> list[str]:
    """`module:line imports name` for each import of an underscore name (or through an underscore module) of the
    package from another module of it."""
    found: list[str] = []
    for module, path in package_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                collector = _ImportCollector(module, "", path.name == "__init__.py", set())
                base = collector._absolute(node.module or "", node.level)
                names = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.partition(".")[0] != PACKAGE or name.rpartition(".")[0] == module:
                    continue
                parts = name.split(".")
                private = next((i for i, part in enumerate(parts) if _is_private(part)), None)
                if private is not None:  # named up to its first private part: one line per private thing
                    line = f"{path.relative_to(root)}:{node.lineno} imports {'.'.join(parts[:private + 1])}"
                    if line not in found:
                        found.append(line)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports(root: Path = ROOT) -> list[Import]:
    modules = package_modules(root)
    known = set(modules)
    imports = []
    for module, path in modules.items():
        source = str(path.relative_to(root))
        collector = _ImportCollector(module, source, path.name == "__init__.py", known)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += collector.imports
    return imports


def import_cycles(imports: list[Import]) -> list[list[Import]]:
    """One shortest cycle per strongly connected component of the graph (a self-import is a cycle too)."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports:
        graph[imp.importer].setdefault(imp.imported, imp)  # the first import of a module stands for the rest
    cycles = []
    for component in strongly_connected_components(graph):
        start = min(component)
        cycle = _shortest_cycle(graph, start, component)
        if cycle:
            cycles.append(cycle)
    return cycles


def strongly_connected_components(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the package is small, but recursion depth should not depend on it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    nodes = set(graph) | {m for targets in graph.values() for m in targets}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, {})))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str, component: set[str]) -> list[Import]:
    """The imports of a shortest path start -> ... -> start inside `component` (empty when there is none)."""
    came_by: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ, imp in sorted(graph.get(node, {}).items()):
            if succ not in component:
                continue
            if succ == start:
                path = [imp]
                while node != start:
                    path.append(came_by[node])
                    node = came_by[node].importer
                return path[::-1]
            if succ not in came_by:
                came_by[succ] = imp
                queue.append(succ)
    return []


def _report(cycles: list[list[Import]]) -> str:
    return "\n".join(f"import cycle {n}:\n" + "\n".join(f"  {imp.describe()}" for imp in cycle)
                     for n, cycle in enumerate(cycles, 1))


# ---- the checks ----------------------------------------------------------------------------------------------------
def test_no_import_cycle_among_module_level_imports():
    cycles = import_cycles([imp for imp in package_imports() if not imp.in_function])
    assert not cycles, "\n" + _report(cycles)


def test_no_import_cycle_counting_imports_inside_functions():
    cycles = import_cycles(package_imports())
    assert not cycles, "\n" + _report(cycles)


def test_no_module_imports_private_names_of_another():
    found = private_imports()
    assert not found, "private names imported across modules (make them public or keep them home):\n" + "\n".join(found)


def test_private_imports_are_found(tmp_path):
    """The scan itself, on a throwaway package: private names and modules, absolute and relative, are found;
    dunder names, `_version` and third-party private modules are not."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("from dsv4c._version import __version__\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "_hidden.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("_own = 1\n")
    (pkg / "b.py").write_text("from .a import _own\nfrom dsv4c.sub._hidden import X\nimport dsv4c.sub._hidden\n"
                              "from torch.utils import _pytree\nfrom dsv4c.sub.a import __doc__\n"
                              "def f():\n    from dsv4c.sub import a, _hidden\n")
    found = private_imports(tmp_path)
    assert [f.split(" imports ")[1] for f in found] == [
        "dsv4c.sub.a._own", "dsv4c.sub._hidden", "dsv4c.sub._hidden", "dsv4c.sub._hidden"], found


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    """The walker itself, on a throwaway package: a relative import cycle closed inside a function is found."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dsv4c.sub import c\n"
                              "def f():\n    from dsv4c.sub import a\n")
    (pkg / "c.py").write_text("from .. import sub\n")
    imports = package_imports(tmp_path)
    assert {(i.importer, i.imported, i.in_function) for i in imports} == {
        ("dsv4c.sub.a", "dsv4c.sub.b", False), ("dsv4c.sub.b", "dsv4c.sub.a", True),
        ("dsv4c.sub.c", "dsv4c.sub", False)}
    assert not import_cycles([i for i in imports if not i.in_function])
    [cycle] = import_cycles(imports)
    assert [i.importer for i in cycle] == ["dsv4c.sub.a", "dsv4c.sub.b"]
    assert "inside a function" in _report([cycle])
