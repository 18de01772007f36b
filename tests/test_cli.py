"""flashmoe-tune on a CPU machine: compile, export, list/show/export --best, clear errors."""

import json
import subprocess
import sys

import pytest

from flashmoe_gen import KernelConfig, MoEProblem
from flashmoe_gen.db import Environment, make_engine, record_trial
from flashmoe_gen.tuner.cli import main

SEED = ["--hidden", "512", "--intermediate", "2048", "--experts", "8", "--top-k", "2",
        "--shared-experts", "1", "--tokens", "256"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHMOE_DB", f"sqlite:///{tmp_path}/w.db")
    monkeypatch.setenv("FLASHMOE_STUDIES", f"sqlite:///{tmp_path}/s.db")


def test_compile_json_reports_every_kernel(capsys):
    assert main(["compile", *SEED, "--arch", "sm_90", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["problem"] == "moe_h512_i2048_e8_k2_s1x2048_p1_t256_bf16"
    assert len(rep["kernels"]) == 6
    assert all(k["spill_stores"] == 0 and k["registers"] > 0 for k in rep["kernels"].values())


def test_compile_table_and_config_by_name(capsys):
    cfg = KernelConfig.default(MoEProblem(512, 2048, 8, 2, shared_experts=1))
    assert main(["compile", *SEED, "--arch", "sm_90", "--config", cfg.name]) == 0
    out = capsys.readouterr().out
    assert "registers" in out and "moe_router" in out and "expert_ge" in out


def test_bad_input_is_a_clear_error(capsys):
    assert main(["compile", *SEED, "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "ProblemError" in err and "divisible by world_size=3" in err
    assert main(["compile", *SEED, "--config", '{"gate_up": 1}']) == 2
    assert "ConfigError" in capsys.readouterr().err


def test_export_and_export_best(tmp_path, capsys):
    out = tmp_path / "a.cu"
    assert main(["export", *SEED, "-o", str(out)]) == 0
    assert out.read_text().startswith("// FlashMoE layer exported")
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", 1, "t")
    best = KernelConfig.from_dict(KernelConfig.default(p).to_dict()
                                  | {"router_tokens_per_block": 4})
    record_trial(make_engine(), p, env, best, status="ok", median_ms=0.5)
    best_out = tmp_path / "b.cu"
    assert main(["export", *SEED, "--best", "--device", env.gpu_name, "-o",
                 str(best_out)]) == 0
    assert f"// config: {best.name}" in best_out.read_text()
    err = capsys.readouterr().err  # lookup's fallback: one readable line, no source path
    assert err.startswith("note: ") and err.count("\n") == 1 and "api.py" not in err
    assert main(["list"]) == 0
    assert "tuned winners" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["config"] == best.name and row["problem"] == p.name and row["median_ms"] == 0.5


def test_tune_without_gpu_says_why():
    r = subprocess.run([sys.executable, "-m", "flashmoe_gen.tuner.cli", "--gpus", "1", *SEED,
                        "--trials", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "DeviceError" in r.stderr or "GPU" in r.stderr
