"""Shared inputs of the database tests: one problem, one environment, config variants and
engines disposed around each test."""

from __future__ import annotations

import dataclasses

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.db import Environment, dispose_engines
from flashmoe_gen.problem import MoEProblem

PROBLEM = MoEProblem(hidden=256, intermediate=128, experts=8, top_k=2, world_size=2,
                     tokens_per_rank=256)
ENV = Environment(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", world_size=2,
                  template_hash="abc123", cuda_driver="13.0", nvrtc_version="13.0",
                  nccl_version="2.27.3", cupy_version="13.6.0", package_version="0.1.0")


def cfg(problem: MoEProblem = PROBLEM, **changes) -> KernelConfig:
    return dataclasses.replace(KernelConfig.default(problem), **changes)


@pytest.fixture(autouse=True)
def fresh_engines():
    """Each test gets engines of its own (the module caches one per URL)."""
    dispose_engines()
    yield
    dispose_engines()
