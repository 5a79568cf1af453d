"""The house rules of the code base, checked on the source: no import cycle, and no module imports a layer
above its own (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "etl", "training", "c2s")

# lowest first; a module may import its own layer or lower ones only
LAYERS: list[tuple[str, ...]] = [
    ("schemas",),
    ("etl.sources.base", "etl.jit", "etl.encode", "etl.inverse", "etl.storage", "etl.symbols", "etl.rowhash",
     "etl.cli", "etl.spark", "etl.card"),
    ("etl.sources", "etl.knowledge", "etl.demo", "etl.manifest", "etl.config", "etl.validate", "etl.versions",
     "etl.incremental",
     "etl.inspect_corpus"),
    ("etl.tasks",),
    ("etl.stages",),
    ("etl.pipeline",),
    ("etl.build_corpus", "training"),
    ("c2s",),  # the application layer: the Python API and the one command, over the ETL and the trainer
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(mod: str) -> int:
    if mod in PACKAGES:  # an empty package __init__
        return 0
    best, found = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found >= 0, f"{mod} is in no layer: add it to LAYERS"
    return found


def _imports() -> dict[str, set[str]]:
    mods = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.split(".")[0] in PACKAGES:
                    target = n if n in mods else (n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] in mods else None)
                    if target and target != mod:
                        graph[mod].add(target)
    return graph


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} -> {t}" for m, ts in _imports().items() for t in ts if _layer(t) > _layer(m)]
    assert not bad, bad


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError(" -> ".join([*stack[stack.index(t):], t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
