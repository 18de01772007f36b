"""The search space's moot rules: a knob that means nothing where the others stand is read
at its neutral value, so one config has one parameter set (``SearchSpace.canonical``), and
the order ``SearchSpace.valid_configs`` walks the knobs in so it can drop such values as
they appear."""

from __future__ import annotations

from flashmoe_gen.tiles import HOPPER_KINDS

#: The persistent kernel's K-split knobs: fused weight-streaming tiles only (else 1).
SPLIT_KNOBS = ("ksplit_gu", "ksplit_dn")


#: Knobs the moot rules (``without_moot``, nvlink's forced schedule) read, in the order
#: SearchSpace.valid_configs walks them before the others: each rule reads only tiles and
#: knobs walked before the knob it resets.
WALK_FIRST = ("transport", "fuse", "mode", "ws_tma", "task_tiles", "ws_wgmma", "own_split",
              "own_stream")


def _comm_sms_apply(params: dict) -> bool:
    """Whether the comm_sms knob means anything: NCCL moves tokens, a tile is the tma kernel
    (the only grid sized to the SMs)."""
    return (params.get("transport", "nccl") == "nccl"
            and "tma" in (params.get("gu_mma"), params.get("dn_mma")))


def _ws_tma_apply(params: dict) -> bool:
    """Whether TMA loads mean anything: transport nvlink, ws or wgmma tiles of BK 64 on both
    GEMMs (Hopper: for_problem drops the value elsewhere)."""
    return (params.get("transport") == "nvlink"
            and params.get("gu_mma") == params.get("dn_mma")
            and params.get("gu_mma") in ("ws", "wgmma")
            and params.get("gu_bk") == params.get("dn_bk") == 64)


def _per_source_tasks(params: dict) -> bool:
    """Whether the persistent kernel keeps per-source task lists, where send_blocks and
    phased_tasks mean anything: transport nvlink, sources not fused (fused tasks wait for
    every source; for_problem drops both on one rank)."""
    return params.get("transport") == "nvlink" and not params.get("fuse", False)


def _own_split_apply(params: dict) -> bool:
    """Whether own_split means anything: fused NCCL sources whose launch leaves this rank's
    tokens apart (not _ws); for_problem drops it where there are no peers or one local
    expert."""
    return (params.get("transport", "nccl") == "nccl" and params.get("fuse", False)
            and params.get("gu_mma") != "ws")


def _splits_apply(params: dict) -> bool:
    """Whether the K-split knobs mean anything: transport nvlink, fused ws tiles."""
    return (params.get("transport") == "nvlink" and params.get("fuse", False)
            and params.get("gu_mma") == "ws" and params.get("dn_mma") == "ws")


def without_moot(params: dict) -> dict:
    """``params`` with the knobs that mean nothing for them (K splits, comm_sms, ws_tma,
    senders, router batches, task tiles, deferred refills, staged epilogue, phased tasks,
    one list over every source and its own-first split, task producer, streamed down tasks
    and them first, atomic front, own_split/own_stream, gather) at their neutral values,
    where present (an absent one reads as that value anyway). A rule may read only tiles
    and knobs valid_configs walks before the knob it resets (WALK_FIRST; the brute-force
    test checks the walk)."""
    out = dict(params)
    if not _splits_apply(out):
        out |= {k: 1 for k in SPLIT_KNOBS if k in out}
    if "comm_sms" in out and not _comm_sms_apply(out):
        out["comm_sms"] = 0
    if "ws_tma" in out and not _ws_tma_apply(out):
        out["ws_tma"] = False
    if "senders" in out and not _per_source_tasks(out):
        out["senders"] = 0
    if "router_batches" in out and out.get("transport") != "nvlink":
        out["router_batches"] = 1  # only the persistent kernel's router takes pairs
    rows_tma = out.get("ws_tma", False) and out.get("gu_mma") == "wgmma"
    if "task_tiles" in out and not rows_tma:
        out["task_tiles"] = 1  # only the TMA row tasks (ws_tma, kept above only where it
        # applies: nvlink) carry their ring across row tiles
    if "defer_refill" in out and not rows_tma:
        out["defer_refill"] = False  # ... and refill it from a computing thread
    if "stage_epilogue" in out and not (rows_tma and out.get("task_tiles", 1) == 1):
        out["stage_epilogue"] = 0  # ... and, one row tile per task, stage in it
    if "phased_tasks" in out and not _per_source_tasks(out):
        out["phased_tasks"] = False  # per-source lists only (fused sources: one list)
    if "task_producer" in out and not (rows_tma and out.get("dn_mma") == "wgmma"
                                       and _per_source_tasks(out)):
        out["task_producer"] = False  # a producer feeds both GEMMs' TMA row tasks, taken
        # from per-source lists
    if "interleave" in out and not (_per_source_tasks(out) and out.get("phased_tasks", False)
                                    and not out.get("task_producer", False)):
        out["interleave"] = False  # it rearranges the phased per-source lists (after
        # the producer's rule: a moot producer is off), which a producer learns one by one
    if "own_first" in out and not out.get("interleave", False):
        out["own_first"] = False  # it splits that one list (after its rule)
    if "own_down_last" in out and not (
            _per_source_tasks(out) and out.get("phased_tasks", False)
            and out.get("own_first", False) == out.get("interleave", False)):
        out["own_down_last"] = False  # it reorders the phased lists' down tasks, or
        # own_first's (the one list alone mixes the sources' down tasks; after their rules)
    if "stream_down" in out and not (
            rows_tma and out.get("dn_mma") == "wgmma" and _per_source_tasks(out)
            and out.get("stage_epilogue", 0) != 3 and not out.get("task_producer", False)):
        out["stream_down"] = False  # down TMA row tasks over the lists the kernel lays
        # out, their gate/up tiles counted as stored (after the producer's rule)
    if "early_down" in out and not (out.get("stream_down", False)
                                    and not out.get("own_first", False)):
        out["early_down"] = False  # streamed down tasks first, over lists known whole (after
        # the stream_down and own_first rules; several ranks' per-source lists: refused)
    if "shared_front" in out and not (out.get("transport") == "nvlink"
                                      and not out.get("task_producer", False)):
        out["shared_front"] = False  # the persistent kernel's blocks beside its front
        # (after the producer's rule; no shared experts: for_problem drops it)
    if "atomic_front" in out and out.get("transport") != "nvlink":
        out["atomic_front"] = False  # one kernel routes and dispatches: the persistent one
    if "ws_wgmma" in out and not (out.get("ws_tma", False) and out.get("gu_mma") == "ws"):
        out["ws_wgmma"] = False  # weight-streaming tiles with TMA weights only (ws_tma
        # above is kept only where it applies: nvlink, ws or wgmma tiles on both GEMMs)
    if "split_gated" in out and not (out.get("gu_mma") in HOPPER_KINDS
                                     or out.get("ws_wgmma", False)):
        out["split_gated"] = False  # a gate/up tile on warpgroup MMAs only
    if "own_split" in out and not _own_split_apply(out):
        out["own_split"] = False
    if "own_stream" in out and not out.get("own_split", False):
        out["own_stream"] = False
    if "gather" in out and not (_own_split_apply(out) and out.get("mode", "host") == "host"
                                and not out.get("own_stream", False)):
        out["gather"] = False
    return out
