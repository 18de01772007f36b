"""Under ``mpirun -np 2`` on CPU: the rank-0 broadcast protocol with a fake evaluator.

argv[1]: an Optuna storage URL. A candidate that fails on rank 1 only must fail on both
ranks (no hang), and the search must go on.
"""

import sys

from fake_evaluator import FakeEvaluator, fake_latency
from optuna.trial import TrialState

from flashmoe_gen.comm import mpi_world
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.space import SearchSpace
from flashmoe_gen.tuner.study import run_study

world = mpi_world()
rank = world.Get_rank()
p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=256)
space = SearchSpace.for_problem(p, "sm_90", "small")
ev = FakeEvaluator(rank, fail_rank=1, fail_warps="2x2")
res = run_study(p, ev, mpi=world, space=space, study_name="cpu-protocol", sampler="random",
                n_trials=16, storage=sys.argv[1], seed=3)
calls = world.allgather(ev.calls)
assert calls[0] == calls[1] == 16, calls  # every rank evaluated every candidate
if rank == 0:
    assert len(res.trials) == 16
    for t in res.trials:
        planted = t.config.gate_up.warps_m == 2 and t.config.gate_up.warps_n == 2
        assert t.outcome.ok != planted, (t.config.name, t.outcome)
        if planted:
            assert "rank 1" in t.outcome.reason and t.outcome.status == "wrong_answer"
    ok = [t for t in res.trials if t.outcome.ok]
    assert ok and res.best.outcome.median_ms == min(fake_latency(t.config) for t in ok)
    import optuna
    study = optuna.load_study(study_name="cpu-protocol", storage=sys.argv[1])
    failed = [t for t in study.trials if t.state == TrialState.FAIL
              and t.user_attrs.get("status") == "wrong_answer"]
    assert len(failed) == sum(not t.outcome.ok for t in res.trials)
world.Barrier()
print(f"rank {rank}: study protocol OK", flush=True)
