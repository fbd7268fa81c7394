"""The package's shape, read from its source (nothing is imported or run): the layers have no import cycle, and
the checkpoint format is known in one module."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "helpers"


def helpers_imports(path: Path) -> set[str]:
    """The helpers modules `path` imports anywhere: at the top, inside functions, under `if`."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "helpers":
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path):] = "open", [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_through_a_local_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    module = tmp_path / "run.py"
    module.write_text("import os\n\ndef f():\n    from helpers.train import fit\n    from helpers import data\n")
    assert helpers_imports(module) == {"train", "data"}


def test_helpers_has_no_import_cycle_counting_function_local_imports():
    graph = {path.stem: helpers_imports(path) for path in PACKAGE.glob("*.py")}
    assert graph["data"] <= {"utils"} and graph["distributed"] == set()  # the bottom layers
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_package_is_flat():
    assert not [p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]


# the checkpoint's keys: those `capture` writes, and format 1's
CHECKPOINTS = PACKAGE / "checkpoints.py"
FORMAT_1 = {"optimizer_state", "scheduler_state", "scaler_state"}
# keys that are also field names of our other files (History records, history.json, metrics.json, the benchmarks'
# JSON): they appear elsewhere for those. No module but checkpoints.py reads a checkpoint file (the test below),
# so none of them indexes a checkpoint there.
SHARED_NAMES = {"epoch", "config", "history", "mode", "warmup_seconds", "data", "classes", "requested", "init_from",
                "world_size", "rng"}


def checkpoint_keys() -> set[str]:
    capture = next(n for n in ast.parse(CHECKPOINTS.read_text()).body
                   if isinstance(n, ast.FunctionDef) and n.name == "capture")
    written = next(n for n in ast.walk(capture) if isinstance(n, ast.Return)).value
    return {key.value for key in written.keys} | FORMAT_1


def string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_the_checkpoint_keys_are_strings_only_in_checkpoints_py():
    keys = checkpoint_keys()
    assert {"model_state", "eval_state", "step_state", "normalization", "rng_ranks"} <= keys
    assert SHARED_NAMES <= keys, "a key left the format: drop it from SHARED_NAMES"
    own = keys - SHARED_NAMES
    for path in [*PACKAGE.glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        if path != CHECKPOINTS:
            assert not own & string_constants(path), f"{path.name} names checkpoint keys {own & string_constants(path)}"


def test_only_checkpoints_py_reads_a_checkpoint_file():
    for path in PACKAGE.glob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute) and n.attr == "load"
                 and isinstance(n.value, ast.Name) and n.value.id == "torch"]
        assert path == CHECKPOINTS or not calls, f"{path.name} calls torch.load: read checkpoints with read_checkpoint"


def test_local_imports_say_what_they_defer():
    """A function-local import defers something heavy or optional, and says so."""
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            imports = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
            if imports:
                said = any("deferred" in lines[n.lineno - 1] for n in imports)
                assert said, f"{path.name}:{imports[0].lineno} imports inside {node.name}() without saying why"
