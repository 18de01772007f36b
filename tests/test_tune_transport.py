"""flashmoe-tune's choice of transports (CPU: the IPC probe is replaced)."""

import pytest

from flashmoe_gen.errors import CommError
from flashmoe_gen.tuner.tune_cmd import GpuBackend


class _Comm:
    rank, world_size = 0, 2


def test_one_rank_auto_includes_nvlink_and_nccl_only_means_nccl():
    assert GpuBackend().transports(None, "auto") == ("nccl", "nvlink")
    assert GpuBackend().transports(None, "nccl") == ("nccl",)
    assert GpuBackend().transports(None, "nvlink") == ("nvlink",)


def test_probe_decides_for_several_ranks(monkeypatch, capsys):
    import flashmoe_gen.persistent as persistent

    monkeypatch.setattr(persistent, "probe_ipc", lambda comm: None)
    assert GpuBackend().transports(_Comm(), "auto") == ("nccl", "nvlink")
    monkeypatch.setattr(persistent, "probe_ipc", lambda comm: "the ranks span 2 nodes")
    assert GpuBackend().transports(_Comm(), "auto") == ("nccl",)
    assert "nvlink left out of the search: the ranks span 2 nodes" in capsys.readouterr().out
    with pytest.raises(CommError, match="--transport nvlink: the ranks span 2 nodes"):
        GpuBackend().transports(_Comm(), "nvlink")


def test_a_sweep_probes_once(monkeypatch):
    """A --tokens sweep asks per token count; the probe (a collective) runs once."""
    import flashmoe_gen.persistent as persistent

    calls = []
    monkeypatch.setattr(persistent, "probe_ipc", lambda comm: calls.append(comm) or None)
    backend = GpuBackend()
    for _ in range(3):
        assert backend.transports(_Comm(), "auto") == ("nccl", "nvlink")
    assert len(calls) == 1
