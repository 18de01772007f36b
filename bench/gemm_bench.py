"""Expert GEMMs alone on one GPU: mma.sync vs wgmma tiles vs torch._grouped_mm.

Each case runs one local-expert block the way the layer does (gate/up with SiLU*mul, then
down) on full slots of ``rows`` tokens per expert, and reports the median time (CUDA
events, warm-up first) and TFLOP/s. Same bf16 data for every variant; each variant's output
is checked against torch's.

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

#: (label, hidden, intermediate, local experts, rows per expert): the layer's shapes at 2 ranks.
CASES = [("mixtral_t4096", 4096, 14336, 4, 2048), ("dsv2lite_t4096", 2048, 1408, 32, 768),
         ("dsv2lite_t512", 2048, 1408, 32, 96), ("flashdmoe_e64", 2048, 2048, 32, 256)]
WGMMA = ["gu_bm128_bn128_bk64_w8x1_s4_wg__dn_bm128_bn128_bk64_w8x1_s4_wg",
         "gu_bm128_bn64_bk64_w8x1_s4_wg__dn_bm128_bn256_bk64_w8x1_s3_wg",
         "gu_bm64_bn128_bk64_w4x1_s4_wg__dn_bm64_bn128_bk64_w4x1_s4_wg"]


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


def measure_case(label: str, h: int, i: int, el: int, rows: int, iters: int) -> dict:
    """Torch and every tile variant on one shape; errors are relative to torch's output."""
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
    variants = {"sync_default": KernelConfig.default(p, "sm_80")}  # mma.sync heuristic tiles
    for base in WGMMA:
        cfg = KernelConfig.from_name(base + "__r8__c1__cs1__ss1")
        try:
            cfg.validate(p, "sm_90")
            variants[base] = cfg
        except Exception as e:  # tile wider than this problem: say so, keep going
            print(f"{label}: skip {base}: {e}", file=sys.stderr)
    first = FlashMoE(p, variants["sync_default"], seed=3)
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
    res = {"case": label, "torch_ms": time_ms(torch_fn, iters)}
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
                     "err_vs_torch": float(f"{err:.2e}")}
    res["torch_tflops"] = round(flops / res["torch_ms"] / 1e9, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()

    import cupy

    card = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows_out = []
    for case in CASES:
        rows_out.append(measure_case(*case, iters=a.iters))
        print(json.dumps(rows_out[-1]), flush=True)

    names = ["sync_default", *WGMMA]
    head = (f"# Expert GEMMs alone: 1 x {card}, {datetime.date.today()}, commit {a.commit}\n\n"
            "Gate/up (SiLU*mul) + down over all local experts, full slots; median of "
            f"{a.iters} (CUDA events). TFLOP/s; torch = `torch._grouped_mm` x2 + silu*mul.\n\n")
    cols = ["case", "torch", *[f"v{j}" for j in range(len(names))]]
    cells = []
    for r in rows_out:
        row = [r["case"], f"{r['torch_tflops']} ({r['torch_ms']:.3f} ms)"]
        for n in names:
            v = r.get(n)
            row.append(f"{v['tflops']} ({v['ms']:.3f} ms, err {v['err_vs_torch']:.0e})"
                       if v else "-")
        cells.append(row)
    legend = "\n".join(f"- v{j}: `{n}`" for j, n in enumerate(names))
    emit(head + md_table(cols, cells) + "\n" + legend + "\n", rows_out, a.out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
