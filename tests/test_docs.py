"""The docs point at files that exist: every relative link in docs/*.md resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target)


def test_relative_links_in_docs_resolve():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/ holds no markdown"
    broken = [f"{d.name}: {t}" for d in docs for t in LINK.findall(d.read_text())
              if "://" not in t and not (d.parent / t).exists()]
    assert not broken, f"links to missing files: {broken}"

