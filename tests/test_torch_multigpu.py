"""The PyTorch front end on 2 GPUs under torchrun (skipped without 2 GPUs): the
Communicator from torch.distributed, the layer and a Mixtral block split over 2 ranks, and
flashmoe-tune run under torchrun.

Run: ``python3 -m pytest -m gpu tests/test_torch_multigpu.py`` (it starts torchrun itself;
marked ``gpu`` because the ``multigpu`` marker means "already under mpirun").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HERE = Path(__file__).parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0",
               FLASHMOE_COMM_TIMEOUT="120")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_layer_and_hf_block_on_two_ranks_under_torchrun(tmp_path):
    r = _torchrun(str(HERE / "torchrun" / "layer_gpu.py"), str(tmp_path / "tuning.db"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("torchrun layer OK") == 2, r.stdout + r.stderr


def test_flashmoe_tune_run_under_torchrun():
    r = _torchrun("-m", "flashmoe_gen.tuner.cli", "run", "--gpus", "2", "--hidden", "256",
                  "--intermediate", "512", "--experts", "8", "--top-k", "2", "--tokens", "128")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
