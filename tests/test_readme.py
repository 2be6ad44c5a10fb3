"""The README works as written: its Python quickstart runs, it stays short, and its links and the docs'
links point at files that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# a Python block right after this comment needs files the tests do not have (the released weights)
NOT_RUN = "<!-- needs the released weights"
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runnable) of every ```python block."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        runnable = not (before and before[-1].strip().startswith(NOT_RUN))
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), runnable))
    return out


BLOCKS = _python_blocks(README.read_text())


def test_readme_is_short_and_starts_with_the_quickstart():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it at most 300 (long material goes to docs/)"
    quickstart = [i + 1 for i, line in enumerate(lines) if line.startswith("## Quickstart")]
    assert quickstart and quickstart[0] <= 80, (
        f"the Quickstart heading is at line {quickstart}; it must start by line 80"
    )
    assert BLOCKS and BLOCKS[0][0] <= 80, "the first Python block must be within the first 80 lines"


def test_exactly_the_released_weights_block_is_skipped():
    skipped = [code for _, code, runnable in BLOCKS if not runnable]
    assert len(skipped) == 1 and "from_official" in skipped[0], skipped
    runnable = "\n".join(code for _, code, ok in BLOCKS if ok)
    for api in ("load_default(", "codebook_lookup(", "qformer_attention(", "lora_linear(", "apply_fused_lora("):
        assert api in runnable, f"the README's runnable quickstart no longer shows {api}"


@pytest.mark.parametrize(
    "line,code", [(n, c) for n, c, ok in BLOCKS if ok], ids=[f"line{n}" for n, _, ok in BLOCKS if ok]
)
def test_readme_python_block_runs(line, code, tmp_path):
    """Each block runs as written, on its own, in a fresh interpreter (as a user would paste it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{proc.stderr[-4000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # links inside code blocks are code, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    assert doc.is_file(), doc
    headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", doc.read_text()), re.M)}
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in headings:
                broken.append(target)
            continue
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files or anchors: {broken}"
