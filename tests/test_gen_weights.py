"""Counter-based weights (flashmoe_gen.gen_weights), the sampled check's host side, the
memory arithmetic and the tune's progress lines: all on CPU (the GPU side is in
tests/test_gpu_gen_weights.py)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen import gen_weights as g
from flashmoe_gen.check import TOLERANCE, sample_rows, sampled_errors
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ArgumentError, ProblemError
from flashmoe_gen.memory import MemoryUse, buffer_bytes, host_buffer_bytes, weight_bytes
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error
from flashmoe_gen.sampled_reference import rows_reference, used_experts
from flashmoe_gen.weights import random_tokens

P = MoEProblem(64, 32, 16, 4, shared_experts=2, shared_intermediate=48, tokens_per_rank=100)
RULES = [
    {},
    {"shared_experts": 2, "shared_gate": True},
    {"scoring": "sigmoid", "expert_bias": True, "n_group": 4, "topk_group": 2,
     "routed_scaling": 2.5},
    {"capacity_factor": 0.5, "normalize_topk": False},
]


def python_element(seed: int, tensor: int, expert: int, index: int, fan_in: int) -> int:
    """One element from the docstring's formula with Python ints (no NumPy wrap-around)."""
    m64 = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    key = mix(mix(mix(seed) ^ tensor) ^ expert)
    m = mix((key + (index + 1) * 0x9E3779B97F4A7C15) & m64) >> 40
    v = np.float32(np.float32(m) - np.float32(8388607.5)) * \
        np.float32(math.sqrt(3 / fan_in) / 2**23)
    return int(bf16.to_bits(np.array([v], np.float32))[0])


def test_elements_follow_the_documented_formula_and_a_pinned_stream():
    a = g.host_tensor(5, g.W2, 3, (40, 50), 40).ravel()
    for i in (0, 1, 777, 1999):
        assert a[i] == python_element(5, g.W2, 3, i, 40)
    # The scheme is a contract between NumPy, CUDA and any stored result: pinned.
    assert g.host_tensor(0, g.W1, 0, (8,), 64).tolist() == [
        0xbdd8, 0xbe37, 0xbdba, 0x3ceb, 0x3daa, 0x3ca6, 0xbdff, 0xbd20]


def test_deterministic_per_seed_tensor_and_expert():
    one = g.host_tensor(3, g.W1, 7, (64, 32), 64)
    assert np.array_equal(one, g.host_tensor(3, g.W1, 7, (64, 32), 64))
    for other in (g.host_tensor(4, g.W1, 7, (64, 32), 64),   # seed
                  g.host_tensor(3, g.W3, 7, (64, 32), 64),   # tensor
                  g.host_tensor(3, g.W1, 8, (64, 32), 64)):  # expert
        assert (other != one).mean() > 0.9


def test_an_expert_does_not_depend_on_which_experts_are_requested_with_it():
    full = g.generated_weights(P, 11)
    part = g.generated_weights(P, 11, range(5, 9))
    assert part.first_expert == 5
    for j, e in enumerate(range(5, 9)):
        w1, w3, w2 = g.expert_host(P, 11, e)
        for name, alone in (("w1", w1), ("w3", w3), ("w2", w2)):
            assert np.array_equal(getattr(part, name)[j], alone)
            assert np.array_equal(getattr(full, name)[e], alone)
    for name in ("gate", "shared_w1", "shared_w3", "shared_w2"):
        assert np.array_equal(getattr(part, name), getattr(full, name))
    full.check(P)


def test_values_are_uniform_with_variance_one_over_fan_in():
    fan_in = 2048
    x = bf16.from_bits(g.host_tensor(1, g.W2, 0, (fan_in, 512), fan_in)).astype(np.float64)
    a = math.sqrt(3 / fan_in)
    assert abs(x.mean()) < 0.01 * a
    assert x.var() * fan_in == pytest.approx(1.0, abs=0.01)
    assert np.abs(x).max() <= a * (1 + 2**-8)  # bf16 rounding may pass a by half an ulp
    hist = np.histogram(x, bins=10, range=(-a, a))[0] / x.size  # flat, not bell-shaped
    assert np.allclose(hist, 0.1, atol=0.01)


def test_bits_are_bf16_that_round_trip():
    bits = g.host_tensor(2, g.GATE, 0, (64, 16), 64)
    assert bits.dtype == np.uint16
    assert np.array_equal(bf16.to_bits(bf16.from_bits(bits)), bits)
    f = g.uniform_f32(2, g.GATE, 0, np.arange(64 * 16, dtype=np.uint64), g.scale(64))
    assert np.array_equal(bits.ravel(), bf16.to_bits(f))


def test_routing_vectors_follow_the_rule():
    p = MoEProblem(64, 32, 16, 4, scoring="sigmoid", expert_bias=True, shared_gate=True,
                   shared_experts=1, tokens_per_rank=8)
    w = g.generated_weights(p, 0)
    w.check(p)
    assert w.expert_bias.dtype == np.float32 and 0.03 < w.expert_bias.std() < 0.3
    assert np.array_equal(g.generated_expert_bias(p, 0)[3:5],
                          g.generated_expert_bias(p, 0)[3:5])
    plain = g.generated_weights(P, 0)
    assert plain.expert_bias is None and plain.shared_gate is None


def test_bad_arguments_are_named():
    with pytest.raises(ArgumentError, match="seed"):
        g.host_tensor(-1, g.W1, 0, (2,), 2)
    with pytest.raises(ProblemError, match="experts"):
        g.generated_weights(P, 0, range(10, 20))
    with pytest.raises(ProblemError, match="expert"):
        g.expert_host(P, 0, 16)
    # refused before any GPU work (these run without one)
    from flashmoe_gen.device_weights import DeviceWeights

    with pytest.raises(ProblemError, match="rank.*0..1"):
        DeviceWeights.generate(P.replace(world_size=2), 2, 0)
    with pytest.raises(ProblemError, match="MoEProblem"):
        DeviceWeights.generate("p", 0, 0)


def test_cuda_generator_source_compiles_with_nvrtc():
    try:
        from cupy.cuda import nvrtc  # what flashmoe_gen.compile uses; needs no GPU
        nvrtc.getVersion()
    except Exception as e:  # no CuPy, or no libnvrtc
        pytest.skip(f"NVRTC not available: {e}")
    prog = nvrtc.createProgram(g.cuda_source(), "gen_weights.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90"])
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert g.KERNEL_NAME in text
    assert "mul.rn.f32" in text  # the one rounded multiply, never fused into an FMA


# -- the sampled check, host side (xp = numpy: the code the GPU runs with cupy) -----------
def test_sample_rows_are_deterministic_distinct_and_all_when_few():
    assert sample_rows(10, 0, 0, 64).tolist() == list(range(10))
    a = sample_rows(1000, 3, 1, 64)
    assert len(a) == 64 and len(set(a.tolist())) == 64 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_rows(1000, 3, 1, 64))
    assert not np.array_equal(a, sample_rows(1000, 3, 2, 64))  # another rank: other rows
    assert sample_rows(0, 0, 0).size == 0


def test_used_experts_are_those_of_the_rows_that_are_kept():
    idx = np.array([[3, 1], [1, 7], [7, 3]])
    assert used_experts(idx).tolist() == [1, 3, 7]
    coef = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])  # (1, 1) and (2, 3) dropped
    assert used_experts(idx, coef).tolist() == [1, 3, 7]
    assert used_experts(idx[1:], coef[1:]).tolist() == [7]
    assert used_experts(np.array([[2, 99], [-1, 4]]), experts=16).tolist() == [2, 4]


def test_the_sampled_reference_touches_only_the_experts_of_its_rows(monkeypatch):
    from flashmoe_gen import sampled_reference

    seen = []
    real = sampled_reference._routed_expert
    monkeypatch.setattr(sampled_reference, "_routed_expert",
                        lambda p, s, e, xp: seen.append(e) or real(p, s, e, xp))
    x = random_tokens(3, P.hidden, seed=1)
    idx = np.array([[3, 1, 9, 4], [1, 7, 3, 4], [4, 3, 1, 7]])
    rows_reference(P, x, idx, np.full(idx.shape, 0.25), 0)
    assert seen == [1, 3, 4, 7, 9]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "_".join(r) or "plain")
def test_sampled_rows_equal_the_full_reference(rule):
    p = P.replace(**rule) if "shared_experts" in rule else P.replace(shared_experts=0,
                                                                       **rule)
    w = g.generated_weights(p, 7)
    x = random_tokens(100, p.hidden, seed=3)
    cap = p.fixed_capacity(1)
    ref = moe_reference(p, [x], w, capacity=cap)
    rows = sample_rows(100, 7, 0, 32)
    idx = ref.routing[0].topk_idx
    coef = ref.routing[0].topk_w * ref.kept[0]
    mine = rows_reference(p, x[rows], idx[rows], coef[rows], 7)
    assert relative_error(mine, ref.out[0][rows]) < 1e-12
    # the check: the reference's own output (rounded to bf16, as a layer stores it) passes
    got = bf16.round_bf16(ref.out[0].astype(np.float32)).astype(np.float64)
    err, mism = sampled_errors(p, x[rows], got[rows], idx, rows, 7, cap)
    assert err < TOLERANCE and mism == 0


def test_sampled_check_detects_a_wrong_row_and_a_wrong_routing():
    w = g.generated_weights(P, 7)
    x = random_tokens(100, P.hidden, seed=3)
    ref = moe_reference(P, [x], w)
    rows = sample_rows(100, 7, 0, 32)
    idx = ref.routing[0].topk_idx
    bad = ref.out[0].copy()
    bad[rows[5]] *= 1.5
    err, mism = sampled_errors(P, x[rows], bad[rows], idx, rows, 7, None)
    assert err > TOLERANCE and mism == 0
    wrong = idx.copy()
    wrong[rows[0], 0] = next(e for e in range(P.experts) if e not in idx[rows[0]])
    wrong[rows[1], 1] = 99  # out of range: counted, never indexed
    cache: dict = {}
    err, mism = sampled_errors(P, x[rows], ref.out[0][rows], wrong, rows, 7, None, cache=cache)
    assert mism == 2 and err > TOLERANCE
    # the cache keeps the gate and the reference of this routing
    assert ("gate", 7) in cache and sum(k[0] == "ref" for k in cache) == 1


# -- memory arithmetic -----------------------------------------------------------------
def test_weight_bytes_count_every_array_a_rank_holds():
    p = P.replace(world_size=4, expert_bias=True, scoring="sigmoid", shared_gate=True)
    w = g.generated_weights(p, 0, range(4, 8))  # rank 1's experts
    held = sum(a.nbytes for a in (w.gate, w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3,
                                  w.shared_w2, w.expert_bias, w.shared_gate))
    assert weight_bytes(p) == held


def test_host_buffer_bytes_mirror_the_runtime_allocations():
    p = MoEProblem(1024, 512, 16, 2, shared_experts=1, world_size=2, tokens_per_rank=100)
    cfg = KernelConfig.default(p, "sm_90")
    bm, fuse = cfg.block_m, cfg.fuse_sources
    cap = -(-100 // bm) * bm  # every token of a source at one expert, in tiles
    want = (4 * 2 * 8 * cap * 1024 * 2                    # L[P][2][2][E/P][C][H]
            + (2 if fuse else 1) * 8 * cap * 512 * 2      # expert activations
            + 100 * (3 * 4 * 2 + (512 + 1024) * 2)        # topk ids/weights/pos, shared
            + 2 * 2 * 16 * 4)                             # counts and row offsets
    assert host_buffer_bytes(p, cfg) == want
    assert host_buffer_bytes(p, cfg, capacity=bm) < want
    assert buffer_bytes(p, cfg) == want
    cf = p.replace(capacity_factor=1.0)
    assert host_buffer_bytes(cf, cfg) == host_buffer_bytes(cf, cfg, cf.fixed_capacity(bm))
    gathered = dataclasses.replace(cfg, fuse_sources=True, gather_experts=True)
    fused = dataclasses.replace(gathered, gather_experts=False)
    assert host_buffer_bytes(p, gathered) - host_buffer_bytes(p, fused) == \
        8 * 2 * cap * 1024 * 2 + 8 * 4  # [E/P][P x C][H] and a row count per expert


def test_memory_use_headroom_and_table():
    from rich.console import Console

    from flashmoe_gen.tuner.progress import memory_table

    ok = MemoryUse(0, 3 * 2**30, 2**30, 10 * 2**30, 80 * 2**30)
    tight = MemoryUse(1, 3 * 2**30, 12 * 2**30, 10 * 2**30, 80 * 2**30)
    assert ok.headroom == 9 * 2**30 and tight.headroom == -2 * 2**30
    con = Console(file=io.StringIO(), width=160)
    con.print(memory_table([ok, tight]))
    text = con.file.getvalue()
    assert "3.00 GiB" in text and "9.00 GiB" in text and "-2.00 GiB (does not fit)" in text


# -- progress without a terminal, and the tune command's set-up lines -------------------------
def test_progress_prints_plain_lines_without_a_terminal():
    from rich.console import Console

    from flashmoe_gen.tuner.progress import TuneProgress
    from flashmoe_gen.tuner.study import TrialResult

    con = Console(file=io.StringIO(), width=200)
    assert not con.is_terminal
    pr = TuneProgress(2, "T=8 ", console=con)
    pr.stage("setting up", trial=False)
    pr.stage("compiling/loading cfgA")
    cfg = KernelConfig.default(P, "sm_90")
    from flashmoe_gen.tuner.objective import Outcome
    res = TrialResult(0, cfg, Outcome("ok", 1.25))
    pr.trial(res, res)
    pr.stage("timing")
    pr.stop()
    lines = con.file.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("[") and " s] T=8 " in line
                                   for line in lines)
    assert lines[0].endswith("setting up")
    assert lines[1].endswith("trial 1/2: compiling/loading cfgA")
    assert "trial 1/2 done: 1.2500 ms (best 1.2500 ms) " + cfg.name in lines[2]
    assert lines[3].endswith("trial 2/2: timing")


def test_progress_on_a_terminal_runs_a_live_bar():
    from rich.console import Console

    from flashmoe_gen.tuner.progress import TuneProgress

    con = Console(file=io.StringIO(), force_terminal=True, width=120)
    pr = TuneProgress(3, console=con)
    pr.stage("compiling/loading x")
    pr.stop()
    pr.stop()  # idempotent: the command stops it on every path
    assert "trial 1/3: compiling/loading x" in con.file.getvalue()


def test_tune_shows_stages_and_the_memory_report_from_the_start(tmp_path, monkeypatch, capsys):
    """The real tune command (one rank, the fake evaluator) with an evaluator that reports
    stages and memory as the GPU one does: the launch line comes first, then set-up, the
    memory table and each stage of each trial."""
    import fake_backend

    import flashmoe_gen.tuner.tune_cmd as tune_cmd
    from flashmoe_gen.tuner.cli import main

    class Backend(fake_backend.CpuBackend):
        def evaluator(self, problem, world, space, a):
            evaluate, comm = super().evaluator(problem, world, space, a)
            stage = self.stage

            class Evaluate:
                memory = MemoryUse(0, 5 * 2**30, 2**30, 70 * 2**30, 80 * 2**30)

                def __call__(self, cfg):
                    stage(f"compiling/loading {cfg.name}")
                    stage("checking (sampled)")
                    stage("timing")
                    return evaluate(cfg)

            stage("generating this rank's weights on the GPU", False)
            return Evaluate(), comm

    monkeypatch.setattr(tune_cmd, "GpuBackend", Backend)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["tune", "--space", "small", "--sampler", "random", "--trials", "2",
                 "--db", f"sqlite:///{tmp_path}/w.db", "--storage",
                 f"sqlite:///{tmp_path}/s.db"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("flashmoe-tune: 2 trial(s) of moe_h512")
    assert lines[1].endswith("setting up weights and inputs on 1 rank(s)")
    assert lines[2].endswith("generating this rank's weights on the GPU")
    assert "GPU memory per rank" in out and "5.00 GiB" in out and "69.00 GiB" in out
    for i in (1, 2):
        for what in ("compiling/loading gu_", "checking (sampled)", "timing"):
            assert f"trial {i}/2: {what}" in out
        assert f"trial {i}/2 done: " in out
    assert out.index("trial 2/2 done") < out.index("winner stored")


def test_tune_help_documents_the_check_flags(capsys):
    from flashmoe_gen.tuner.cli import main

    assert main(["tune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--check {sampled,full}" in text and "--check-rows" in text
    assert "only the experts they use" in text
    assert main(["tune", "--check", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert main(["tune", "--check-rows", "0"]) == 2


def test_evaluator_refuses_an_unknown_check_mode():
    pytest.importorskip("cupy")
    from flashmoe_gen.tuner.objective import LayerEvaluator

    with pytest.raises(ArgumentError, match=r"check_mode.*'sampled', 'full'"):
        LayerEvaluator(P, check_mode="quick")
    with pytest.raises(ArgumentError, match="check_rows"):
        LayerEvaluator(P, check_rows=0)


def test_two_ranks_rank_0_prints_every_ranks_memory_once(tmp_path):
    """``mpirun -np 2``: the memory report gathers both ranks through the job's MPI
    communicator and only rank 0 prints (one table, one set of stage lines)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_mpi_cpu import _mpirun

    here = Path(__file__).parent
    env = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm", **os.environ,
           "PYTHONPATH": f"{here}{os.pathsep}{here / 'mpi'}", "FLASHMOE_COMM_TIMEOUT": "60"}
    cmd = [*_mpirun(), sys.executable, str(here / "mpi" / "tune_memory_cpu.py"), "--gpus",
           "2", "--space", "small", "--sampler", "random", "--trials", "2", "--db",
           f"sqlite:///{tmp_path}/w.db", "--storage", f"sqlite:///{tmp_path}/s.db"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count("GPU memory per rank") == 1
    table = out[out.index("GPU memory per rank"):]
    assert "1.00 GiB" in table and "2.00 GiB" in table and "59.50 GiB" in table
    assert out.count("trial 1/2: compiling/loading") == 1  # rank 0's stages only
    assert out.index("GPU memory per rank") < out.index("trial 1/2: compiling/loading")


def test_progress_style_under_mpirun_follows_the_launchers_terminal(monkeypatch):
    """Open MPI gives ranks a pseudo-terminal even when the job's output goes to a log, so
    under mpirun the bar is live only when the launching command saw a terminal."""
    from rich.console import Console

    from flashmoe_gen.tuner.launch import MPI_SIZE_VARS
    from flashmoe_gen.tuner.progress import LAUNCHER_TTY_ENV, PROGRESS_ENV, live_default

    tty = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO())
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv(LAUNCHER_TTY_ENV, raising=False)
    for var in MPI_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert live_default(tty) and not live_default(pipe)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert not live_default(tty)  # mpirun started by hand: plain lines, always readable
    monkeypatch.setenv(LAUNCHER_TTY_ENV, "1")
    assert live_default(tty) and not live_default(pipe)
    monkeypatch.setenv(PROGRESS_ENV, "plain")
    assert not live_default(tty)
    monkeypatch.setenv(PROGRESS_ENV, "live")
    assert live_default(pipe)
