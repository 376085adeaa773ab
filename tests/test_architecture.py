"""The shape of the code, checked: plugins use the public API only, and the core's modules import
each other without cycles (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import fusion_engine

REPO = Path(__file__).parent.parent
CORE = REPO / "fusion_engine"


def module_name(path: Path) -> str:
    """``fusion_engine/zoo/store.py`` -> ``fusion_engine.zoo.store``; ``plugins/x/y.py`` -> ``x.y``."""
    parts = path.relative_to(REPO / "plugins" if (REPO / "plugins") in path.parents else REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every import in a file, wherever it stands; relative
    imports resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def test_plugins_import_only_what_fusion_engine_exports():
    exported = set(fusion_engine.__all__)
    files = sorted((REPO / "plugins").rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        for module, names, line in imports(path):
            if module == "fusion_engine":
                assert set(names) <= exported, f"{path}:{line} imports {sorted(set(names) - exported)}"
            else:
                assert not module.startswith("fusion_engine."), f"{path}:{line} imports from {module}"


def test_the_core_has_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in CORE.rglob("*.py"):
        name = module_name(path)
        targets = set()
        for module, names, _ in imports(path):
            if module.startswith("fusion_engine"):
                # "from . import evaluation" names a module; a name from a package's __init__ is that package
                targets |= {f"{module}.{n}" for n in names if (CORE / Path(*f"{module}.{n}".split(".")[1:])).with_suffix(".py").exists()}
                targets.add(module)
        graph[name] = {t for t in targets if t != name}
    graph = {k: {t for t in v if t in graph and t != "fusion_engine"} for k, v in graph.items()}
    # the graph is read right: the run reaches its stages, the zoo's store its card, inside functions too
    assert {"fusion_engine.members", "fusion_engine.fusion", "fusion_engine.runfolder"} <= graph["fusion_engine.runner"]
    assert {"fusion_engine.zoo.card", "fusion_engine.checkpoint"} <= graph["fusion_engine.zoo.store"]
    assert "fusion_engine.plots" in graph["fusion_engine.cli.runs"]  # imported in a function

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles[:5])
