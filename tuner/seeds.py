"""The tuner's first trials beyond the heuristic defaults (``SearchSpace.seeds``): the
persistent default's close knobs flipped, and configs measured good on other problems."""
from __future__ import annotations

#: The persistent kernel's knobs whose measured effect is a few percent either way and turns
#: with the problem (4 x H200, E=64: router pairs won from T=2048 and lost at 1024, quads
#: beat pairs by ~1%; two row tiles per task lost 1-16% at T=4096/16384, unmeasured
#: elsewhere): a tune with transport nvlink tries the persistent default with each flipped
#: (``neighbour``) early, right after the default itself (where valid for the problem).
#: Deferred refills lost 1-3% at both T: searched, not seeded.
#: Phased task lists won 7-17% at T=1024 (E=8, 32) and were within 1% either way at
#: T=4096/16384 and on Mixtral: flipped too. A task producer moved forwards -2.6% to +2% at
#: T=4096/16384 on 2 x H200 (both orders) and -4% to +15% at 4 ranks; the atomic front
#: -1.8% / -3.2% (fused E=64 / E=32) and +3% (E=8's per-source lists) at T=1024: flipped too.
#: silu by tanh (on in the TMA row tasks' default) flipped back to the exact one likewise,
#: and both GEMMs' results staged (the default since session 26) back to the down's alone.
#: One list over every source (defaults.interleave_pays: a model fit to 2 x H200, -19% to
#: +12% either way) and its own rows first (defaults.own_first_pays, 4 x H200: -10% to +10%
#: by the rows per source): flipped too; own rows first turned on takes the one list with it
#: (SEED_FLIP_WITH), the one list turned off drops them (a moot knob). Down tasks streaming
#: their K range (1 x H200: the seed example -4 to -7%, e16 T=1024 +8%) flipped too, and
#: them first in the queue (early_down; off with stream_down: a moot knob).
#: A knob's flip is its value's neighbour in the tuple (the one before it, else after; a
#: value outside it: the first): router eights -> quads -> pairs -> quads.
NVLINK_SEED_FLIPS = {"router_batches": (2, 4, 8), "task_tiles": (1, 2),
                     "stage_epilogue": (1, 2), "phased_tasks": (True, False),
                     "task_producer": (False, True), "atomic_front": (False, True),
                     "tanh_silu": (True, False), "interleave_sources": (False, True),
                     "own_first": (False, True), "stream_down": (False, True),
                     "early_down": (False, True)}
#: The knobs a seed flip sets with it: (knob, value it flips to) -> the others' values.
SEED_FLIP_WITH = {("own_first", True): {"interleave_sources": True}}
#: Winners measured on 2 x H100 (bench/results/2026-11-26_tuning_2xH100.md: DeepSeek-V2-Lite
#: shape and the seed example): enqueued first when valid for a problem.
KNOWN_GOOD = (
    "gu_bm64_bn32_bk64_w2x2_s3__dn_bm32_bn128_bk32_w2x4_s4__r4__c4__cs2__ss0",
    "gu_bm128_bn64_bk64_w4x1_s2__dn_bm128_bn64_bk64_w2x4_s3__r16__c1__cs1__ss1",
    # bench/gemm_bench.py on H100: the best wgmma pair on the Mixtral shape
    "gu_bm128_bn64_bk64_w8x1_s4_wg__dn_bm128_bn256_bk64_w8x1_s3_wg__r8__c1__cs1__ss1__pk",
)


def neighbour(values: tuple, v):
    """``v``'s seed flip (NVLINK_SEED_FLIPS): the value before it in ``values``, else the
    one after; the first where ``v`` is not among them."""
    if v not in values:
        return values[0]
    i = values.index(v)
    return values[i - 1] if i else values[1]
