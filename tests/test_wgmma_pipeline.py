"""ptxas's "wgmma serialized" notes: parsed into the resource report, warned about at build,
and absent from the warpgroup-MMA kernels we generate (NVRTC on the CPU; no GPU needed).

A serialised kernel computes the right answer, so no GPU test notices it: each of its
wgmma waits for the one before, and the k-loop loses its overlap. tanh_silu's tanh (a
plain asm the compiler may move) was hoisted above the final wgmma wait in the gate/up
kernel until the accumulators were pinned there (templates/gemm.cu.j2, wgmma_retire)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest

from flashmoe_gen.build import _check_resources, build
from flashmoe_gen.compile import (
    CompiledModule,
    KernelResources,
    compile_source,
    parse_ptxas_log,
)
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.errors import ConfigError, PerformanceWarning
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

E64 = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=16384)

LOG = """\
ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to non wgmma instructions reading accumulator registers of  a wgmma between \
start and end of the pipeline stage in the function '_Z5gemmv'
ptxas info    : 398 bytes gmem
ptxas info    : Compiling entry function '_Z5gemmv' for 'sm_90a'
ptxas info    : Function properties for _Z5gemmv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 174 registers, used 1 barriers, 16 bytes smem
ptxas info    : Compiling entry function 'moe_persistent' for 'sm_90a'
ptxas info    : Function properties for moe_persistent
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 247 registers, used 1 barriers, 17280 bytes smem
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))


def test_parse_serialized_note():
    res = parse_ptxas_log(LOG)
    assert res["_Z5gemmv"].wgmma_serialized == (
        "C7514: non wgmma instructions reading accumulator registers of a wgmma between "
        "start and end of the pipeline stage")
    assert res["_Z5gemmv"].registers == 174
    assert res["moe_persistent"].wgmma_serialized == ""
    assert res["moe_persistent"].registers == 247


def _wgmma_nccl(ts: bool) -> KernelConfig:
    """The NCCL path's gate/up and down on cp.async-fed warpgroup MMAs."""
    d = KernelConfig.default(E64, "sm_90")
    return replace(d, gate_up=replace(d.gate_up, mma="wgmma"),
                   down=replace(d.down, mma="wgmma"), tanh_silu=ts)


@pytest.mark.parametrize("case", ["nccl_wgmma_tanh", "nvlink_default"])
def test_wgmma_kernels_not_serialized(case):
    """Every kernel of the module keeps its wgmma pipelined: the NCCL path's wgmma tiles
    with silu by tanh (serialised, C7514, before wgmma_retire), and the persistent default
    (TMA row tasks, tanh silu, staged epilogues; its module holds the standalone wgmma
    kernels too)."""
    cfg = _wgmma_nccl(True) if case == "nccl_wgmma_tanh" else \
        KernelConfig.persistent_default(E64, "sm_90")
    assert cfg.tanh_silu
    mod = compile_source(render(E64, cfg, arch="sm_90"), "sm_90", use_cache=False)
    assert mod.arch == "sm_90a"
    wg = [k for k in mod.resources if "wg" in k or k == "moe_persistent"]
    assert wg, list(mod.resources)
    serialised = {k: r.wgmma_serialized for k, r in mod.resources.items()
                  if r.wgmma_serialized}
    assert not serialised, serialised
    assert "Potential Performance Loss" not in mod.log


def test_build_warns_about_serialized_kernels():
    """A kernel whose wgmma ptxas serialised is named, with its config and the reason."""
    layer = build(E64, _wgmma_nccl(True), "sm_90")
    gu = layer.kernels.gate_up
    ok = KernelResources(174, 0, 0, 0)
    mod = CompiledModule(name="m", arch="sm_90a", cubin_path="", lowered={},
                         resources={gu: replace(ok, wgmma_serialized="C7514: reasons"),
                                    layer.kernels.down: ok})
    with pytest.warns(PerformanceWarning) as rec:
        _check_resources(layer, mod)
    (w,) = rec
    assert w.message.kernel == gu and w.message.config_name == layer.config.name
    assert "C7514: reasons" in str(w.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_resources(layer, replace(mod, resources={gu: ok}))


def test_build_refuses_kernels_past_the_shared_memory_of_a_block():
    """Static shared memory (ptxas's count) beside the dynamic bytes the config sizes: past
    the block's opt-in limit the build names the kernel, both counts and what to change."""
    layer = build(E64, _wgmma_nccl(False), "sm_90")
    gu, limit = layer.kernels.gate_up, layer.limits.smem_per_block_optin
    ok = KernelResources(174, 0, 0, 0, static_smem=2048)
    mod = CompiledModule(name="m", arch="sm_90a", cubin_path="", lowered={},
                         resources={gu: ok}, dynamic_smem={gu: limit - 2048})
    _check_resources(layer, mod)  # exactly the limit fits
    with pytest.raises(ConfigError, match=f"{gu} needs {limit - 2047} B of dynamic and "
                       f"2048 B of static shared memory") as e:
        _check_resources(layer, replace(mod, dynamic_smem={gu: limit - 2047}))
    assert e.value.field == "gate_up.stages" and "fewer stages" in str(e.value)


def test_ws_wgmma_tasks_not_serialized():
    """The fused weight-streaming tasks on warpgroup MMAs (ws_wgmma) with silu by tanh."""
    p = E64.replace(tokens_per_rank=1024)
    ws = GemmTile(128, 128, 64, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, ws, transport="nvlink", fuse_sources=True, ws_tma=True,
                       ws_wgmma=True, tanh_silu=True)
    mod = compile_source(render(p, cfg, arch="sm_90"), "sm_90", use_cache=False)
    assert mod.resources["moe_persistent"].wgmma_serialized == ""
    assert "Potential Performance Loss" not in mod.log


def test_compile_command_names_serialized_kernels(monkeypatch, capsys):
    """`flashmoe-tune compile` adds a wgmma column and ptxas's reason where a kernel has
    it (a module whose report says so, as a bad template would make), none otherwise."""
    from flashmoe_gen import build as build_mod
    from flashmoe_gen.tuner.cli import main

    real = build_mod.build
    args = ["compile", "--hidden", "512", "--intermediate", "2048", "--experts", "8",
            "--top-k", "2", "--tokens", "256", "--arch", "sm_90"]
    assert main(args) == 0
    clean = capsys.readouterr().out
    assert "serialised" not in clean and "wgmma " not in clean

    class Layer:
        def __init__(self, layer):
            mod = layer.compiled
            k = layer.kernels.gate_up
            res = dict(mod.resources, **{k: replace(mod.resources[k],
                                                    wgmma_serialized="C7514: reasons")})
            self.compiled = replace(mod, resources=res)

    monkeypatch.setattr(build_mod, "build", lambda *a, **k: Layer(real(*a, **k)))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "serialised" in out and "ptxas serialised the wgmma of " in out
    assert "C7514: reasons" in out
