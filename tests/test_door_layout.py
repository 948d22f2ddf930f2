"""The door's shape (issue 25): one concern a file, none over 400 lines; nothing in
``entrypoints/openai`` imports ``entrypoints/ray`` or reaches through ``.engine.engine``;
no import circle among the entrypoints."""

from __future__ import annotations

import ast
from pathlib import Path

import loraplex.entrypoints as entrypoints

ROOT = Path(entrypoints.__file__).parent


def modules() -> dict[str, set[str]]:
    """Each entrypoints module and the entrypoints modules it imports."""
    found = {}
    for path in ROOT.rglob("*.py"):
        name = "loraplex.entrypoints." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            deps |= {n for n in names if n.startswith("loraplex.entrypoints")}
        found[name] = deps
    return found


def test_the_door_is_split_into_files_of_one_concern():
    for path in (ROOT / "openai").glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, (path.name, lines)
        assert ".engine.engine" not in path.read_text(), path.name
    for name, deps in modules().items():
        if ".openai" in name:
            assert not any(".ray" in d for d in deps), (name, deps)


def test_no_import_circle_among_the_entrypoints():
    graph = modules()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in graph.get(name, ()):
            assert dep not in path, " -> ".join([*path, dep])
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(name)

    for name in graph:
        visit(name, [name])
