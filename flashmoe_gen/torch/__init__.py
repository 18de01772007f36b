"""PyTorch front end: ``FlashMoELayer`` (an ``nn.Module`` and the custom op
``torch.ops.flashmoe.moe_forward``), transformers MoE blocks (``FlashMoELayer.from_hf``)
and torch.distributed bootstrap (``flashmoe_gen.comm.Communicator.from_torch``).

torch is an optional extra: ``pip install "flashmoe_gen[torch]"``.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401  (the real torch: imports here are absolute)
except ImportError as e:  # pragma: no cover - exercised only without torch
    from flashmoe_gen.errors import SetupError
    raise SetupError(f"flashmoe_gen.torch needs PyTorch ({e}): pip install "
                     "'flashmoe_gen[torch]'") from e

from flashmoe_gen.torch.dist import TorchGroup
from flashmoe_gen.torch.layer import FlashMoELayer, InferenceOnlyError

__all__ = ["FlashMoELayer", "InferenceOnlyError", "TorchGroup"]
