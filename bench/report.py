"""Markdown tables, result files and launch timing shared by the benchmark scripts."""

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


def launch_seconds(launch, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``launch()`` over ``iters`` runs after ``warmup`` untimed ones, each
    between two CUDA events on the current stream."""
    import cupy
    import numpy as np

    for _ in range(warmup):
        launch()
    times = []
    for _ in range(iters):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record()
        launch()
        e1.record()
        e1.synchronize()
        times.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e-3)
    return float(np.median(times))


def emit_rows(header: str, cols: list[str], rows: list[dict], a) -> None:
    """``header``, then ``rows``' ``cols`` as a markdown table: printed, and written where
    ``a`` (add_output_args) asks."""
    emit(header + md_table(cols, [[r[c] for c in cols] for r in rows]), rows, a.out, a.json)
