"""Expert GEMMs alone on one GPU: mma.sync, wgmma, the persistent TMA kernel and
weight-streaming tiles vs torch._grouped_mm.

Each case runs one local-expert block the way the layer does (gate/up with SiLU*mul, then
down) on full slots of ``rows`` tokens per expert, and reports the median time (CUDA
events, warm-up first), TFLOP/s and the effective weight bandwidth (weight bytes / time)
against the card's copy bandwidth measured in the same run (the decode roofline: the
weights must be read once). Same bf16 data for every variant; each variant's output is
checked against torch's.

    python bench/gemm_bench.py --out bench/results/gemm.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, md_table  # noqa: E402

#: (label, hidden, intermediate, local experts, rows per expert): large batches at 2 ranks,
#: Mixtral T=4096 as one rank of 4 computes it (fused: every source's 1024 rows per expert
#: in one launch; per source: one of the four launches), the FlashDMoE setting (E=64, k=2,
#: T=16384 per rank at 4 ranks) and decode shapes (DeepSeek-V3-like at 4 ranks: 64 local
#: experts; DeepSeek-V2-Lite at 2 ranks).
CASES = [("mixtral_t4096", 4096, 14336, 4, 2048), ("mixtral_p4_fused", 4096, 14336, 2, 4096),
         ("mixtral_p4_source", 4096, 14336, 2, 1024),
         # a source's group one 64-row remainder past 8 full tiles (rows ~1024 +- 30 in the
         # layer): the tma kernel's second warpgroup has no rows in the last tile
         ("mixtral_p4_ragged", 4096, 14336, 2, 1088), ("dsv2lite_t4096", 2048, 1408, 32, 768),
         ("dsv2lite_t512", 2048, 1408, 32, 96), ("flashdmoe_e64", 2048, 2048, 32, 256),
         ("flashdmoe_t16384", 2048, 2048, 16, 2048),
         ("dsv3_decode_r16", 7168, 2048, 64, 16), ("dsv3_decode_r32", 7168, 2048, 64, 32),
         ("dsv3_decode_r64", 7168, 2048, 64, 64), ("dsv2lite_decode_r8", 2048, 1408, 32, 8)]
WGMMA = ["gu_bm128_bn128_bk64_w8x1_s4_wg__dn_bm128_bn128_bk64_w8x1_s4_wg",
         "gu_bm128_bn64_bk64_w8x1_s4_wg__dn_bm128_bn256_bk64_w8x1_s3_wg",
         "gu_bm64_bn128_bk64_w4x1_s4_wg__dn_bm64_bn128_bk64_w4x1_s4_wg"]
#: The persistent TMA kernel (producer warpgroup, two wgmma consumer warpgroups).
TMA = ["gu_bm128_bn128_bk64_w8x1_s4_tma__dn_bm128_bn256_bk64_w8x1_s3_tma",
       "gu_bm128_bn128_bk64_w8x1_s4_tma__dn_bm128_bn128_bk64_w8x1_s4_tma",
       "gu_bm128_bn64_bk64_w8x1_s6_tma__dn_bm128_bn256_bk64_w8x1_s4_tma"]
#: Weight-streaming pairs, timed where an expert has at most WS_ROWS rows (decode).
WS = ["gu_bm16_bn64_bk64_w4x1_s4_ws__dn_bm16_bn128_bk64_w4x1_s4_ws",
      "gu_bm32_bn64_bk64_w4x1_s4_ws__dn_bm32_bn128_bk64_w4x1_s4_ws",
      "gu_bm32_bn64_bk64_w4x1_s6_ws__dn_bm32_bn64_bk64_w4x1_s6_ws",
      "gu_bm64_bn128_bk64_w8x1_s4_ws__dn_bm64_bn128_bk64_w8x1_s4_ws",
      # the nccl default's tiles where experts average ~28-32 rows (tiles.ws_token_tile)
      "gu_bm64_bn64_bk64_w4x1_s4_ws__dn_bm64_bn128_bk64_w4x1_s4_ws"]
WS_ROWS = 64


def device_weights(p, seed: int = 3):
    """Random N(0, 1/fan_in) weights made on the GPU, expert by expert (the host generator
    takes minutes for the DeepSeek-V3-sized cases; any values do for timing)."""
    import cupy

    from flashmoe_gen.device_weights import DeviceWeights

    rng = cupy.random.default_rng(seed)

    def bits(shape, fan_in):  # bf16 by truncating float32 (good enough for a benchmark)
        out = cupy.empty(shape, np.uint16)
        for e in range(shape[0]):
            f = rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(fan_in ** -0.5)
            out[e] = (f.view(np.uint32) >> 16).astype(np.uint16)
        return out

    h, i, el = p.hidden, p.intermediate, p.local_experts
    return DeviceWeights(bits((1, h, p.experts), h)[0], bits((el, i, h), h),
                         bits((el, i, h), h), bits((el, h, i), i))


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), this card now."""
    import cupy
    src = cupy.ones(nbytes // 2, np.uint16)
    dst = cupy.empty_like(src)
    ms = time_ms(lambda: dst.__setitem__(Ellipsis, src), iters)
    return 2 * nbytes / (ms * 1e-3)


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    import cupy
    for _ in range(warmup):
        fn()
    evs = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(iters)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    evs[-1][1].synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(a, b) for a, b in evs]))


def measure_case(label: str, h: int, i: int, el: int, rows: int, iters: int,
                 copy_bw: float, knobs: str = "", tiles: str = "") -> dict:
    """Torch and every tile variant on one shape; errors are relative to torch's output.
    ``knobs``: config-name parts every variant but the default takes (e.g. "__ts");
    ``tiles``: comma-separated parts of the variants' names to keep (e.g. "_tma")."""
    import cupy
    import torch

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.runtime import FlashMoE

    stream = cupy.cuda.get_current_stream()
    p = MoEProblem(h, i, el, 1, tokens_per_rank=rows)
    flops = 2 * 3 * h * i * rows * el
    torch.manual_seed(0)
    x = (torch.randn(el * rows, h, device="cuda") * 0.5).bfloat16()
    variants = {"sync_default": KernelConfig.default(p, "sm_80")}  # the arch-neutral default
    names = (WGMMA + TMA if rows >= 64 else []) + (WS if rows <= WS_ROWS else [])
    names = [n for n in names if not tiles or any(t in n for t in tiles.split(","))]
    for base in names:
        cfg = KernelConfig.from_name(base + "__r8__c1__cs1__ss1" + knobs)
        try:
            cfg.validate(p, "sm_90")
            variants[base] = cfg
        except Exception as e:  # tile wider than this problem: say so, keep going
            print(f"{label}: skip {base}: {e}", file=sys.stderr)
    first = FlashMoE(p, variants["sync_default"], weights=device_weights(p))
    w1, w3, w2 = (torch.from_dlpack(t).view(torch.bfloat16) for t in
                  (first.w1, first.w3, first.w2))
    offs = torch.arange(1, el + 1, device="cuda", dtype=torch.int32) * rows
    w13t = torch.cat([w1, w3], 1).transpose(1, 2)   # [E, H, 2I]
    w2t = w2.transpose(1, 2)                        # [E, I, H]

    def torch_fn():
        hh = torch._grouped_mm(x, w13t, offs=offs)
        g, u = hh[:, :i], hh[:, i:]
        return torch._grouped_mm(torch.nn.functional.silu(g) * u, w2t, offs=offs)

    ref = torch_fn().float().cpu().numpy().astype(np.float64)
    weight_bytes = 3 * h * i * el * 2
    res = {"case": label, "rows": rows, "torch_ms": time_ms(torch_fn, iters),
           "weight_gb": round(weight_bytes / 1e9, 3),
           "floor_ms": round(weight_bytes / copy_bw * 1e3, 4)}
    counts = cupy.full(el, rows, np.int32)
    xs = cupy.from_dlpack(x.view(torch.int16)).view(np.uint16)
    for name, cfg in variants.items():
        layer = first if name == "sync_default" else FlashMoE(p, cfg, weights=first.weights)
        act = cupy.empty((el, rows, i), np.uint16)
        y = cupy.full((el, rows, h), 0xFFFF, np.uint16)

        grouped = dict(counts=counts, count_cap=rows, rows_fixed=0, inner_groups=0,
                       a_outer_stride=0, c_outer_stride=0, counts_outer_stride=0,
                       skip_outer=-1, a_row_off=0, c_row_off=0)

        def ours(layer=layer, act=act, y=y, grouped=grouped):
            layer.gemm(True, rows, el, stream, A=xs, a_group_stride=rows * h, B0=layer.w1,
                       B1=layer.w3, b_group_stride=i * h, C=act, c_group_stride=rows * i, N=i,
                       K=h, **grouped)
            layer.gemm(False, rows, el, stream, A=act, a_group_stride=rows * i, B0=layer.w2,
                       B1=0, b_group_stride=h * i, C=y, c_group_stride=rows * h, N=h, K=i,
                       **grouped)
        ours()
        got = torch.from_dlpack(y).view(torch.bfloat16).reshape(el * rows, h)
        err = relative_error(got.float().cpu().numpy().astype(np.float64), ref)
        ms = time_ms(ours, iters)
        res[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                     "weight_tbs": round(weight_bytes / ms / 1e9, 2),
                     "err_vs_torch": float(f"{err:.2e}")}
    res["torch_tflops"] = round(flops / res["torch_ms"] / 1e9, 1)
    res["torch_weight_tbs"] = round(weight_bytes / res["torch_ms"] / 1e9, 2)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--cases", default="", help="comma-separated case labels (default: all)")
    ap.add_argument("--knobs", default="", help="config-name parts every tile variant "
                    "takes, e.g. __ts (silu by tanh)")
    ap.add_argument("--tiles", default="", help="comma-separated parts of the tile variants' "
                    "names to time, e.g. _tma (default: all)")
    a = ap.parse_args()

    import cupy

    card = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_bw = copy_bandwidth()
    print(json.dumps({"card": card, "copy_tbs": round(copy_bw / 1e12, 2)}), flush=True)
    cases = [c for c in CASES if not a.cases or c[0] in a.cases.split(",")]
    rows_out = []
    for case in cases:
        rows_out.append(measure_case(*case, iters=a.iters, copy_bw=copy_bw, knobs=a.knobs,
                                     tiles=a.tiles))
        print(json.dumps(rows_out[-1]), flush=True)

    names = ["sync_default", *WGMMA, *TMA, *WS]
    with_knobs = f"; every tile variant with `{a.knobs}`" if a.knobs else ""
    head = (f"# Expert GEMMs alone: 1 x {card}, {datetime.date.today()}, commit {a.commit}\n\n"
            "Gate/up (SiLU*mul) + down over all local experts, full slots; median of "
            f"{a.iters} (CUDA events){with_knobs}. TFLOP/s and effective weight bandwidth "
            "(weight bytes / time, TB/s); torch = `torch._grouped_mm` x2 + silu*mul. Copy "
            f"bandwidth of this card in this run: {copy_bw / 1e12:.2f} TB/s; floor = weights / "
            "copy bandwidth.\n\n")
    cols = ["case", "rows", "floor ms", "torch", *[f"v{j}" for j in range(len(names))]]
    cells = []
    for r in rows_out:
        row = [r["case"], r["rows"], f"{r['floor_ms']:.3f}",
               f"{r['torch_tflops']} TF, {r['torch_weight_tbs']} TB/s ({r['torch_ms']:.3f} ms)"]
        for n in names:
            v = r.get(n)
            row.append(f"{v['tflops']} TF, {v['weight_tbs']} TB/s ({v['ms']:.3f} ms, "
                       f"err {v['err_vs_torch']:.0e})" if v else "-")
        cells.append(row)
    legend = "\n".join(f"- v{j}: `{n}`" for j, n in enumerate(names))
    emit(head + md_table(cols, cells) + "\n" + legend + "\n", rows_out, a.out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
