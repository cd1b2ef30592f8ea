"""Every relative link in README.md and docs/*.md points at a file that exists and, with a `#fragment`, at a
heading that file has — GitHub's anchor for it, computed here. The docs move as the code changes; a link to a
renamed section or file should fail CI, not a reader."""

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `[text](target)` outside code; images too. Targets with a scheme (http:, mailto:) are not ours to check.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def github_anchor(heading: str) -> str:
    """GitHub's slug of a heading: lower case, markup and punctuation dropped (letters, digits, `-` and `_`
    stay), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a `[x](y)` in a shell example is not a link."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading's later copies get `-1`, `-2`, … as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match is None:
            continue
        slug = github_anchor(match.group(2))
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def without_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def test_the_anchor_rule_matches_githubs() -> None:
    assert github_anchor("What does and does not make the knowledge route faster (measured 2026-12-03)") == (
        "what-does-and-does-not-make-the-knowledge-route-faster-measured-2026-12-03"
    )
    assert github_anchor("Stage 0: pretraining (`recipes/pretrain.py`)") == "stage-0-pretraining-recipespretrainpy"
    assert github_anchor("The judge's training step (2026-12-04)") == "the-judges-training-step-2026-12-04"
    assert github_anchor("Models: `.nemo` checkpoints") == "models-nemo-checkpoints"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for number, line in prose_lines(page):
        for target in LINK.findall(without_code_spans(line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue
            file_part, _, fragment = target.partition("#")
            linked = page if not file_part else (page.parent / file_part).resolve()
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{where}: {linked.name} has no heading with this anchor")
    assert not broken, "broken links:\n" + "\n".join(broken)
