"""Under ``mpirun -np 2`` on CPU: the real ``flashmoe-tune tune`` command (cli.main ->
tune_cmd.run_tune -> study.run_study) with only the GPU replaced by the fake evaluator.

argv: the tune's flags. Faults are planted through the environment (tests/fake_backend.py).
"""

import sys

import fake_backend

import flashmoe_gen.tuner.tune_cmd as tune_cmd
from flashmoe_gen.tuner.cli import main

tune_cmd.GpuBackend = fake_backend.CpuBackend  # the test hook: no GPU, same command
fake_backend.plant_death_after_record()
sys.exit(main(["tune", *sys.argv[1:]]))
