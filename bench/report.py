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


def int_list(text: str) -> list[int]:
    """A comma list of integers (argparse ``type``)."""
    return [int(v) for v in text.split(",")]


def add_output_args(ap, iters: int) -> None:
    """The arguments every benchmark script shares: timed iterations, the commit to name,
    and the markdown / JSON files to write."""
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", help="markdown table to write")
    ap.add_argument("--json", help="raw rows as JSON")
