"""A Mixtral-style Hugging Face block as a user calls it: the block's own eager forward on
one GPU vs FlashMoELayer on 1, 2 and 4 GPUs, in the same run.

Start it with as many ranks as the largest GPU count (it makes a process group of the
first P ranks for each P):

    torchrun --nproc-per-node 4 bench/hf_block.py --json hf_block.json
    torchrun --nproc-per-node 4 bench/hf_block.py --hidden 4096 --intermediate 14336 --tokens 4096

Each rank passes its own ``--tokens`` tokens. Times: CUDA events per iteration, the maximum
over the ranks of a group per iteration, then the median (as ``flashmoe_gen.tuner.bench``);
the HF block's times are per GPU, each rank running all experts on its own tokens.
``--hf-impl`` also times transformers' other experts implementations (e.g. ``grouped_mm``)
where they run. The layer's config comes from ``flashmoe_gen.lookup`` (tuned winner, else
the heuristic default) and is printed with its provenance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_block(a):
    """The same random Mixtral block on every rank (seeded); routing decided (router a few
    times N(0, 1/H)), experts N(0, 1/fan_in)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=a.hidden, intermediate_size=a.intermediate,
                        num_local_experts=a.experts, num_experts_per_tok=a.top_k)
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 4.0 if name.startswith("gate.") else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
    return block.to(torch.bfloat16).cuda().eval().requires_grad_(False)


def times_ms(fn, warmup: int, iters: int) -> list[float]:
    """Per-iteration times of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def max_over_ranks_median(times: list[float], group) -> float:
    """Median over iterations of the slowest rank's time (every member gets it)."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, times, group=group)
    return statistics.median(max(col) for col in zip(*everyone, strict=True))


def set_impl(block, impl: str) -> bool:
    try:
        block.experts.config._experts_implementation = impl
        return True
    except Exception:  # an implementation this transformers does not offer
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to time (comma separated)")
    ap.add_argument("--hf-impl", default="eager,grouped_mm",
                    help="transformers experts implementations to time (eager first)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", type=Path, help="append the rows to this JSON file")
    a = ap.parse_args()

    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.torch import FlashMoELayer

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [int(p) for p in a.gpus.split(",") if int(p) <= world]

    block = random_block(a)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=g).to(torch.bfloat16).cuda()
    rows = []
    with torch.no_grad():  # not inference_mode: the layers are built inside
        ref = block(x[None])[0]
        hf = {}
        for impl in a.hf_impl.split(","):
            if not set_impl(block, impl):
                continue
            try:
                hf[impl] = max_over_ranks_median(
                    times_ms(lambda: block(x[None]), a.warmup, a.iters), None)
            except Exception as e:  # e.g. grouped_mm on a GPU or torch without it
                if rank == 0:
                    print(f"HF {impl}: skipped ({type(e).__name__}: {e})", flush=True)
        set_impl(block, "eager")
        for p in counts:
            group = dist.new_group(list(range(p)))  # every rank takes part in new_group
            if rank < p:
                comm = Communicator.from_torch(group)
                layer = FlashMoELayer.from_hf(block, world_size=p, comm=comm,
                                              tokens_per_rank=a.tokens)
                out = layer(x)
                err = _rel(out, ref)
                # HF rounds the router logits to bf16 (the layer keeps them fp32): a token
                # near a tie may pick other experts; the error over tokens routed alike too.
                _, _, hf_idx = block.gate(x)
                same = (hf_idx.sort(1).values ==
                        layer.last_routing()[0].long().sort(1).values).all(1)
                err = (err, _rel(out[same], ref[same]), int(same.sum()))
                ours = max_over_ranks_median(times_ms(partial(layer, x), a.warmup, a.iters),
                                             group)
                errs: list = [None] * p
                dist.all_gather_object(errs, err, group=group)
                if rank == 0:
                    t = layer.tuned
                    rows.append(dict(gpus=p, problem=layer.problem.name,
                                     config=layer.kernel_config.name,
                                     provenance=t.provenance if t else "given",
                                     tokens_per_rank=a.tokens, ours_ms=ours,
                                     rel_err_vs_block=max(e[0] for e in errs),
                                     rel_err_same_experts=max(e[1] for e in errs),
                                     tokens_same_experts=min(e[2] for e in errs),
                                     **{f"hf_{k}_ms": v for k, v in hf.items()}))
                del layer
                comm.close()
            dist.barrier()
    if rank == 0:
        gpu = torch.cuda.get_device_name()
        print(f"Mixtral-style block H={a.hidden} I={a.intermediate} E={a.experts} "
              f"top-{a.top_k}, {a.tokens} tokens per GPU, {gpu}")
        head = ["GPUs", *[f"HF {k} ms" for k in hf], "FlashMoELayer ms",
                "x vs HF eager", "rel err", "rel err, same experts (min tokens)",
                "config (provenance)"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in rows:
            speed = r.get("hf_eager_ms", math.nan) / r["ours_ms"]
            print("| " + " | ".join([str(r["gpus"]), *[f"{v:.3f}" for v in hf.values()],
                                     f"{r['ours_ms']:.3f}", f"{speed:.2f}x",
                                     f"{r['rel_err_vs_block']:.1e}",
                                     f"{r['rel_err_same_experts']:.1e} "
                                     f"({r['tokens_same_experts']}/{a.tokens})",
                                     f"{r['config']} ({r['provenance']})"]) + " |")
        if a.json:
            old = json.loads(a.json.read_text()) if a.json.exists() else []
            stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            old += [dict(r, gpu=gpu, date=stamp) for r in rows]
            a.json.write_text(json.dumps(old, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
