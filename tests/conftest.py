"""GPU tests skip cleanly without a GPU; multigpu tests need mpirun with several ranks."""

import os

# Under mpirun every rank's float64 reference would start one BLAS thread per core: four
# ranks' DeepSeek-V2-Lite checks took > 100 s per test on a 64-core host (4 x H200, session
# 20), 30-50 s with the cores shared out. Set before numpy loads (cupy imports it below),
# and only where the launcher left them unset.
_LOCAL_RANKS = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
                   or os.environ.get("MPI_LOCALNRANKS") or 1)
if _LOCAL_RANKS > 1:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _LOCAL_RANKS)))

import pytest  # noqa: E402


def _gpu_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


GPU_COUNT = _gpu_count()
MPI_SIZE = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_mpi = pytest.mark.skip(reason="needs mpirun with >1 rank and a GPU per rank")
    for item in items:
        need = item.get_closest_marker("gpus")  # a test that starts mpirun itself
        if "multigpu" in item.keywords and (MPI_SIZE < 2 or GPU_COUNT < 1):
            item.add_marker(no_mpi)
        elif "gpu" in item.keywords and GPU_COUNT < 1:
            item.add_marker(no_gpu)
        elif need is not None and GPU_COUNT < need.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {need.args[0]} CUDA GPUs"))


@pytest.fixture(scope="module")
def comm():
    """The multi-GPU suites' Communicator (mpirun, one GPU per rank), one per test module."""
    from flashmoe_gen.comm import Communicator
    c = Communicator(n_streams=2)
    yield c
    c.barrier()
    c.close()
