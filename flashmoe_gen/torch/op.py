"""``torch.ops.flashmoe.moe_forward``: the layer as a ``torch.library`` custom op.

The op takes the tokens, the layer's tensors (so the graph orders it after any write to
them) and an integer handle naming the live ``FlashMoELayer`` (its runtime, buffers and
NCCL communicators are Python objects, which an op schema cannot carry). The fake
implementation gives ``torch.compile`` the output's shape and dtype without a GPU, so a
model holding the layer compiles into one graph; at run time the compiled graph calls the
real implementation, which runs the layer on the current torch stream.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from flashmoe_gen.errors import ArgumentError

_LAYERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)


def register(layer) -> int:
    """A handle for ``layer``; dropped when the layer is garbage collected."""
    handle = next(_HANDLES)
    _LAYERS[handle] = weakref.ref(layer)
    weakref.finalize(layer, _LAYERS.pop, handle, None)
    return handle


def layer_of(handle: int):
    ref = _LAYERS.get(handle)
    layer = ref() if ref is not None else None
    if layer is None:
        raise ArgumentError("handle", handle, "the FlashMoELayer this handle named no longer "
                            "exists; call the layer itself, not torch.ops.flashmoe.moe_forward")
    return layer


@torch.library.custom_op("flashmoe::moe_forward", mutates_args=())
def moe_forward(x: torch.Tensor, weights: list[torch.Tensor], handle: int) -> torch.Tensor:
    """One FlashMoE forward: ``x`` bf16 ``[T, H]`` contiguous CUDA -> bf16 ``[T, H]``."""
    return layer_of(handle)._run(x)


@moe_forward.register_fake
def _moe_forward_fake(x: torch.Tensor, weights: list[torch.Tensor], handle: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
