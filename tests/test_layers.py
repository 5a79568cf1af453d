"""The house rules of the code base, checked on the source: no import cycle, and no module imports a layer
above its own (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "language", "etl", "training", "generation", "evaluation", "c2s", "jobs", "benchmarks")

# lowest first; a module may import its own layer or lower ones only
LAYERS: list[tuple[str, ...]] = [
    ("schemas",),  # the contracts: tables, layout, tasks, options, errors
    ("language",),  # the cell-sentence language, shared by both sides
    # pure scores (labels, ontology, distributions), the expression space and embedders: GRPO uses them too
    ("evaluation.metrics", "evaluation.space", "evaluation.embed"),
    ("etl.sources.base", "etl.storage", "etl.rowhash", "etl.cli", "etl.spark", "etl.card", "training"),
    ("etl.sources", "etl.knowledge", "etl.demo", "etl.manifest", "etl.config", "etl.validate", "etl.versions",
     "etl.incremental", "etl.inspect_corpus"),
    ("etl.tasks",),
    ("etl.stages",),
    ("etl.pipeline",),
    ("etl.build_corpus", "generation", "evaluation"),
    ("c2s", "jobs", "benchmarks"),  # the application layer: the Python API, the one command, jobs, benchmarks
]
CORPUS_SIDE = ("etl",)
MODEL_SIDE = ("training", "generation", "evaluation")
# first-party imports inside functions, beyond the CLI that loads its subcommands lazily (c2s/cli.py)
LAZY_BUDGET = 15
LAZY_EXEMPT = ("c2s.cli",)
MAX_LINES = 700
LONG_EXEMPT = ("etl.demo",)  # the demo data generators


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


def _sources() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports() -> dict[str, set[str]]:
    mods = _sources()
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


def _side(mod: str, side: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in side)


def test_the_corpus_side_and_the_model_side_meet_only_on_the_floors_below():
    """training/, generation/ and evaluation/ never import etl/, nor etl/ them: what both need is in
    language/ or schemas/."""
    bad = [f"{m} -> {t}" for m, ts in _imports().items() for t in ts
           if (_side(m, MODEL_SIDE) and _side(t, CORPUS_SIDE)) or (_side(m, CORPUS_SIDE) and _side(t, MODEL_SIDE))]
    assert not bad, bad


def _lazy_first_party(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in PACKAGES for n in names) and not getattr(node, "level", 0):
                lines.append(node.lineno)
    return lines


def test_first_party_imports_sit_at_module_top():
    """A module says what it depends on at its top; only the CLI that loads subcommands lazily is exempt."""
    found = {m: _lazy_first_party(p) for m, p in _sources().items() if not _side(m, LAZY_EXEMPT)}
    found = {m: lines for m, lines in found.items() if lines}
    total = sum(len(v) for v in found.values())
    assert total <= LAZY_BUDGET, f"{total} first-party imports inside functions: {found}"


def test_no_module_is_over_700_lines():
    long = {m: n for m, p in _sources().items() if not _side(m, LONG_EXEMPT)
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long

