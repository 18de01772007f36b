"""Check of both PyTorch baselines against the float64 reference and each other: P local
processes, unequal token counts (one rank has 0), three inputs per shape. CPU (gloo): the
padded baseline runs eagerly (the code the graph captures). ``--cuda`` (one GPU per rank,
NCCL): the padded baseline is graph-captured on the first input and replayed on the others.

    python bench/torch_ep_check.py [--ranks 2]          # CPU, no GPU needed
    python bench/torch_ep_check.py --ranks 4 --cuda     # on a 4-GPU machine
Exit 0 and one line per rank, shape and input when good.
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
#: Inputs per case: with --cuda the first captures the graph, the others replay it.
ROUNDS = 3


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


def _worker(rank: int, world: int, init_file: str, cuda: bool) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch_ep import TorchEP
    from torch_ep_graph import TorchEPGraph

    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.reference import moe_reference, relative_error
    from flashmoe_gen.weights import MoEWeights, random_tokens

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    for case in CASES:
        p = MoEProblem(**case, world_size=world)
        weights = MoEWeights.random(p, seed=3)
        # Unequal token counts; the last rank has none on the first case.
        tokens = [p.tokens_per_rank - 5 * r for r in range(world)]
        if case is CASES[0]:
            tokens[-1] = 0
        ns = host_weights_as_torch(p, weights, rank)
        layer = SimpleNamespace(problem=p, rank=rank, weights=SimpleNamespace(
            **{k: v.to(dev) for k, v in vars(ns).items()}))
        sync = TorchEP(layer)
        padded = TorchEPGraph(layer, tokens=max(tokens), graphs=cuda)
        # New inputs each round: on CUDA round 0 captures, the others replay the graph.
        for round_ in range(ROUNDS):
            xs = [random_tokens(t, p.hidden, seed=40 + r + 100 * round_)
                  for r, t in enumerate(tokens)]
            ref = moe_reference(p, xs, weights).out[rank]
            x = torch.from_numpy(xs[rank].view(np.int16)).view(torch.bfloat16).to(dev)
            got = {"sync": sync(x), "padded": padded(x)}
            f64 = {k: v.float().cpu().numpy().astype(np.float64) for k, v in got.items()}
            err = {k: relative_error(v, ref) if len(ref) else float(np.abs(v).sum())
                   for k, v in f64.items()}
            both = relative_error(f64["padded"], f64["sync"]) if len(ref) else 0.0
            print(f"rank {rank} {p.name} T={tokens[rank]} round {round_}: sync vs f64 "
                  f"{err['sync']:.1e}, {'graph' if cuda else 'padded'} vs f64 "
                  f"{err['padded']:.1e}, vs sync {both:.1e}", flush=True)
            assert max(err.values()) < TOLERANCE and both < TOLERANCE, (p.name, err, both)
            assert f64["padded"].shape == (tokens[rank], p.hidden)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--cuda", action="store_true",
                    help="one GPU per rank, NCCL, and the padded baseline graph-captured")
    a = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(a.ranks, str(Path(d) / "init"), a.cuda), nprocs=a.ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
