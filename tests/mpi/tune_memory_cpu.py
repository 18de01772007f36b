"""Under ``mpirun -np 2`` on CPU: the real tune command with the fake evaluator, each rank's
evaluator reporting its memory and stages as the GPU one does (rank r: r + 1 GiB of weights),
so rank 0's memory table and stage lines can be checked. argv: the tune's flags."""

import sys

import fake_backend

import flashmoe_gen.tuner.tune_cmd as tune_cmd
from flashmoe_gen.memory import MemoryUse
from flashmoe_gen.tuner.cli import main


class Backend(fake_backend.CpuBackend):
    def evaluator(self, problem, world, space, a):
        evaluate, comm = super().evaluator(problem, world, space, a)
        rank, stage = world.Get_rank(), self.stage or (lambda text, trial=True: None)

        class Evaluate:
            memory = MemoryUse(rank, (rank + 1) * 2**30, 2**29, 60 * 2**30, 80 * 2**30)

            def __call__(self, cfg):
                stage(f"compiling/loading {cfg.name}")
                stage("timing")
                return evaluate(cfg)

        return Evaluate(), comm


tune_cmd.GpuBackend = Backend
sys.exit(main(["tune", *sys.argv[1:]]))
