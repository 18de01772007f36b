"""Markdown tables and result files shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def md_table(cols: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells are printed with str()."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def emit(text: str, raw, out: str | None, json_path: str | None) -> None:
    """Print the report; write it (markdown) and the raw numbers (JSON) where asked."""
    print(text)
    if out:
        Path(out).write_text(text)
    if json_path:
        Path(json_path).write_text(json.dumps(raw, indent=1))
