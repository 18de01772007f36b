"""The docs point at files that exist: relative links in docs/*.md, and docs/*.md cited in code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target)
CITED = re.compile(r"\bdocs/[\w.-]+\.md\b")


def test_relative_links_in_docs_resolve():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/ holds no markdown"
    broken = [f"{d.name}: {t}" for d in docs for t in LINK.findall(d.read_text())
              if "://" not in t and not (d.parent / t).exists()]
    assert not broken, f"links to missing files: {broken}"


def test_docs_cited_in_code_exist():
    sources = [ROOT / "README.md"] + [
        p for folder in ("flashmoe_gen", "tuner", "db", "bench", "tests", "templates")
        for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".j2", ".sh")]
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in sources
                      for m in CITED.findall(p.read_text()) if not (ROOT / m).exists()})
    assert not missing, f"cited docs that do not exist: {missing}"
