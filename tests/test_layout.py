"""The package's layout, read from its source: data flows one way, and files stay small.

Every ``import`` of every module counts, at module level, under ``TYPE_CHECKING``
or inside a function: a circle through any of them is a design knot even when
Python resolves it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "resumekit"
MAX_LINES = 500
WHY_ONE_FILE = "One file:"

#: What each part of the package may import of the rest of it (and itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_check": {"errors"},
    "_compat": set(),  # resolves the old paths by name, at run time
    "allocator": {"errors", "_check"},
    "protocol": {"errors", "_check", "allocator"},
    "transports": {"errors", "_check", "allocator", "protocol"},
    "integrations": {"errors", "_check", "allocator", "protocol", "transports"},
    "sim": {"errors", "_check", "allocator", "protocol", "transports"},
    "properties": {"errors", "_check", "allocator", "protocol", "transports", "integrations"},
    "cli": {"*"},
    "__main__": {"cli"},
    # the engine API: no checkers, simulators or CLI behind `import resumekit`
    "": {"errors", "allocator", "protocol", "transports", "_compat"},
}
#: Nothing of these in the protocol: it runs in the engine's event loop, in any process.
PROTOCOL_MAY_NOT_USE = ("threading", "socket", "zmq", "multiprocessing", "torch.distributed")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports: ``from a import b`` is ``a.b`` where that is a
    module of the package, else ``a``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


GRAPH = {
    name: {m for m in imports(path) if m == "resumekit" or m.startswith("resumekit.")}
    for name, path in MODULES.items()
}


def part(module: str) -> str:
    """The part of the package ``module`` belongs to (``""``: the top package itself)."""
    rest = module.removeprefix("resumekit").removeprefix(".")
    return rest.split(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle() -> None:
    assert cycles(GRAPH) == []


def test_each_part_imports_only_what_is_below_it() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        allowed = ALLOWED[part(module)]
        for target in targets:
            if "*" in allowed or part(target) == part(module) or part(target) in allowed:
                continue
            wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_only_the_checkers_the_cli_and_tests_import_the_checkers() -> None:
    importers = {
        module
        for module, targets in GRAPH.items()
        if any(part(t) == "properties" for t in targets) and part(module) != "properties"
    }
    assert {m for m in importers if part(m) != "cli"} == set()


def test_the_protocol_runs_no_threads_sockets_or_torch_distributed() -> None:
    wrong = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if part(module) == "protocol"
        for name in imports(path)
        if any(name == banned or name.startswith(banned + ".") for banned in PROTOCOL_MAY_NOT_USE)
    ]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_long_module_says_why_it_is_one_file(module: str) -> None:
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert WHY_ONE_FILE in docstring, (
        f"{path.relative_to(ROOT.parent)} has {lines} lines (> {MAX_LINES}); split it, or say "
        f"in its docstring, after '{WHY_ONE_FILE}', why it must be one file"
    )


def test_the_checks_can_fail() -> None:
    """Each rule, fed a graph that breaks it, says so (a check that checks nothing
    must not pass)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert part("resumekit.protocol.receiver") == "protocol" and part("resumekit") == ""
    assert "transports" not in ALLOWED["protocol"] and "properties" not in ALLOWED["sim"]
    assert "resumekit.protocol.receiver" in GRAPH["resumekit.protocol"]  # edges are read
    assert "resumekit.allocator.block_allocator" in GRAPH["resumekit.protocol.receiver"]
