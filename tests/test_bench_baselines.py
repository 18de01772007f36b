"""Both PyTorch EP baselines of the benches (sync, and padded for graph capture) agree with
the float64 reference on CPU ranks over gloo: ragged token counts, one rank empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


def test_torch_baselines_agree_on_two_cpu_ranks():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_ep_check.py"), "--ranks", "2"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
