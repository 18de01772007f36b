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
    assert len(rep["kernels"]) == 7  # five extern "C" kernels and the two GEMMs
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


# -- a first run that explains itself ------------------------------------------------------
def test_help_shows_defaults_and_only_the_flags_a_command_reads(capsys):
    from flashmoe_gen.tuner.cli import build_parser

    def helptext(*argv):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())  # unwrapped

    tune = helptext("tune")
    assert "(default: 30)" in tune and "(default: tpe)" in tune and "(default: 512)" in tune
    assert "default: None" not in tune and "default: False" not in tune
    show = helptext("show")
    for ignored in ("--config", "--arch", "--gpus", "--trials", "--plot"):
        assert ignored not in show
    assert "--limit" in show and "--json" in show and "(default: 20)" in show
    assert "--json" in helptext("list")
    assert main(["--version"]) == 0


def _reparsed(command: str):
    """The namespace a printed `flashmoe-tune ...` command parses to."""
    import shlex

    from flashmoe_gen.tuner.cli import build_parser
    argv = shlex.split(command)
    assert argv[0] == "flashmoe-tune"
    return build_parser().parse_args(argv[1:])


def test_list_on_an_empty_database_says_how_to_tune(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no tuned kernels in sqlite:///") and out.count("\n") == 1
    a = _reparsed(out.split("tune one with: ")[1])
    assert (a.command, a.gpus, a.hidden, a.experts) == ("tune", 1, 512, 8)
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_show_untuned_prints_a_note_and_the_exact_tune_command(capsys):
    args = [*SEED, "--capacity-factor", "1.25", "--world-size", "2"]
    assert main(["show", *args]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("note: moe_h512") and "heuristic default" in err
    assert err.count("\n") == 1 and "Warning" not in err  # no raw warning, no source path
    from flashmoe_gen.tuner.args import problem_from_args
    cmd = out.split("tune it with: ")[1].strip()
    p = problem_from_args(_reparsed(cmd))
    assert p == MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2,
                           tokens_per_rank=256, capacity_factor=1.25)
    assert main(["show", *args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["provenance"] == "default" and rep["problem"] == p.name and rep["trials"] == []
    assert KernelConfig.from_dict(rep["config_fields"]).name == rep["config"]


@pytest.mark.parametrize("columns", [70, 200])
def test_tables_use_the_terminal_width(capsys, monkeypatch, columns):
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", 1, "t")
    cfg = KernelConfig.default(p)
    record_trial(make_engine(), p, env, cfg, status="ok", median_ms=0.5)
    monkeypatch.setenv("COLUMNS", str(columns))
    for argv in (["list"], ["show", *SEED, "--device", env.gpu_name]):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(map(len, lines)) <= columns
        if columns == 200:  # wide enough: the config name is on one line
            assert any(cfg.name in line for line in lines)


@pytest.mark.parametrize("problem", [
    MoEProblem(512, 2048, 8, 2),
    MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, tokens_per_rank=512),
    MoEProblem(64, 32, 4, 1, shared_experts=1, shared_intermediate=48, tokens_per_rank=0,
               capacity_factor=1 / 3, normalize_topk=False),
], ids=["seed", "dsv2lite", "every-field"])
def test_problem_flags_round_trip(problem):
    from flashmoe_gen.tuner.args import problem_from_args, tune_command
    a = _reparsed(tune_command(problem, "sqlite:///x y.db"))
    assert problem_from_args(a) == problem and a.db == "sqlite:///x y.db"


def test_cli_is_the_entry_point_only():
    """No module of the tuner imports tuner.cli (the old circle cli <-> run_layer/tune_cmd)."""
    import ast
    from pathlib import Path

    import flashmoe_gen.tuner as tuner
    for path in Path(tuner.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "cli" or n.endswith(".cli") for n in names), path.name


def test_one_rank_outside_mpirun_is_a_single_rank_stand_in(monkeypatch):
    from flashmoe_gen.errors import UsageError
    from flashmoe_gen.tuner import launch

    for var in (*launch.MPI_SIZE_VARS, *launch.MPI_RANK_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "_mpi_world", lambda: pytest.fail("imported MPI"))
    world, size, rank = launch.mpi_ranks(1)
    assert (size, rank, world.Get_size(), world.Get_rank()) == (1, 0, 1, 0)
    assert world.bcast({"x": 1}, root=0) == {"x": 1} and world.allgather(3) == [3]
    assert world.Barrier() is None

    class World:  # two ranks under mpirun
        def Get_size(self):
            return 2

        def Get_rank(self):
            return 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(launch, "_mpi_world", World)
    assert launch.mpi_ranks(2)[1:] == (2, 1)
    with pytest.raises(UsageError, match=r"2 MPI rank\(s\): start it with `mpirun -np 1`"):
        launch.mpi_ranks(1)


def test_one_rank_tune_runs_without_an_mpi_library(monkeypatch, capsys):
    """The real `tune --gpus 1` (GPU replaced by the fake backend) with mpi4py unimportable:
    the whole search runs and stores a winner."""
    import fake_backend

    import flashmoe_gen.tuner.tune_cmd as tune_cmd
    from flashmoe_gen.tuner import launch

    for var in (*launch.MPI_SIZE_VARS, *launch.MPI_RANK_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` raises ImportError
    monkeypatch.setattr(tune_cmd, "GpuBackend", fake_backend.CpuBackend)
    assert main(["tune", "--gpus", "1", *SEED, "--trials", "3", "--space", "small"]) == 0
    assert "winner stored" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gpu"].startswith("fake CPU")


def test_gpus_n_relaunches_this_command_under_mpirun(monkeypatch, capsys, tmp_path):
    from flashmoe_gen.tuner import launch

    for var in launch.MPI_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("flashmoe_gen.arch.visible_gpu_count", lambda: 8)
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["--gpus", "2", *SEED, "--trials", "4"]) == 0
    (cmd,) = calls
    assert cmd[:3] == [str(fake), "-np", "2"]
    i = cmd.index(sys.executable)
    assert cmd[i:] == [sys.executable, "-m", "flashmoe_gen.tuner.cli", "tune", "--gpus", "2",
                       *SEED, "--trials", "4"]
    assert "launching:" in capsys.readouterr().out
