"""Counter-based weights: the same bf16 bits from NumPy (host) and from a CUDA kernel (device).

The second weight scheme (the first is ``MoEWeights.random``, NumPy's PCG64 normals, which
only the host can draw). Here every element is a pure function of
``(seed, tensor, expert, index)``, so any rank rebuilds any expert on its own GPU without
host arrays of model size, and the reference regenerates exactly the experts it needs.

Element ``index`` counts in the *semantic* layout of docs/semantics.md (``w1[e] [H, I]``:
``index = h * I + i``), whatever layout the output is written in. Per element:

    key  = mix(mix(mix(seed) ^ tensor) ^ expert)          (splitmix64's finaliser, ``mix``)
    z    = mix(key + (index + 1) * GOLDEN)               (splitmix64's stream, mod 2**64)
    m    = z >> 40                                        (24 uniform bits)
    v    = float32(float32(m) - 8388607.5) * float32(sqrt(3 / fan_in) / 2**23)

``v`` is uniform on (-a, a) with ``a = sqrt(3 / fan_in)``: mean 0, variance ``1 / fan_in``
(the variance of ``MoEWeights.random``). Every float32 step is exact except the one multiply,
which is correctly rounded on both sides (``__fmul_rn``), so NumPy and CUDA agree bit for bit;
bf16 rounding is to nearest even, as ``bf16.to_bits``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from . import bf16
from .errors import ArgumentError, ProblemError
from .problem import MoEProblem
from .weights import MoEWeights, expert_range

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
#: 2**23 - 0.5: centres the 24-bit integer on 0 (exact in float32).
CENTRE = 8388607.5

#: Tensor ids (the tags ``MoEWeights.random`` uses, so one table names both schemes' tensors).
GATE, W1, W2, W3 = 0, 1, 2, 3
SHARED_W1, SHARED_W2, SHARED_W3 = 11, 12, 13
EXPERT_BIAS, SHARED_GATE = 21, 22
#: Host generation works in chunks of this many elements (bounded temporaries).
CHUNK = 1 << 22


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2**64)."""
    z &= M64
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def stream_key(seed: int, tensor: int, expert: int) -> int:
    """The 64-bit key of one (seed, tensor, expert) stream."""
    return mix64(mix64(mix64(seed) ^ tensor) ^ expert)


def scale(fan_in: int) -> np.float32:
    """The float32 factor from the centred 24-bit integer to U(-a, a), a = sqrt(3/fan_in)."""
    return np.float32(math.sqrt(3.0 / fan_in) / 2.0**23)


def std_scale(std: float) -> np.float32:
    """The factor for U(-a, a) of standard deviation ``std`` (a = sqrt(3) * std)."""
    return np.float32(std * math.sqrt(3.0) / 2.0**23)


def uniform_f32(seed: int, tensor: int, expert: int, index: np.ndarray,
                c: np.float32) -> np.ndarray:
    """float32 values of the elements ``index`` (uint64) of one stream (host); ``c`` is
    ``scale(fan_in)`` or ``std_scale(std)``."""
    key = np.uint64(stream_key(seed, tensor, expert))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2**64, as in CUDA
        z = key + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    m = (z >> np.uint64(40)).astype(np.float32)
    return (m - np.float32(CENTRE)) * np.float32(c)


def host_tensor(seed: int, tensor: int, expert: int, shape: tuple[int, ...],
                fan_in: int) -> np.ndarray:
    """One tensor in its semantic layout ``shape`` as bf16 bits (host, NumPy)."""
    _check_seed(seed)
    n, c = math.prod(shape), scale(fan_in)
    out = np.empty(n, np.uint16)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        out[a:b] = bf16.to_bits(uniform_f32(seed, tensor, expert,
                                            np.arange(a, b, dtype=np.uint64), c))
    return out.reshape(shape)


def generated_gate(problem: MoEProblem, seed: int) -> np.ndarray:
    """``[H, E]`` bf16 bits (small: built on the host by every rank)."""
    return host_tensor(seed, GATE, 0, (problem.hidden, problem.experts), problem.hidden)


def generated_expert_bias(problem: MoEProblem, seed: int) -> np.ndarray | None:
    """``[E]`` float32, std 0.1 (sigmoid scores) or 1/E (softmax), as ``random_expert_bias``;
    expert e's bias is element 0 of stream (seed, EXPERT_BIAS, e). None without the rule."""
    if not problem.expert_bias:
        return None
    c = std_scale(0.1 if problem.scoring == "sigmoid" else 1.0 / problem.experts)
    return np.concatenate([uniform_f32(seed, EXPERT_BIAS, e, np.zeros(1, np.uint64), c)
                           for e in range(problem.experts)])


def generated_shared_gate(problem: MoEProblem, seed: int) -> np.ndarray | None:
    """``[H]`` bf16 bits, or None without the rule."""
    if not problem.shared_gate:
        return None
    return host_tensor(seed, SHARED_GATE, 0, (problem.hidden,), problem.hidden)


def expert_host(problem: MoEProblem, seed: int, e: int) -> tuple[np.ndarray, ...]:
    """Routed expert ``e``'s ``w1, w3 [H, I]`` and ``w2 [I, H]`` (semantic layouts, host)."""
    h, i = problem.hidden, problem.intermediate
    if not 0 <= e < problem.experts:
        raise ProblemError("expert", e, f"an expert id in 0..{problem.experts - 1}")
    return (host_tensor(seed, W1, e, (h, i), h), host_tensor(seed, W3, e, (h, i), h),
            host_tensor(seed, W2, e, (i, h), i))


def generated_weights(problem: MoEProblem, seed: int = 0,
                      experts: range | None = None) -> MoEWeights:
    """Host ``MoEWeights`` of the counter-based scheme (this module's), for a contiguous range
    of experts (default all), the same values ``DeviceWeights.generate`` puts on the GPU.
    Model-sized when given all experts of a large problem: meant for small problems and
    tests; the tuner's check regenerates only the experts it needs."""
    if not isinstance(problem, MoEProblem):
        raise ArgumentError("problem", problem, "a flashmoe_gen.MoEProblem")
    _check_seed(seed)
    h, i = problem.hidden, problem.intermediate
    experts = expert_range(problem, experts)
    n, s, si = len(experts), problem.shared_experts, problem.shared_intermediate or 0
    w1, w3, w2 = (np.empty((n, h, i), np.uint16), np.empty((n, h, i), np.uint16),
                  np.empty((n, i, h), np.uint16))
    for j, ge in enumerate(experts):
        w1[j], w3[j], w2[j] = expert_host(problem, seed, ge)

    def shared(tensor: int, shape: tuple[int, int], fan_in: int) -> np.ndarray:
        return (np.stack([host_tensor(seed, tensor, k, shape, fan_in) for k in range(s)])
                if s else np.zeros((0, *shape), np.uint16))

    return MoEWeights(gate=generated_gate(problem, seed), w1=w1, w3=w3, w2=w2,
                      shared_w1=shared(SHARED_W1, (h, si), h),
                      shared_w3=shared(SHARED_W3, (h, si), h),
                      shared_w2=shared(SHARED_W2, (si, h), si), first_expert=experts.start,
                      expert_bias=generated_expert_bias(problem, seed),
                      shared_gate=generated_shared_gate(problem, seed))


def _check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not \
            0 <= seed <= M64:
        raise ArgumentError("seed", seed, "an integer in 0..2**64-1")


# -- the device side ---------------------------------------------------------------------
KERNEL_NAME = "flashmoe_gen_weights"


def cuda_source() -> str:
    """The generator kernel: ``out`` is ``[n, rows, cols]`` bf16 bits for experts
    ``first_expert ..``; ``transpose`` writes each semantic ``[cols, rows]`` tensor as
    ``[rows, cols]`` (the kernels' N x K layouts). Constants are spelled from Python."""
    u64 = "ULL"
    return f"""
__device__ __forceinline__ unsigned long long fmoe_mix(unsigned long long z) {{
    z = (z ^ (z >> 30)) * {MIX1:#x}{u64};
    z = (z ^ (z >> 27)) * {MIX2:#x}{u64};
    return z ^ (z >> 31);
}}

extern "C" __global__ void {KERNEL_NAME}(
        unsigned short* __restrict__ out, unsigned long long n, unsigned long long rows,
        unsigned long long cols, unsigned long long seed, unsigned long long tensor,
        unsigned long long first_expert, float c, int transpose) {{
    const unsigned long long per = rows * cols;
    const unsigned long long total = n * per;
    const unsigned long long base = fmoe_mix(seed) ^ tensor;
    for (unsigned long long o = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         o < total; o += (unsigned long long)gridDim.x * blockDim.x) {{
        const unsigned long long e = o / per, rem = o - e * per;
        const unsigned long long r = rem / cols, col = rem - r * cols;
        const unsigned long long index = transpose ? col * rows + r : rem;
        const unsigned long long key = fmoe_mix(fmoe_mix(base) ^ (first_expert + e));
        const unsigned long long z = fmoe_mix(key + (index + 1{u64}) * {GOLDEN:#x}{u64});
        const unsigned int m = (unsigned int)(z >> 40);
        const float v = __fmul_rn(__fsub_rn(__uint2float_rn(m), {CENTRE!r}f), c);
        const unsigned int u = __float_as_uint(v);
        out[o] = (unsigned short)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    }}
}}
"""


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import cupy
        _KERNEL = cupy.RawKernel(cuda_source(), KERNEL_NAME)
    return _KERNEL


def device_tensor(seed: int, tensor: int, first_expert: int, n: int, rows: int, cols: int,
                  fan_in: int, transpose: bool, out=None):
    """``[n, rows, cols]`` bf16 bits on the GPU (cupy uint16) for experts ``first_expert ..
    + n``: the semantic tensor itself, or with ``transpose`` its N x K form."""
    import cupy

    _check_seed(seed)
    if out is None:
        out = cupy.empty((n, rows, cols), np.uint16)
    total = n * rows * cols
    if total:
        threads = 256
        blocks = min(-(-total // threads), 65535 * 8)
        _kernel()((blocks,), (threads,), (out, np.uint64(n), np.uint64(rows), np.uint64(cols),
                                          np.uint64(seed), np.uint64(tensor),
                                          np.uint64(first_expert), scale(fan_in),
                                          np.int32(bool(transpose))))
    return out


def device_experts_nk(problem: MoEProblem, seed: int, experts: Iterable[int]):
    """Routed experts' ``w1t, w3t [I, H]`` and ``w2t [H, I]`` (N x K) on the GPU, one
    (w1t, w3t, w2t) per expert id, for a reference that needs only these experts."""
    h, i = problem.hidden, problem.intermediate
    for e in experts:
        yield e, (device_tensor(seed, W1, e, 1, i, h, h, True)[0],
                  device_tensor(seed, W3, e, 1, i, h, h, True)[0],
                  device_tensor(seed, W2, e, 1, h, i, i, True)[0])
