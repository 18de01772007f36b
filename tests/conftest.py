"""GPU tests skip cleanly without a GPU; multigpu tests need mpirun with several ranks."""

import os

import pytest


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
        if "multigpu" in item.keywords and (MPI_SIZE < 2 or GPU_COUNT < 1):
            item.add_marker(no_mpi)
        elif "gpu" in item.keywords and GPU_COUNT < 1:
            item.add_marker(no_gpu)


@pytest.fixture(scope="module")
def comm():
    """The multi-GPU suites' Communicator (mpirun, one GPU per rank), one per test module."""
    from flashmoe_gen.comm import Communicator
    c = Communicator(n_streams=2)
    yield c
    c.barrier()
    c.close()
