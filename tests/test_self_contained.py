"""The repository's text refers only to itself: no design notes, specs or paths kept elsewhere.

Every tracked text file (code, docs, result tables, CI) is searched for references to documents
that are not in the repository: the design and spec notes the project was planned with
(``architecture.md``, ``performance.md``, ``method_liao2018.md``, …, "spec §3.1") and absolute
paths of the machine it was written on. A docstring states the formula or names a README
section instead; a relative link must resolve inside the repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(
    r"architecture\.md|performance\.md|environment\.md|style\.md|method_liao2018|companion_systems"
    r"|\bspec\s*§|\bspec\s+section|shared/(?:design|spec)|/work/(?:main|shared)|\bdesign/[a-z_]+\.md"
)
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in names.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and path.suffix in {".py", ".md", ".toml", ".txt", ".cfg", ".yml",
                                                       ".yaml", ".json", ".jsonl", ".csv", ""}:
            files.append(path)
    return files


def test_no_reference_to_a_document_outside_the_repository():
    this = Path(__file__).resolve()
    hits = []
    for path in _tracked_text_files():
        if path == this:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "write the formula or a README section instead:\n" + "\n".join(hits)


def test_relative_markdown_links_resolve_inside_the_repository():
    broken = []
    for path in _tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in MARKDOWN_LINK.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links must point to files in the repository:\n" + "\n".join(broken)


def test_the_pattern_catches_the_forms_it_is_for():
    for text in ("(architecture.md §3)", "see spec §6 A6", "../shared/design/performance.md",
                 "method_liao2018.md", "/work/shared/spec/x.md"):
        assert OUTSIDE.search(text), text
    for text in ("the README section *Reference reproduction*", "arXiv 1812.06162, §2.2",
                 "benchmarks/results/torch.md"):
        assert not OUTSIDE.search(text), text
