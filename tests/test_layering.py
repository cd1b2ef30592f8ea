"""The import layering written in docs/architecture.md is the one the code has.

Parses every module of `steerlm/` (the recipes included) and `launchers/` (imports inside functions included) and
checks each arrow between packages against the doc's `layering` block: an import the doc does not allow fails
naming file:line; an allowed arrow that no import uses fails too (removing any listed arrow from the doc
therefore makes the first check fail); the allowed graph must have no cycle.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
BASE = ("errors", "files", "logs", "megatron_compat")  # import nothing from steerlm


def allowed_arrows(doc: str) -> dict[str, set[str]]:
    block = re.search(r"```layering\n(.*?)```", doc, re.S)
    assert block, f"{DOC} has no ```layering block"
    arrows: dict[str, set[str]] = {name: set() for name in BASE}
    for line in block.group(1).splitlines():
        if line.strip():
            source, _, targets = line.partition("->")
            arrows[source.strip()] = set(targets.split())
    return arrows


def _unit(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] != "steerlm":
        return parts[0]
    return "steerlm" if parts[1] == "__init__" else parts[1]


def _target(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "launchers":
        return "launchers"
    if parts[0] != "steerlm":
        return None
    return parts[1] if len(parts) > 1 else "steerlm"


@functools.cache
def actual_arrows() -> dict[tuple[str, str], list[str]]:
    """(source unit, target unit) → the file:line of each import making that arrow."""
    arrows: dict[tuple[str, str], list[str]] = defaultdict(list)
    files = [*ROOT.glob("steerlm/**/*.py"), *ROOT.glob("launchers/**/*.py")]  # recipes/ links to steerlm/recipes/
    for path in files:
        source = _unit(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = (
                    [f"steerlm.{alias.name}" for alias in node.names] if node.module == "steerlm" else [node.module]
                )
            else:
                continue
            for module in modules:
                target = _target(module)
                if target is not None and target != source:
                    arrows[(source, target)].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return arrows


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def violations(allowed: dict[str, set[str]], actual: dict[tuple[str, str], list[str]]) -> list[str]:
    problems = [
        f"{where[0]}: {source} -> {target} is not allowed by docs/architecture.md"
        for (source, target), where in sorted(actual.items())
        if target not in allowed.get(source, set())
    ]
    problems += [
        f"docs/architecture.md allows {source} -> {target}, but no import uses it: remove the arrow"
        for source, targets in sorted(allowed.items())
        for target in sorted(targets)
        if (source, target) not in actual
    ]
    return problems


def test_imports_follow_the_documented_layering():
    allowed = allowed_arrows(DOC.read_text())
    assert violations(allowed, actual_arrows()) == []


def test_documented_layering_has_no_cycle():
    assert find_cycle(allowed_arrows(DOC.read_text())) is None


def test_base_modules_import_nothing_from_steerlm():
    actual = actual_arrows()
    assert [arrow for arrow in actual if arrow[0] in BASE] == []


@pytest.mark.parametrize("arrow", sorted((s, t) for s, ts in allowed_arrows(DOC.read_text()).items() for t in ts))
def test_removing_any_allowed_arrow_fails(arrow):
    """Each documented arrow is load-bearing: without it some import is refused."""
    allowed = allowed_arrows(DOC.read_text())
    allowed[arrow[0]] = allowed[arrow[0]] - {arrow[1]}
    assert any(f"{arrow[0]} -> {arrow[1]} is not allowed" in p for p in violations(allowed, actual_arrows()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
