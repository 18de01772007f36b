"""The bad-input catalogue (issue 11, deliverable 5) for the CLI, the problem, the config, the
weights, the targets and the launcher: every case asserts a typed refusal that names the
field or flag and what is valid (one, ``-o`` over an existing binary, asserts it is replaced
cleanly, as ``cc -o`` would); CLI cases also assert exit code 2 and no traceback.

Cases (one parametrized case each; ``CASE_COUNT`` below is checked against the tables):
- CLI flags refused at parse time (argparse, exit 2, the flag named): 34
- CLI problem / target / config values (ProblemError, ConfigError, DeviceError): 42
- CLI output paths and the run/tune launcher without a GPU, mpirun or MPI: 11
- API: MoEProblem / KernelConfig / GemmTile / MoEWeights / limits_for / SearchSpace /
  mpi_ranks / problem_from_args given the wrong kind or value: 67
- main() mapping of expected failures (OSError, JSON, interrupt) vs bugs: 4
Database, cache, environment-variable and multi-rank fault cases live with their owners
(tests/test_db.py, tests/test_cache.py, tests/test_faults.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from flashmoe_gen import ArgumentError, ConfigError, DeviceError, KernelConfig, MoEProblem
from flashmoe_gen.arch import limits_for
from flashmoe_gen.config import GemmTile
from flashmoe_gen.errors import FlashMoEError, ProblemError, SetupError, UsageError
from flashmoe_gen.tuner import cli, launch
from flashmoe_gen.tuner.args import problem_from_args
from flashmoe_gen.tuner.space import SearchSpace
from flashmoe_gen.weights import MoEWeights, random_tokens


def _has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


no_gpu_only = pytest.mark.skipif(_has_gpu(), reason="asserts the message of a machine "
                                 "without a GPU")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHMOE_DB", f"sqlite:///{tmp_path}/w.db")
    monkeypatch.setenv("FLASHMOE_STUDIES", f"sqlite:///{tmp_path}/s.db")
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr); never a traceback."""
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, err


# -- 1. flags refused at parse time -------------------------------------------------------
PARSE_CASES = [
    (["tune", "--trials", "-1"], "--trials", "positive integer"),
    (["tune", "--trials", "0"], "--trials", "positive integer"),
    (["tune", "--trials", "many"], "--trials", "'many'"),
    (["tune", "--trials", "2.5"], "--trials", "'2.5'"),
    (["tune", "--timeout", "-5"], "--timeout", "seconds > 0"),
    (["tune", "--timeout", "0"], "--timeout", "seconds > 0"),
    (["tune", "--timeout", "inf"], "--timeout", "finite"),
    (["tune", "--timeout", "nan"], "--timeout", "finite"),
    (["tune", "--timeout", "5m"], "--timeout", "'5m'"),
    (["tune", "--iters", "0"], "--iters", "positive integer"),
    (["tune", "--iters", "-3"], "--iters", "positive integer"),
    (["tune", "--warmup", "-1"], "--warmup", "non-negative integer"),
    (["tune", "--gpus", "0"], "--gpus", "positive integer"),
    (["tune", "--gpus", "-2"], "--gpus", "positive integer"),
    (["--gpus", "0"], "--gpus", "positive integer"),  # the bare tuning job
    (["tune", "--seed", "-1"], "--seed", "0..4294967295"),
    (["tune", "--seed", str(2**32)], "--seed", "0..4294967295"),
    (["tune", "--sampler", "bayes"], "--sampler", "invalid choice"),
    (["tune", "--space", "huge"], "--space", "invalid choice"),
    (["tune", "--arch", "sm_90"], "unrecognized arguments", "--arch"),  # tune reads the GPU
    (["tune", "--config", "x"], "unrecognized arguments", "--config"),
    (["run", "--gpus", "0"], "--gpus", "positive integer"),
    (["run", "--gpus", "1.5"], "--gpus", "'1.5'"),
    (["run", "--iters", "0"], "--iters", "positive integer"),
    (["run", "--warmup", "-1"], "--warmup", "non-negative integer"),
    (["run", "--seed", "-7"], "--seed", "0..4294967295"),
    (["show", "--limit", "-1"], "--limit", "non-negative integer"),
    (["show", "--limit", "ten"], "--limit", "'ten'"),
    (["show", "--config", "x"], "unrecognized arguments", "--config"),  # show ignores it
    (["compile", "--hidden", "abc"], "--hidden", "invalid int value"),
    (["compile", "--hidden", "1.5"], "--hidden", "invalid int value"),
    (["compile", "--capacity-factor", "lots"], "--capacity-factor", "invalid float value"),
    (["compile", "--no-such-flag"], "unrecognized arguments", "--no-such-flag"),
    (["frobnicate"], "invalid choice", "frobnicate"),
]


@pytest.mark.parametrize("argv,flag,valid", PARSE_CASES, ids=[" ".join(c[0]) for c in
                                                               PARSE_CASES])
def test_flag_refused_at_parse_time(capsys, argv, flag, valid):
    rc, err = run_cli(capsys, argv)
    assert rc == 2
    assert flag in err and valid in err, err


# -- 2. problem, target and config values through the CLI ---------------------------------
SEED = ["--hidden", "512", "--intermediate", "2048", "--experts", "8", "--top-k", "2",
        "--tokens", "256", "--arch", "sm_90"]
TILE = {"bm": 64, "bn": 64, "bk": 64, "warps_m": 2, "warps_n": 2, "stages": 3}


def _cfg(**changes) -> str:
    d = {"gate_up": dict(TILE), "down": dict(TILE)}
    for k, v in changes.items():
        if "." in k:
            which, field = k.split(".")
            d[which][field] = v
        else:
            d[k] = v
    return json.dumps(d)


VALUE_CASES = [
    (["--hidden", "4294967296"], "ProblemError", "hidden", "MAX_WIDTH"),
    (["--hidden", str(2**20 + 8)], "ProblemError", "hidden", "at most 1048576"),
    (["--hidden", "0"], "ProblemError", "hidden", "positive integer"),
    (["--hidden", "-512"], "ProblemError", "hidden", "positive integer"),
    (["--hidden", "8"], "ProblemError", "hidden", "at least 16"),
    (["--hidden", "100"], "ProblemError", "hidden", "multiple of the vector width 8"),
    (["--intermediate", str(2**21)], "ProblemError", "intermediate", "MAX_WIDTH"),
    (["--intermediate", "1001"], "ProblemError", "intermediate", "e.g. 1000 or 1008"),
    (["--experts", "0"], "ProblemError", "experts", "positive integer"),
    (["--experts", str(2**17)], "ProblemError", "experts", "MAX_EXPERTS"),
    (["--top-k", "0"], "ProblemError", "top_k", "positive integer"),
    (["--top-k", "9"], "ProblemError", "top_k", "between 1 and experts=8"),
    (["--world-size", "0"], "ProblemError", "world_size", "positive integer"),
    (["--world-size", "-2"], "ProblemError", "world_size", "positive integer"),
    (["--world-size", "3"], "ProblemError", "experts", "world sizes that divide it"),
    (["--tokens", "-1"], "ProblemError", "tokens_per_rank", "non-negative integer"),
    (["--tokens", str(2**24 + 1)], "ProblemError", "tokens_per_rank", "MAX_TOKENS"),
    (["--shared-experts", "-1"], "ProblemError", "shared_experts", "non-negative"),
    (["--shared-experts", "1", "--shared-intermediate", "100"], "ProblemError",
     "shared_intermediate", "multiple of 8"),
    (["--shared-experts", "1", "--shared-intermediate", "0"], "ProblemError",
     "shared_intermediate", "at least 16"),
    (["--shared-experts", "4096", "--shared-intermediate", "1024"], "ProblemError",
     "shared_experts", "MAX_WIDTH"),
    (["--dtype", "fp32"], "ProblemError", "dtype", "supported: bf16"),
    (["--dtype", "fp8"], "ProblemError", "dtype", "supported: bf16"),
    (["--capacity-factor", "inf"], "ProblemError", "capacity_factor", "finite number > 0"),
    (["--capacity-factor=-inf"], "ProblemError", "capacity_factor", "finite number > 0"),
    (["--capacity-factor", "nan"], "ProblemError", "capacity_factor", "finite number > 0"),
    (["--capacity-factor", "-1"], "ProblemError", "capacity_factor", "finite number > 0"),
    (["--capacity-factor", "0"], "ProblemError", "capacity_factor", "finite number > 0"),
    (["--capacity-factor", "1e300"], "ProblemError", "capacity_factor", "MAX_TOKENS"),
    (["--arch", "sm_99"], "DeviceError", "sm_99", "known: sm_80"),
    (["--arch", "sm_70"], "DeviceError", "sm_70", "known: sm_80"),
    (["--config", "{bad json"], "ConfigError", "config.json", "not valid JSON"),
    (["--config", "[1, 2]"], "ConfigError", "config.config", "JSON object"),
    (["--config", "no_such_config"], "ConfigError", "config.name", "KernelConfig.name"),
    (["--config", '{"gate_up": 1}'], "ConfigError", "down", "required"),
    (["--config", _cfg(bogus=1)], "ConfigError", "config.bogus", "unknown field"),
    (["--config", _cfg(**{"gate_up.bm": "64"})], "ConfigError", "gate_up.bm",
     "must be an integer"),
    (["--config", _cfg(**{"gate_up.stages": 3.0})], "ConfigError", "gate_up.stages",
     "must be an integer"),
    (["--config", _cfg(router_tokens_per_block=True)], "ConfigError",
     "router_tokens_per_block", "must be an integer"),
    (["--config", _cfg(shared_stream=1)], "ConfigError", "shared_stream", "must be a bool"),
    (["--config", _cfg(**{"down.bm": 48})], "ConfigError", "down.bm", "choose one of"),
    (["--config", _cfg(**{"gate_up.mma": "wgmma"}), "--arch", "sm_80"], "ConfigError",
     "gate_up.mma", "use mma='sync'"),
]


@pytest.mark.parametrize("extra,kind,field,valid", VALUE_CASES,
                         ids=[" ".join(c[0])[:60] for c in VALUE_CASES])
def test_value_refused_with_typed_error(capsys, extra, kind, field, valid):
    rc, err = run_cli(capsys, ["compile", *SEED, *extra])
    assert rc == 2
    assert err.startswith(f"flashmoe-tune: {kind}: ") and field in err and valid in err, err
    assert err.count("\n") == 1, err  # one line


# -- 3. output paths and the launcher -----------------------------------------------------
@pytest.mark.parametrize("where", ["folder", "missing folder", "file as folder"])
def test_export_output_refused(capsys, tmp_path, where):
    (tmp_path / "a.cu").write_text("x")
    target = {"folder": tmp_path, "missing folder": tmp_path / "nope" / "a.cu",
              "file as folder": tmp_path / "a.cu" / "b.cu"}[where]
    rc, err = run_cli(capsys, ["export", *SEED, "-o", str(target)])
    assert rc == 2 and "UsageError" in err and "-o/--output" in err, err
    assert ("is a folder" if where == "folder" else "does not exist") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cu"]  # nothing written


def test_export_over_an_existing_binary_replaces_it(capsys, tmp_path):
    """Like ``cc -o``: the named file is replaced (it was a UnicodeDecodeError traceback)."""
    target = tmp_path / "prog"
    target.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    rc, _ = run_cli(capsys, ["export", *SEED, "-o", str(target)])
    assert rc == 0 and target.read_text().startswith("// FlashMoE layer exported")


@no_gpu_only
@pytest.mark.parametrize("argv", [["run", "--gpus", "1"], ["run", "--gpus", "2"],
                                  ["tune", "--gpus", "1", "--trials", "1"]],
                         ids=["run-1", "run-2", "tune-1"])
def test_no_gpu_is_one_line_naming_what_works(capsys, monkeypatch, argv):
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    rc, err = run_cli(capsys, [*argv, *SEED[:-2]])
    assert rc == 2
    assert err.startswith("flashmoe-tune: DeviceError: no CUDA GPU found") and \
        "`compile` and `export` work without one" in err and err.count("\n") == 1, err


def test_gpus_beyond_the_machine_fail_before_mpirun(capsys, monkeypatch):
    monkeypatch.setattr("flashmoe_gen.arch.visible_gpu_count", lambda: 2)
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    rc, err = run_cli(capsys, ["run", "--gpus", "4", *SEED])
    assert rc == 2 and "UsageError" in err and "--gpus 4" in err and "2 CUDA GPU(s)" in err


def test_missing_mpirun_names_the_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("flashmoe_gen.arch.visible_gpu_count", lambda: 2)
    monkeypatch.setenv("PATH", str(tmp_path))  # no mpirun, no mpiexec
    rc, err = run_cli(capsys, ["tune", "--gpus", "2", *SEED[:-2]])
    assert rc == 2 and "SetupError" in err and 'pip install ".[mpi]"' in err, err


def test_under_mpirun_without_an_mpi_library_names_the_install(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` fails
    with pytest.raises(SetupError, match=r'cannot load an MPI library .*pip install "\.\[mpi\]"'):
        launch.mpi_ranks(2)


@no_gpu_only
def test_one_gpu_job_needs_no_mpi_library(tmp_path):
    """With an mpi4py that cannot load MPI (a plain pip install), a 1-GPU run and tune get
    past the ranks to the GPU check: they never import mpi4py."""
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('cannot load MPI library')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX"))}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env.get("PYTHONPATH", "")])
    for argv in (["run"], ["tune", "--trials", "1"]):
        r = subprocess.run([sys.executable, "-m", "flashmoe_gen.tuner.cli", *argv,
                            "--gpus", "1", *SEED[:-2]], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "no CUDA GPU found" in r.stderr and "MPI" not in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


# -- 4. the API ---------------------------------------------------------------------------
P = MoEProblem(512, 2048, 8, 2)
BASE = dict(hidden=512, intermediate=2048, experts=8, top_k=2)
T = GemmTile(64, 64, 64, 2, 2, 3)


def _weights(**changes) -> MoEWeights:
    w = MoEWeights.random(MoEProblem(64, 32, 4, 2))
    for k, v in changes.items():
        setattr(w, k, v)
    return w


API_CASES = [
    # MoEProblem: the wrong kind and out-of-range values, by field
    ("problem from_dict missing", lambda: MoEProblem.from_dict({"hidden": 512}),
     ProblemError, "intermediate", "missing: intermediate, experts, top_k"),
    ("problem from_dict list", lambda: MoEProblem.from_dict([512]), ProblemError, "problem",
     "dict of fields"),
    ("problem from_dict str", lambda: MoEProblem.from_dict("h512"), ProblemError, "problem",
     "dict of fields"),
    ("problem from_dict unknown", lambda: MoEProblem.from_dict(BASE | {"hiden": 1}),
     ProblemError, "hiden", "unknown field"),
    ("problem from_json bad", lambda: MoEProblem.from_json("{hidden"), ProblemError, "json",
     "not valid JSON"),
    ("problem from_json None", lambda: MoEProblem.from_json(None), ProblemError, "json",
     "JSON text"),
    ("problem replace unknown", lambda: P.replace(tokens=5), ProblemError, "tokens",
     "unknown field"),
    ("hidden bool", lambda: MoEProblem(**BASE | {"hidden": True}), ProblemError, "hidden",
     "positive integer"),
    ("hidden str", lambda: MoEProblem(**BASE | {"hidden": "512"}), ProblemError, "hidden",
     "positive integer"),
    ("hidden float", lambda: MoEProblem(**BASE | {"hidden": 512.0}), ProblemError, "hidden",
     "positive integer"),
    ("hidden 2**32", lambda: MoEProblem(**BASE | {"hidden": 2**32}), ProblemError, "hidden",
     "MAX_WIDTH"),
    ("hidden numpy", lambda: MoEProblem(**BASE | {"hidden": np.int64(512)}), ProblemError,
     "hidden", "positive integer"),
    ("experts float", lambda: MoEProblem(**BASE | {"experts": 8.0}), ProblemError, "experts",
     "positive integer"),
    ("experts 2**16+8", lambda: MoEProblem(**BASE | {"experts": 2**16 + 8}), ProblemError,
     "experts", "MAX_EXPERTS"),
    ("top_k None", lambda: MoEProblem(**BASE | {"top_k": None}), ProblemError, "top_k",
     "positive integer"),
    ("top_k > E", lambda: MoEProblem(**BASE | {"top_k": 9}), ProblemError, "top_k",
     "between 1 and experts=8"),
    ("world_size 0", lambda: MoEProblem(**BASE, world_size=0), ProblemError, "world_size",
     "positive integer"),
    ("world_size bool", lambda: MoEProblem(**BASE, world_size=True), ProblemError,
     "world_size", "positive integer"),
    ("E % P", lambda: MoEProblem(**BASE, world_size=3), ProblemError, "experts",
     "[1, 2, 4, 8]"),
    ("tokens float", lambda: MoEProblem(**BASE, tokens_per_rank=1.5), ProblemError,
     "tokens_per_rank", "non-negative integer"),
    ("tokens 2**24+1", lambda: MoEProblem(**BASE, tokens_per_rank=2**24 + 1), ProblemError,
     "tokens_per_rank", "MAX_TOKENS"),
    ("shared_intermediate bool", lambda: MoEProblem(**BASE, shared_experts=1,
                                                    shared_intermediate=True),
     ProblemError, "shared_intermediate", "multiple of 8"),
    ("shared_intermediate 2**21", lambda: MoEProblem(**BASE, shared_experts=1,
                                                     shared_intermediate=2**21),
     ProblemError, "shared_intermediate", "MAX_WIDTH"),
    ("capacity_factor str", lambda: MoEProblem(**BASE, capacity_factor="1.25"), ProblemError,
     "capacity_factor", "finite number > 0"),
    ("capacity_factor bool", lambda: MoEProblem(**BASE, capacity_factor=True), ProblemError,
     "capacity_factor", "finite number > 0"),
    ("capacity_factor inf", lambda: MoEProblem(**BASE, capacity_factor=math.inf),
     ProblemError, "capacity_factor", "finite number > 0"),
    ("capacity_factor nan", lambda: MoEProblem(**BASE, capacity_factor=math.nan),
     ProblemError, "capacity_factor", "finite number > 0"),
    ("capacity_factor 1e308", lambda: MoEProblem(**BASE, capacity_factor=1e308),
     ProblemError, "capacity_factor", "MAX_TOKENS"),
    ("dtype None", lambda: MoEProblem(**BASE, dtype=None), ProblemError, "dtype",
     "supported: bf16"),
    ("normalize_topk int", lambda: MoEProblem(**BASE, normalize_topk=1), ProblemError,
     "normalize_topk", "must be a bool"),
    # KernelConfig and GemmTile
    ("parse None", lambda: KernelConfig.parse(None), ConfigError, "config", "(str)"),
    ("parse 123", lambda: KernelConfig.parse(123), ConfigError, "config", "(str)"),
    ("parse dict", lambda: KernelConfig.parse({"gate_up": 1}), ConfigError, "config",
     "(str)"),
    ("parse bad JSON", lambda: KernelConfig.parse('{"gate_up": '), ConfigError, "json",
     "not valid JSON"),
    ("parse JSON list", lambda: KernelConfig.parse("[]"), ConfigError, "config",
     "JSON object"),
    ("parse bad name", lambda: KernelConfig.parse("fast"), ConfigError, "name",
     "KernelConfig.name"),
    ("from_json None", lambda: KernelConfig.from_json(None), ConfigError, "json",
     "JSON text"),
    ("from_dict list", lambda: KernelConfig.from_dict([1]), ConfigError, "config",
     "JSON object"),
    ("from_dict missing down", lambda: KernelConfig.from_dict({"gate_up": TILE}),
     ConfigError, "down", "required"),
    ("from_dict tile extra", lambda: KernelConfig.from_dict(
        {"gate_up": TILE | {"bq": 1}, "down": TILE}), ConfigError, "gate_up", "unknown ['bq']"),
    ("from_dict tile missing", lambda: KernelConfig.from_dict(
        {"gate_up": {"bm": 64}, "down": TILE}), ConfigError, "gate_up", "missing ['bk'"),
    ("from_name int", lambda: KernelConfig.from_name(5), ConfigError, "name", "(str)"),
    ("tile parse None", lambda: GemmTile.parse(None), ConfigError, "tile", "(str)"),
    ("tile parse bad", lambda: GemmTile.parse("bm64"), ConfigError, "tile",
     "bm128_bn64_bk64_w4x2_s3"),
    ("validate problem None", lambda: KernelConfig(T, T).validate(None), ArgumentError,
     "problem", "MoEProblem"),
    ("validate problem dict", lambda: KernelConfig(T, T).validate(BASE), ArgumentError,
     "problem", "MoEProblem"),
    ("validate arch unknown", lambda: KernelConfig(T, T).validate(P, "sm_99"), DeviceError,
     "sm_99", "known: sm_80"),
    ("validate arch int", lambda: KernelConfig(T, T).validate(P, 90), DeviceError, "90",
     "known: sm_80"),
    ("chunks 0", lambda: KernelConfig(T, T, chunks_per_peer=0).validate(P), ConfigError,
     "chunks_per_peer", "choose 1..16"),
    ("comm_streams 3", lambda: KernelConfig(T, T, comm_streams=3).validate(P), ConfigError,
     "comm_streams", "[1, 2, 4]"),
    # limits, space, launcher
    ("limits_for list", lambda: limits_for(["sm_90"]), DeviceError, "['sm_90']", "known"),
    ("limits_for None", lambda: limits_for(None), DeviceError, "None", "known"),
    ("space size", lambda: SearchSpace.for_problem(P, "sm_90", "huge"), ConfigError, "space",
     "['full', 'small', 'steep']"),
    ("mpi_ranks 0", lambda: launch.mpi_ranks(0), UsageError, "--gpus", "positive integer"),
    ("mpi_ranks bool", lambda: launch.mpi_ranks(True), UsageError, "--gpus",
     "positive integer"),
    ("--world-size vs ranks", lambda: problem_from_args(
        cli.build_parser().parse_args(["tune", "--world-size", "4"]), world_size=2),
     UsageError, "--world-size", "this job has 2 rank(s)"),
    # weights
    ("check on a list", lambda: MoEWeights.check([1, 2], P), ArgumentError, "weights",
     "MoEWeights"),
    ("check problem list", lambda: _weights().check([64, 32]), ArgumentError, "problem",
     "MoEProblem"),
    ("check list field", lambda: _weights(gate=[[0]]).check(MoEProblem(64, 32, 4, 2)),
     ProblemError, "weights.gate", "numpy array"),
    ("check wrong shape", lambda: _weights().check(MoEProblem(64, 32, 8, 2)), ProblemError,
     "weights.gate", "expected shape (64, 8)"),
    ("check wrong dtype", lambda: _weights(w2=_weights().w2.astype(np.float32)).check(
        MoEProblem(64, 32, 4, 2)), ProblemError, "weights.w2", "uint16"),
    ("check first_expert", lambda: _weights(first_expert=3).check(MoEProblem(64, 32, 4, 2)),
     ProblemError, "first_expert", "0..0"),
    ("random seed -1", lambda: MoEWeights.random(P, -1), ArgumentError, "seed",
     "non-negative"),
    ("random experts list", lambda: MoEWeights.random(MoEProblem(64, 32, 4, 2), 0, [0, 1]),
     ProblemError, "experts", "contiguous range"),
    ("random experts beyond E", lambda: MoEWeights.random(MoEProblem(64, 32, 4, 2), 0,
                                                           range(0, 9)),
     ProblemError, "experts", "within 0..4"),
    ("random_tokens -1", lambda: random_tokens(-1, 64, 0), ArgumentError, "tokens",
     "non-negative"),
    ("random_tokens seed str", lambda: random_tokens(4, 64, "0"), ArgumentError, "seed",
     "non-negative"),
]


@pytest.mark.parametrize("name,call,kind,field,valid", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refusal_is_typed(name, call, kind, field, valid):
    with pytest.raises(kind) as e:
        call()
    assert isinstance(e.value, FlashMoEError)
    assert field in str(e.value) and valid in str(e.value), str(e.value)


# -- 5. main(): expected failures are one line, bugs are not hidden ----------------------
@pytest.mark.parametrize("exc,words", [
    (PermissionError(13, "Permission denied", "/x/layer.cu"), "PermissionError"),
    (json.JSONDecodeError("Expecting value", "{", 1), "invalid JSON"),
], ids=["OSError", "JSONDecodeError"])
def test_main_maps_expected_failures(capsys, monkeypatch, exc, words):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr("flashmoe_gen.export.export_cu", boom)
    rc, err = run_cli(capsys, ["export", *SEED])
    assert rc == 2 and err.startswith(f"flashmoe-tune: {words}: ") and err.count("\n") == 1


def test_main_interrupt_is_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("flashmoe_gen.export.export_cu", interrupted)
    assert run_cli(capsys, ["export", *SEED]) == (130, "flashmoe-tune: interrupted\n")


def test_main_does_not_hide_bugs(monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("a genuine bug")
    monkeypatch.setattr("flashmoe_gen.export.export_cu", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["export", *SEED])


# -- the count the docstring states -------------------------------------------------------
CASE_COUNT = (len(PARSE_CASES) + len(VALUE_CASES) + 3 + 1 + 3 + 1 + 1 + 1 + 1 + len(API_CASES)
              + 2 + 1 + 1)


def test_catalogue_size_matches_the_docstring():
    doc = textwrap.dedent(__doc__)
    stated = [int(line.rsplit(":", 1)[1]) for line in doc.splitlines()
              if line.startswith(("- ", "  ")) and line.rstrip()[-1:].isdigit()]
    assert sum(stated) == CASE_COUNT >= 90
