"""The PyTorch front end without a GPU: the custom op and its fake implementation,
torch.compile tracing, from_hf's mapping of each transformers block (checked through the
float64 reference against the block's own forward), typed errors, the torchrun world."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_blocks import HIDDEN, KINDS, make_block  # noqa: E402

from flashmoe_gen import MoEProblem  # noqa: E402
from flashmoe_gen.errors import ArgumentError, ProblemError  # noqa: E402
from flashmoe_gen.reference import moe_reference, relative_error  # noqa: E402
from flashmoe_gen.torch import FlashMoELayer, InferenceOnlyError, hf, tensors  # noqa: E402

HERE = Path(__file__).parent
P = MoEProblem(hidden=HIDDEN, intermediate=32, experts=8, top_k=2, shared_experts=1)


def _bits(x):
    return x.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


@pytest.fixture(scope="module")
def layer():
    return FlashMoELayer(P, device="cpu")


# -- the custom op ------------------------------------------------------------------------
def test_fake_implementation_gives_shape_and_dtype(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = torch.empty(5, HIDDEN, dtype=torch.bfloat16, device="cuda"
                        if torch.cuda.is_available() else "cpu")
        ws = [mode.from_tensor(t) for t in layer._op_tensors()]
        out = torch.ops.flashmoe.moe_forward(x, ws, layer._handle)
    assert tuple(out.shape) == (5, HIDDEN) and out.dtype == torch.bfloat16
    assert out.device == x.device


def test_compile_traces_a_model_with_the_layer_in_one_graph(layer):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(HIDDEN, HIDDEN, dtype=torch.bfloat16)
            self.moe = layer

        def forward(self, x):
            return self.moe(torch.relu(self.proj(x))) + x

    graphs = []

    class Traced(Exception):
        pass

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):  # the real op needs a GPU: tracing is what is tested here
            raise Traced
        return run

    model = Model().requires_grad_(False)
    # fullgraph=True turns any graph break into an error.
    with pytest.raises(Traced):
        torch.compile(model, backend=backend, fullgraph=True)(
            torch.randn(2, 16, HIDDEN, dtype=torch.bfloat16))
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("flashmoe.moe_forward" in t for t in targets), targets


def test_forward_makes_input_contiguous_and_keeps_its_shape(layer, monkeypatch):
    seen = []

    def fake_run(x):
        seen.append((x.is_contiguous(), tuple(x.shape)))
        return x * 2

    monkeypatch.setattr(layer, "_run", fake_run)
    x = torch.randn(HIDDEN, 6, dtype=torch.bfloat16).t()  # [6, H], not contiguous
    with torch.no_grad():
        out = layer(x)
        out3 = layer(torch.ones(2, 3, HIDDEN, dtype=torch.bfloat16))
    assert seen == [(True, (6, HIDDEN)), (True, (6, HIDDEN))]
    assert torch.equal(out, x * 2) and tuple(out3.shape) == (2, 3, HIDDEN)


# -- typed errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("x, match", [
    (lambda: torch.randn(4, HIDDEN), "x=.*float32.*bfloat16"),
    (lambda: torch.randn(4, HIDDEN + 8, dtype=torch.bfloat16), "x=.*hidden=64"),
    (lambda: torch.randn(HIDDEN, dtype=torch.bfloat16), r"x=.*shape \(64,\)"),
    (lambda: np.zeros((4, HIDDEN), np.uint16), "x=.*ndarray.*bfloat16"),
    (lambda: torch.randn(4, HIDDEN, dtype=torch.bfloat16), "x=.*CUDA tensor"),
])
def test_bad_input_is_a_typed_error_naming_x(layer, x, match):
    with torch.no_grad(), pytest.raises(ArgumentError, match=match) as e:
        layer(x())
    assert e.value.argument == "x"


def test_grad_on_the_input_or_a_parameter_is_refused(layer):
    x = torch.randn(4, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(InferenceOnlyError, match="inference only.*torch.no_grad"):
        layer(x)
    layer.w2.requires_grad_(True)
    try:
        with pytest.raises(InferenceOnlyError, match="requires_grad=False"):
            layer(x.detach())
        with torch.no_grad(), pytest.raises(ArgumentError, match="CUDA"):  # past the check
            layer(x.detach())
    finally:
        layer.w2.requires_grad_(False)


def test_weights_of_the_wrong_shape_name_the_tensor():
    from flashmoe_gen.weights import MoEWeights

    t = tensors.from_moe_weights(P, MoEWeights.random(P))
    t["w2"] = t["w2"][:, :, :16]
    with pytest.raises(ProblemError, match=r"w2.*\(8, 64, 32\)"):
        FlashMoELayer(P, weights=t)


def test_a_layer_converted_to_another_dtype_is_refused_at_build():
    layer = FlashMoELayer(P, device="cpu").half()
    with pytest.raises(ProblemError, match="gate.*float16.*must stay torch.bfloat16"):
        layer.build()


def test_rank_and_world_size_are_checked():
    with pytest.raises(ArgumentError, match="rank"):
        FlashMoELayer(P.replace(world_size=2), rank=2, device="cpu")
    block = make_block("mixtral")
    with pytest.raises(ProblemError, match="world_size=3"):
        FlashMoELayer.from_hf(block, world_size=3)
    with pytest.raises(ArgumentError, match="rank=2"):
        FlashMoELayer.from_hf(block, world_size=2, rank=2)
    with pytest.raises(ArgumentError, match="block.*Linear.*MixtralSparseMoeBlock"):
        FlashMoELayer.from_hf(torch.nn.Linear(4, 4))


def test_config_is_a_kernel_config_or_its_name():
    from flashmoe_gen import KernelConfig

    cfg = KernelConfig.default(P, "sm_90")
    assert FlashMoELayer(P, cfg.name, device="cpu").kernel_config == cfg
    with pytest.raises(ArgumentError, match="config=3.*KernelConfig"):
        FlashMoELayer(P, 3, device="cpu")


class _FakeComm:
    """A rank of 2 whose broadcast returns what rank 0 sent (``sent``)."""

    def __init__(self, rank, sent=None):
        self.rank, self.world_size, self.sent = rank, 2, sent
        self.mpi = self

    def bcast(self, obj, root=0):
        return obj if self.rank == root else self.sent


def test_rank_0_looks_the_config_up_for_everyone(monkeypatch):
    import flashmoe_gen.api as api
    from flashmoe_gen import KernelConfig
    from flashmoe_gen.errors import CommError, DatabaseError

    p2 = P.replace(world_size=2)
    cfg = KernelConfig.default(p2, "sm_90")

    def no_lookup(*a, **k):
        raise AssertionError("only rank 0 looks up")

    monkeypatch.setattr(api, "lookup", no_lookup)
    layer = FlashMoELayer(p2, comm=_FakeComm(1, (cfg.name, "exact", 0.5)), device="cpu")
    t = layer._lookup()
    assert (t.config, t.provenance, t.latency_ms) == (cfg, "exact", 0.5)
    # rank 0's failure reaches rank 1 as a CommError; rank 0 raises its own error.
    layer = FlashMoELayer(p2, comm=_FakeComm(1, "DatabaseError: locked"), device="cpu")
    with pytest.raises(CommError, match="rank 0 could not look the config up.*locked"):
        layer._lookup()

    def broken(*a, **k):
        raise DatabaseError("sqlite:///x", "locked", "retry")

    monkeypatch.setattr(api, "lookup", broken)
    with pytest.raises(DatabaseError):
        FlashMoELayer(p2, comm=_FakeComm(0), device="cpu")._lookup()


def test_a_non_silu_block_is_refused():
    block = make_block("qwen3")
    block.experts.config.hidden_act = "gelu"
    with pytest.raises(ProblemError, match="hidden_act.*silu"):
        hf.hf_problem(block)


# -- Hugging Face blocks ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hf_block_maps_to_the_reference_of_its_own_forward(kind):
    """The block's config becomes the problem's rule and its weights the layer's: the
    float64 reference on the mapped weights equals the block's float32 forward."""
    block = make_block(kind, dtype=torch.float32)
    p = hf.hf_problem(block, tokens_per_rank=32)
    w = tensors.to_moe_weights(p, hf.hf_tensors(block, p))
    x = torch.randn(48, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = moe_reference(p, [_bits(x)], w)
    with torch.no_grad():
        y = block(x.float()[None])[0].double().numpy()
    clear = ref.routing[0].clear(p)
    assert clear.sum() >= 40
    assert relative_error(y[clear], ref.out[0][clear]) < 1e-5


def test_hf_problem_reads_each_rule():
    m, q2, q3, ds = (hf.hf_problem(make_block(k)) for k in KINDS)
    assert (m.experts, m.top_k, m.normalize_topk, m.default_routing) == (8, 2, True, True)
    assert (q2.shared_experts, q2.shared_intermediate, q2.shared_gate,
            q2.normalize_topk) == (1, 48, True, False)
    assert q3.default_routing and not q3.shared_experts
    assert (ds.scoring, ds.expert_bias, ds.n_group, ds.topk_group, ds.routed_scaling,
            ds.shared_experts, ds.shared_intermediate) == ("sigmoid", True, 4, 2, 2.5, 2, 32)
    assert hf.hf_problem(make_block("qwen3", norm_topk_prob=False)).normalize_topk is False


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_from_hf_shares_the_blocks_storage_where_the_layout_allows(kind):
    block = make_block(kind)
    layer = FlashMoELayer.from_hf(block, world_size=2, rank=1)
    el = layer.problem.local_experts
    assert layer.problem.world_size == 2 and layer.rank == 1
    assert layer.w2.data_ptr() == block.experts.down_proj[el].data_ptr()
    shared = block.shared_expert if kind == "qwen2" else block.shared_experts
    for mine, theirs in (("shared_w1", shared.gate_proj), ("shared_w3", shared.up_proj),
                         ("shared_w2", shared.down_proj)):
        assert getattr(layer, mine).data_ptr() == theirs.weight.data_ptr()
    # gate_up_proj [E, 2I, H] holds w1 and w3 interleaved per expert: one copy each.
    i = layer.problem.intermediate
    assert torch.equal(layer.w1, block.experts.gate_up_proj[el:, :i])
    assert torch.equal(layer.w3, block.experts.gate_up_proj[el:, i:])
    assert torch.equal(layer.gate, block.gate.weight.t().to(torch.bfloat16))
    if kind == "qwen2":
        assert layer.shared_gate.data_ptr() == block.shared_expert_gate.weight.data_ptr()
    assert not any(t.requires_grad for t in layer._op_tensors())


def test_world_of_two_splits_experts_by_rank():
    block = make_block("mixtral", dtype=torch.float32)
    p2 = hf.hf_problem(block, world_size=2)
    full = tensors.to_moe_weights(p2.replace(world_size=1),
                                  hf.hf_tensors(block, p2.replace(world_size=1)))
    for r in range(2):
        w = tensors.to_moe_weights(p2, hf.hf_tensors(block, p2, r), first_expert=4 * r)
        assert np.array_equal(w.w1, full.w1[4 * r: 4 * r + 4])
        assert np.array_equal(w.w2, full.w2[4 * r: 4 * r + 4])


def test_host_weights_round_trip_through_kernel_layout():
    from flashmoe_gen.weights import MoEWeights

    p = P.replace(shared_experts=2, shared_intermediate=16, scoring="sigmoid",
                  expert_bias=True, shared_gate=True)
    w = MoEWeights.random(p, seed=3)
    back = tensors.to_moe_weights(p, tensors.from_moe_weights(p, w))
    for name in ("gate", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2",
                 "expert_bias", "shared_gate"):
        assert np.array_equal(getattr(back, name), getattr(w, name)), name


# -- torchrun -------------------------------------------------------------------------------
def test_torchrun_world_on_two_cpu_ranks():
    """TorchGroup (gloo) under torchrun: the mpi4py methods, agreement, and the tuner's
    launcher taking torchrun's environment for its world."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", str(HERE / "torchrun" / "group_cpu.py")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("torchrun world OK") == 2, r.stdout + r.stderr


def test_communicator_from_torch_needs_an_initialised_process_group():
    import torch.distributed as dist

    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.errors import CommError

    assert not dist.is_initialized()
    with pytest.raises(CommError, match="init_process_group"):
        Communicator.from_torch()


def test_launcher_detects_torchrun(monkeypatch):
    from flashmoe_gen.tuner import launch

    for var in launch.MPI_SIZE_VARS + launch.MPI_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in launch.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not launch.under_mpirun() and launch.rank_from_env() is None
    for var, v in zip(launch.TORCHRUN_VARS, ("1", "2", "1", "127.0.0.1", "29500"),
                      strict=True):
        monkeypatch.setenv(var, v)
    assert launch.under_torchrun() and launch.under_mpirun() and launch.rank_from_env() == 1


def test_flashmoe_tune_under_torchrun_needs_no_mpi_library(tmp_path):
    """The real tune command (GPU replaced by the fake evaluator, as the MPI fault tests)
    on 2 torchrun ranks, with mpi4py unimportable: a winner is stored."""
    blocker = tmp_path / "no_mpi" / "mpi4py"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mpi4py blocked by the test')\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               FLASHMOE_COMM_TIMEOUT="30", PYTHONPATH=os.pathsep.join(
                   [str(tmp_path / "no_mpi"), str(HERE), str(HERE / "mpi")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", str(HERE / "mpi" / "tune_cpu.py"),
                        "--gpus", "2", "--space", "small", "--sampler", "random",
                        "--trials", "3", "--storage", f"sqlite:///{tmp_path / 's.db'}",
                        "--db", f"sqlite:///{tmp_path / 'w.db'}", "--study-name", "torchrun"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "winner stored in" in r.stdout and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "3 ok, 0 failed trials" in r.stdout


def test_transformers4_layout_of_experts_as_a_module_list():
    """Blocks of transformers < 5 hold one MLP module per expert (Mixtral: w1/w3/w2)."""
    from torch import nn

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(HIDDEN, 32, bias=False)
            self.w3 = nn.Linear(HIDDEN, 32, bias=False)
            self.w2 = nn.Linear(32, HIDDEN, bias=False)

    class MixtralSparseMoeBlock(nn.Module):  # the v4 layout, recognised by class name
        def __init__(self):
            super().__init__()
            self.top_k = 2
            self.gate = nn.Linear(HIDDEN, 8, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(8))

        def forward(self, x):
            probs = torch.softmax(self.gate(x).float(), dim=-1)
            w, idx = torch.topk(probs, 2, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for t in range(len(x)):
                for j in range(2):
                    e = self.experts[int(idx[t, j])]
                    out[t] += w[t, j] * e.w2(torch.nn.functional.silu(e.w1(x[t])) * e.w3(x[t]))
            return out

    torch.manual_seed(0)
    block = MixtralSparseMoeBlock()
    with torch.no_grad():
        block.gate.weight.mul_(8)
        for prm in block.parameters():
            prm.copy_(prm.to(torch.bfloat16).float())
    p = hf.hf_problem(block)
    assert (p.experts, p.top_k, p.intermediate) == (8, 2, 32)
    w = tensors.to_moe_weights(p, hf.hf_tensors(block, p))
    x = torch.randn(24, HIDDEN).to(torch.bfloat16)
    ref = moe_reference(p, [_bits(x)], w)
    with torch.no_grad():
        y = block(x.float()).double().numpy()
    clear = ref.routing[0].clear(p)
    assert clear.sum() >= 20
    assert relative_error(y[clear], ref.out[0][clear]) < 1e-5
