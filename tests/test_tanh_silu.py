"""config tanh_silu on the CPU: the knob's name and check, what it renders, where the
defaults and the tuner take it, and the identity and error bound it rests on."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render
from flashmoe_gen.tuner.space import NVLINK_SEED_FLIPS, SearchSpace

E64 = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
SEED = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)


def test_name_round_trip_and_check():
    cfg = replace(KernelConfig.default(SEED, "sm_90"), tanh_silu=True)
    assert cfg.name.endswith("__ts") and KernelConfig.from_name(cfg.name) == cfg
    cfg.validate(SEED, "sm_80")  # every arch, every transport: one PTX instruction (sm_75+)
    with pytest.raises(ConfigError) as e:
        replace(cfg, tanh_silu=1).validate(SEED, "sm_90")
    assert e.value.field == "tanh_silu" and "bool" in str(e.value)


@pytest.mark.parametrize("on", [False, True])
def test_render_switches_the_epilogue_silu(on):
    code = render(SEED, replace(KernelConfig.default(SEED, "sm_90"), tanh_silu=on)).code
    assert f"constexpr bool TANH_SILU = {'true' if on else 'false'};" in code
    assert "tanh.approx.f32" in code  # compiled out with if constexpr when off


def test_defaults_take_it_for_the_tma_row_tasks_only():
    pd = KernelConfig.persistent_default(E64, "sm_90")
    assert pd.ws_tma and pd.gate_up.mma == "wgmma" and pd.tanh_silu
    assert not KernelConfig.default(E64, "sm_90").tanh_silu
    decode = E64.replace(tokens_per_rank=8)  # fused weight streaming: exact silu
    assert not KernelConfig.persistent_default(decode, "sm_90").tanh_silu


def test_tuner_searches_it_and_seeds_the_exact_one():
    space = SearchSpace.for_problem(E64, "sm_90", "full", ("nccl", "nvlink"))
    assert space.choices["tanh_silu"] == (False, True)
    assert NVLINK_SEED_FLIPS["tanh_silu"] == (True, False)
    pd = KernelConfig.persistent_default(E64, "sm_90")
    assert replace(pd, tanh_silu=False) in space.seeds()
    params = space.params_from_config(pd)
    assert params["tanh_silu"] is True and space.config_from_params(params) == pd


def test_identity_and_error_bound():
    """h + h tanh(h) (h = g / 2) is g sigmoid(g); a tanh off by a relative 2^-11 (the
    instruction's bound) moves sigmoid by at most 2^-12 < 2.5e-4, so silu(g) by |g| 2^-12."""
    g = np.linspace(-30, 30, 20001)
    h = g / 2
    exact = g / (1 + np.exp(-g))
    assert np.allclose(h + h * np.tanh(h), exact, rtol=1e-12, atol=1e-12)
    for sign in (-1, 1):
        t = np.tanh(h) * (1 + sign * 2.0 ** -11)
        assert np.all(np.abs((h + h * t) - exact) <= np.abs(g) * 2.0 ** -12 * (1 + 1e-9) + 1e-15)
