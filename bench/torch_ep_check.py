"""CPU check of both PyTorch baselines (no GPU): gloo process group on P local processes,
the sync baseline and the padded one (eager, same code the graph captures) against the
float64 reference and against each other, with unequal token counts (one rank may have 0).

    python bench/torch_ep_check.py [--ranks 2]     # exit 0 and one line per rank when good
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Small shapes with every feature the benches use: shared experts, k > E/P on 4 ranks.
CASES = (dict(hidden=64, intermediate=96, experts=8, top_k=2, shared_experts=1,
              tokens_per_rank=24),
         dict(hidden=32, intermediate=64, experts=8, top_k=3, tokens_per_rank=16))
TOLERANCE = 1e-2


def host_weights_as_torch(problem, weights, rank: int) -> SimpleNamespace:
    """This rank's weights as bf16 torch tensors in the DeviceWeights layouts (N x K)."""
    import numpy as np
    import torch

    def t(bits):
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)

    el = problem.local_experts
    w = weights.experts_slice(range(rank * el, (rank + 1) * el))
    ns = SimpleNamespace(gate=t(w.gate), w1=t(w.w1.transpose(0, 2, 1)),
                         w3=t(w.w3.transpose(0, 2, 1)), w2=t(w.w2.transpose(0, 2, 1)))
    if problem.shared_experts:
        ns.sw1 = t(np.concatenate(list(w.shared_w1), axis=1).T)
        ns.sw3 = t(np.concatenate(list(w.shared_w3), axis=1).T)
        ns.sw2 = t(np.concatenate(list(w.shared_w2), axis=0).T)
    return ns


def _worker(rank: int, world: int, init_file: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch_ep import TorchEP
    from torch_ep_graph import TorchEPGraph

    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.reference import moe_reference, relative_error
    from flashmoe_gen.weights import MoEWeights, random_tokens

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    for case in CASES:
        p = MoEProblem(**case, world_size=world)
        weights = MoEWeights.random(p, seed=3)
        # Unequal token counts; the last rank has none on the first case.
        tokens = [p.tokens_per_rank - 5 * r for r in range(world)]
        if case is CASES[0]:
            tokens[-1] = 0
        xs = [random_tokens(t, p.hidden, seed=40 + r) for r, t in enumerate(tokens)]
        ref = moe_reference(p, xs, weights).out[rank]
        layer = SimpleNamespace(problem=p, rank=rank,
                                weights=host_weights_as_torch(p, weights, rank))
        x = torch.from_numpy(xs[rank].view(np.int16)).view(torch.bfloat16)
        got = {"sync": TorchEP(layer)(x),
               "padded": TorchEPGraph(layer, tokens=max(tokens), graphs=False)(x)}
        f64 = {k: v.float().numpy().astype(np.float64) for k, v in got.items()}
        err = {k: relative_error(v, ref) if len(ref) else float(np.abs(v).sum())
               for k, v in f64.items()}
        both = relative_error(f64["padded"], f64["sync"]) if len(ref) else 0.0
        print(f"rank {rank} {p.name} T={tokens[rank]}: sync vs f64 {err['sync']:.1e}, padded "
              f"vs f64 {err['padded']:.1e}, padded vs sync {both:.1e}", flush=True)
        assert max(err.values()) < TOLERANCE and both < TOLERANCE, (p.name, err, both)
        assert f64["padded"].shape == (tokens[rank], p.hidden)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(a.ranks, str(Path(d) / "init")), nprocs=a.ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
