"""The package's import picture stays true: every module imports only its own tier or lower,
and no import cycle exists. Imports are read from the source with ``ast`` (function-level ones
included, ``if TYPE_CHECKING:`` blocks excluded, as they never run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pgm_dist"

# Tier of each top-level part of the package (a folder, or a file directly in pgm_dist/).
TIERS = {
    "common": 0,
    "attention": 1, "models": 1, "data": 1,
    # the package root, its public API (load_model reads checkpoints: tier 3, imported on first use)
    "pgm_dist": 3,
    "objectives": 2, "sampling": 2, "evaluation": 2,
    "images": 3, "checkpoints": 3,
    "training": 4,
    "distillation": 5,
    "cluster": 6,
}
COMMAND_TIER = 7
COMMANDS = {"pgm_dist.train", "pgm_dist.distill", "pgm_dist.sample", "pgm_dist.evaluate", "pgm_dist.export",
            "pgm_dist.convert",
            "pgm_dist.memory", "pgm_dist.data.__main__",
            "pgm_dist.slurm_job"}  # the in-job task's old path, an alias kept for one release


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _runtime_imports(tree: ast.AST):
    """Import nodes that run: all of them except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``module`` imports (a name imported from a package that is itself a
    module counts as that module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(package)
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def tier_of(module: str) -> int:
    if module in COMMANDS:
        return COMMAND_TIER
    parts = module.split(".")
    return TIERS[parts[1] if len(parts) > 1 else parts[0]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that goes up a tier or reaches a command, as a sentence naming it."""
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in COMMANDS:
                wrong.append(f"{module} imports the command {target} (commands are imported by nobody)")
            elif tier_of(target) > tier_of(module):
                wrong.append(f"{module} (tier {tier_of(module)}) imports {target} (tier {tier_of(target)})")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def levels(graph: dict[str, set[str]]) -> int:
    """Import levels of an acyclic graph: 1 + the longest chain of imports."""
    depth: dict[str, int] = {}

    def level(module: str) -> int:
        if module not in depth:
            depth[module] = 1 + max((level(t) for t in graph[module]), default=-1)
        return depth[module]

    return 1 + max(map(level, graph))


GRAPH = import_graph()


def test_every_module_has_a_tier():
    assert [m for m in GRAPH if m not in COMMANDS and (m.split(".") + [""])[1] not in TIERS and m != "pgm_dist"] == []


def test_no_module_imports_up_a_tier_or_a_command():
    wrong = upward_imports(GRAPH)
    assert not wrong, "imports against the tiers:\n" + "\n".join(wrong)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_picture_stays_as_deep_as_it_is():
    """11 levels (the longest chain: cluster.submit -> cluster.job -> distillation.task -> .teacher ->
    .config -> .objective -> training.components -> models -> models.pgm -> models.layers ->
    attention); a deeper picture is a design decision, not an accident."""
    assert levels(GRAPH) <= 11


def test_the_reader_finds_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pgm_dist"
    (pkg / "common").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common" / "__init__.py").write_text("")
    (pkg / "common" / "a.py").write_text("def f():\n    from pgm_dist.training import b\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pgm_dist.cluster import c\nfrom ..common import a\n")
    (pkg / "cluster").mkdir()
    (pkg / "cluster" / "__init__.py").write_text("")
    (pkg / "cluster" / "c.py").write_text("")
    graph = import_graph(pkg)
    assert graph["pgm_dist.common.a"] == {"pgm_dist.training.b"}
    assert graph["pgm_dist.training.b"] == {"pgm_dist.common.a"}
    assert upward_imports(graph) == ["pgm_dist.common.a (tier 0) imports pgm_dist.training.b (tier 4)"]
    assert find_cycle(graph) == ["pgm_dist.common.a", "pgm_dist.training.b", "pgm_dist.common.a"]


@pytest.mark.parametrize("graph,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a2"}, "a2": set(), "x": {"y"}, "y": {"x"}}, ["x", "y", "x"]),
])
def test_cycle_finder(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_command_import_is_reported():
    assert upward_imports({"pgm_dist.training.setup": {"pgm_dist.train"}, "pgm_dist.train": set()}) == [
        "pgm_dist.training.setup imports the command pgm_dist.train (commands are imported by nobody)"]
