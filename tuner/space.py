"""The search space: every KernelConfig knob, its candidate values, and the constraints.

Parameters are flat (``gu_bm``, ``gu_w`` = "4x2", ``dn_s``, ``chunks`` …) so that Optuna's
samplers see independent categorical knobs; a combination that breaks a constraint
(shared memory, registers, divisibility, tile larger than the problem) is rejected by
``check`` before anything is compiled.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from flashmoe_gen.arch import DeviceLimits, limits_for
from flashmoe_gen.config import (
    BLOCKS_PER_SM_CHOICES,
    CHUNK_RANGE,
    COMM_SMS_CHOICES,
    COMM_STREAM_CHOICES,
    DISPATCH_BLOCK_CHOICES,
    K_SPLIT_CHOICES,
    MODE_CHOICES,
    PERSISTENT_SCHEDULE,
    ROUTER_BATCH_CHOICES,
    ROUTER_CHOICES,
    SEND_BLOCK_CHOICES,
    STAGE_EPILOGUE_CHOICES,
    TASK_TILE_CHOICES,
    TRANSPORT_CHOICES,
    KernelConfig,
)
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.router_layout import router_pairs_fit
from flashmoe_gen.tiles import (
    BK_CHOICES,
    BM_CHOICES,
    BN_CHOICES,
    HOPPER_KINDS,
    MMA_CHOICES,
    STAGE_RANGE,
    WARP_CHOICES,
    GemmTile,
)

from .moot import WALK_FIRST, without_moot
from .seeds import KNOWN_GOOD, NVLINK_SEED_FLIPS, SEED_FLIP_WITH, neighbour


def _within(choices, lo, hi) -> tuple:
    """The valid values (config.py declares them) that a space searches: lo..hi."""
    return tuple(c for c in choices if lo <= c <= hi)


def _pick(choices, *values) -> tuple:
    """Some of config.py's valid values, checked to be among them."""
    bad = [v for v in values if v not in choices]
    if bad:
        raise ConfigError("space values", bad, f"choose from {list(choices)}")
    return values


def _group(params: dict, prefix: str) -> dict:
    """A tile group's knobs (``gu_*`` or ``dn_*``) of ``params``."""
    return {k: v for k, v in params.items() if k.startswith(prefix + "_")}


def _nearest(tiles: list[dict], mine: dict) -> dict:
    """The tile with the most knob values in common with ``mine`` (ties: the first)."""
    return max(tiles, key=lambda t: sum(t[k] == mine.get(k) for k in t))


def _grids(*grids: str) -> tuple[str, ...]:
    """Warp grids "MxN"; each M and N must be one of tiles.WARP_CHOICES."""
    for g in grids:
        if any(int(w) not in WARP_CHOICES for w in g.split("x")):
            raise ConfigError("warp grid", g, f"M and N from {list(WARP_CHOICES)}")
    return grids


_SYNC = MMA_CHOICES[:1]  # mma.sync only
#: Kinds the tuner samples: all of them (the tma kernel since its GPU tests passed on
#: 1 and 4 x H200, 2026-11-26).
_TUNED = MMA_CHOICES

#: Candidate values per knob ("full" space): ranges over config.py's valid values (one
#: source for the values). Warp grids are "MxN".
FULL = {
    "gu_bm": _within(BM_CHOICES, 32, 256), "gu_bn": _within(BN_CHOICES, 32, 128),
    "gu_bk": _within(BK_CHOICES, 32, 64),
    "gu_w": _grids("1x2", "2x1", "2x2", "4x1", "2x4", "4x2", "8x1"),
    "gu_s": _within(STAGE_RANGE, 2, 4), "gu_mma": _TUNED,
    "dn_bm": _within(BM_CHOICES, 32, 256), "dn_bn": _within(BN_CHOICES, 64, 256),
    "dn_bk": _within(BK_CHOICES, 32, 64),
    "dn_w": _grids("1x2", "2x1", "2x2", "1x4", "2x4", "4x2", "8x1"),
    "dn_s": _within(STAGE_RANGE, 2, 4), "dn_mma": _TUNED,
    "router": _within(ROUTER_CHOICES, 4, 16),
    "chunks": tuple(c for c in _within(CHUNK_RANGE, 1, 4) if c & (c - 1) == 0),  # 1, 2, 4
    "streams": _within(COMM_STREAM_CHOICES, 1, 2), "shared_stream": (True, False),
    "fuse": (False, True), "packed": (True, False), "mode": MODE_CHOICES,
    "transport": ("nccl",),  # for_problem(transports=...) adds "nvlink"
    "blocks": (0,),  # the persistent kernel's blocks per SM: nvlink adds its choices
    "ksplit_gu": (1,), "ksplit_dn": (1,),  # its fused ws tiles' K splits: likewise
    "dispatch": (1,),  # its blocks that route and dispatch: likewise
    "ws_tma": (False,),  # its TMA weight loads: likewise
    "senders": (0,),  # its blocks that send the peers' rows: likewise
    "router_batches": (1,),  # its router's token batches per tensor-core tile: likewise
    "task_tiles": (1,),  # its TMA row tasks' row tiles per task: likewise
    "defer_refill": (False,),  # its TMA row tasks' refills without a wait: likewise
    "stage_epilogue": (0,),  # its TMA row tasks' results in 16-byte stores: likewise
    "phased_tasks": (False,),  # its per-source lists' gate/up tasks all first: likewise
    "task_producer": (False,),  # its TMA row tasks fed by a producer warpgroup: likewise
    "interleave": (False,),  # its one task list over every source: likewise
    "own_first": (False,),  # ... with this rank's own rows in a list ahead of it: likewise
    "own_down_last": (False,),  # its phased lists' own down tasks last: likewise
    "stream_down": (False,),  # its down tasks streaming their K range: likewise
    "early_down": (False,),  # ... ahead of the gate/up tasks in the queue: likewise
    "shared_front": (False,),  # its shared experts' tiles beside the front: likewise
    "atomic_front": (False,),  # its rows' slots by atomics as they are routed: likewise
    "ws_wgmma": (False,),  # its fused weight-streaming tasks on warpgroup MMAs: likewise
    # gate and up in two wgmmas, not one (lost 2.5-4%: carried for seeded configs only)
    "split_gated": (False,),
    # SMs the tma kernel leaves to NCCL (nccl transport with a tma tile; else forced to 0)
    "comm_sms": _pick(COMM_SMS_CHOICES, 0, 8, 16),
    # this rank's tokens split around the fused launch (fused nccl sources, not _ws)
    "own_split": (False, True),
    "own_stream": (False, True),  # own_split's halves beside the fused launch
    # each local expert's peer rows in one run (fused nccl sources, not _ws, mode host)
    "gather": (False, True),
    "tanh_silu": (False, True),  # the gated epilogues' silu by one tanh.approx
}
#: A smaller space for exhaustive (grid) sweeps and sampler comparisons (mma.sync tiles: the
#: space measured in bench/results/2026-11-26_grid_dsv2lite_small_2xH100.json).
SMALL = {
    "gu_bm": _within(BM_CHOICES, 64, 128), "gu_bn": _within(BN_CHOICES, 64, 128),
    "gu_bk": _within(BK_CHOICES, 64, 64), "gu_w": _grids("2x2", "4x2"),
    "gu_s": _within(STAGE_RANGE, 3, 4), "gu_mma": _SYNC,
    "dn_bm": _within(BM_CHOICES, 64, 128), "dn_bn": _within(BN_CHOICES, 64, 128),
    "dn_bk": _within(BK_CHOICES, 64, 64), "dn_w": _grids("2x4", "4x2"),
    "dn_s": _within(STAGE_RANGE, 3, 4), "dn_mma": _SYNC,
    "router": _within(ROUTER_CHOICES, 8, 8), "chunks": _within(CHUNK_RANGE, 1, 1),
    "streams": _within(COMM_STREAM_CHOICES, 1, 1), "shared_stream": (True,), "fuse": (False,),
    "packed": (True,), "mode": MODE_CHOICES[:1], "transport": ("nccl",), "blocks": (0,),
    "ksplit_gu": (1,), "ksplit_dn": (1,), "dispatch": (1,), "comm_sms": (0,),
    "ws_tma": (False,), "own_split": (False,), "own_stream": (False,), "gather": (False,),
    "senders": (0,), "router_batches": (1,), "task_tiles": (1,), "defer_refill": (False,),
    "stage_epilogue": (0,), "phased_tasks": (False,), "task_producer": (False,),
    "atomic_front": (False,), "ws_wgmma": (False,), "split_gated": (False,),
    "tanh_silu": (False,), "interleave": (False,), "own_first": (False,),
    "own_down_last": (False,), "stream_down": (False,), "early_down": (False,),
    "shared_front": (False,),
}
#: A grid for judging samplers: the small space's schedule with tiles from far too small to
#: the usual, so most configs are well off the best (the sampler target asks for a grid where
#: at least half are > 10% slower; the small space's DeepSeek-V2-Lite grid had 8%).
STEEP = dict(SMALL) | {
    "gu_bm": _pick(BM_CHOICES, 16, 64, 128), "gu_bn": _pick(BN_CHOICES, 16, 64, 128),
    "gu_bk": _pick(BK_CHOICES, 64), "gu_w": _grids("4x1", "2x2", "4x2"),
    "gu_s": _pick(STAGE_RANGE, 2, 3),
    "dn_bm": _pick(BM_CHOICES, 16, 128), "dn_bn": _pick(BN_CHOICES, 32, 128),
    "dn_bk": _pick(BK_CHOICES, 32), "dn_w": _grids("1x1", "2x4"),
    "dn_s": _pick(STAGE_RANGE, 3),
}
SPACES = {"full": FULL, "small": SMALL, "steep": STEEP}

#: Transport "nvlink" runs one persistent kernel: its schedule knobs take these values
#: whatever was sampled (config_from_params), so its candidates differ in tiles, fusion and
#: mode only.
NVLINK_FORCED = {knob: PERSISTENT_SCHEDULE[f] for knob, f in (
    ("router", "router_tokens_per_block"), ("chunks", "chunks_per_peer"),
    ("streams", "comm_streams"), ("packed", "packed_slots"))}
#: Knobs of the persistent kernel alone: nccl configs take the first value.
NVLINK_KNOBS = {"blocks": BLOCKS_PER_SM_CHOICES, "ksplit_gu": K_SPLIT_CHOICES,
                "ksplit_dn": K_SPLIT_CHOICES, "dispatch": DISPATCH_BLOCK_CHOICES,
                "ws_tma": (False, True), "senders": SEND_BLOCK_CHOICES,
                "router_batches": ROUTER_BATCH_CHOICES, "task_tiles": TASK_TILE_CHOICES,
                "defer_refill": (False, True), "stage_epilogue": STAGE_EPILOGUE_CHOICES,
                "phased_tasks": (False, True), "task_producer": (False, True),
                "atomic_front": (False, True), "ws_wgmma": (False, True),
                "interleave": (False, True), "own_first": (False, True),
                # the own down tasks last: correct on 4 x H200, -2% to +5% against the
                # default there (session 32): the tune decides per problem
                "own_down_last": (False, True),
                # the down TMA row tasks read each k-tile as its gate/up n-tile completes
                "stream_down": (False, True),
                # ... and those down tasks first in the queue, where the lists are whole
                "early_down": (False, True),
                # the shared experts' gate/up tiles beside the route and dispatch
                "shared_front": (False, True)}


@dataclass(frozen=True)
class SearchSpace:
    problem: MoEProblem
    limits: DeviceLimits
    choices: dict[str, tuple] = field(default_factory=lambda: dict(FULL))
    #: Values in ``choices`` only for transport nvlink (its forced schedule, its own knobs):
    #: not searched for nccl.
    nvlink_only: dict[str, tuple] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # valid tiles

    @classmethod
    def for_problem(cls, problem: MoEProblem, limits: DeviceLimits | str = "sm_90",
                    size: str = "full", transports: tuple[str, ...] = ("nccl",)
                    ) -> SearchSpace:
        """``transports``: those the tune may choose between (``nvlink`` only where every
        rank opens every peer's memory: ``persistent.probe_ipc``)."""
        if isinstance(limits, str):
            limits = limits_for(limits)
        if size not in SPACES:
            raise ConfigError("space", size, f"choose one of {sorted(SPACES)}")
        bad = [t for t in transports if t not in TRANSPORT_CHOICES] or not transports
        if bad:
            raise ConfigError("transports", transports,
                              f"one or more of {list(TRANSPORT_CHOICES)}")
        choices = dict(SPACES[size]) | {"transport": tuple(transports)}
        nvlink_only: dict[str, tuple] = {}
        if "nvlink" in transports:  # the values its schedule knobs are forced to, its knobs
            wanted = {k: (v,) for k, v in NVLINK_FORCED.items()} | NVLINK_KNOBS
            for k, values in wanted.items():
                extra = tuple(v for v in values if v not in choices[k])
                if extra:
                    choices[k], nvlink_only[k] = (*choices[k], *extra), extra
        if problem.world_size == 1:  # nothing to chunk, stream or fuse across peers
            choices["chunks"], choices["streams"], choices["fuse"] = (1,), (1,), (False,)
            choices["comm_sms"] = (0,)  # nor SMs to leave to NCCL
            choices["packed"] = (False,)  # no sends: where rows sit in a slot is moot
        if problem.world_size == 1 or problem.local_experts < 2:
            choices["own_split"] = (False,)  # no transfers to hide, or no second half
            choices["own_stream"] = (False,)
        if problem.world_size == 1:
            choices["gather"] = (False,)  # no peers' rows to gather
            choices["senders"] = (0,)  # nor to send
            choices["phased_tasks"] = (False,)  # one source: its list is already phased
            choices["interleave"] = (False,)  # ... and alone
        if problem.world_size < 3:
            choices["own_first"] = (False,)  # the peers are one source (or none)
        if "router_batches" in choices and not router_pairs_fit(
                problem, PERSISTENT_SCHEDULE["router_tokens_per_block"]):
            choices["router_batches"] = (1,)  # not one tensor-core pass over every expert
        if not problem.shared_experts:
            choices["shared_stream"] = (True,)
            choices["shared_front"] = (False,)  # no shared tiles to run beside the front
        if limits.major_minor != (9, 0):  # warpgroup MMA and TMA are Hopper's
            for k in ("gu_mma", "dn_mma"):
                if k in choices:
                    choices[k] = tuple(m for m in choices[k] if m not in HOPPER_KINDS)
            for k in ("ws_tma", "ws_wgmma", "split_gated"):
                if k in choices:
                    choices[k] = (False,)
        if size == "full":
            # The heuristic defaults are always candidates (the first trials, and what "tuned
            # / default" compares with); their values may lie outside the ranges, e.g. the
            # decode default's 4x1 weight-streaming down tile, or the persistent default's
            # 6-stage ring for GBs of weights.
            defaults = [KernelConfig.default(problem, limits.arch)]
            if "nvlink" in transports:
                try:
                    defaults.append(KernelConfig.persistent_default(problem, limits.arch))
                except ConfigError:
                    pass
            for default in defaults:
                if default.transport not in transports:
                    continue
                for k, v in cls.params_from_config(default).items():
                    if k in choices and v not in choices[k]:
                        choices[k] = (*choices[k], v)
        return cls(problem, limits, choices, nvlink_only)

    # -- params <-> config ---------------------------------------------------------------
    @staticmethod
    def _tile(params: dict, prefix: str) -> GemmTile:
        wm, wn = (int(v) for v in params[f"{prefix}_w"].split("x"))
        return GemmTile(params[f"{prefix}_bm"], params[f"{prefix}_bn"], params[f"{prefix}_bk"],
                        wm, wn, params[f"{prefix}_s"], params.get(f"{prefix}_mma", "sync"))

    @classmethod
    def config_from_params(cls, params: dict) -> KernelConfig:
        tile = functools.partial(cls._tile, params)
        transport = params.get("transport", "nccl")  # studies from before the knob: nccl
        if transport == "nvlink":
            params = params | NVLINK_FORCED
        params = without_moot(params)
        return KernelConfig(tile("gu"), tile("dn"), params["router"], params["chunks"],
                            params["streams"], params["shared_stream"],
                            fuse_sources=params.get("fuse", False),
                            packed_slots=params.get("packed", False),
                            mode=params.get("mode", "host"), transport=transport,
                            blocks_per_sm=params.get("blocks", 0),
                            gu_splits=params.get("ksplit_gu", 1),
                            dn_splits=params.get("ksplit_dn", 1),
                            dispatch_blocks=params.get("dispatch", 1),
                            comm_sms=params.get("comm_sms", 0),
                            ws_tma=params.get("ws_tma", False),
                            own_split=params.get("own_split", False),
                            own_stream=params.get("own_stream", False),
                            gather_experts=params.get("gather", False),
                            send_blocks=params.get("senders", 0),
                            router_batches=params.get("router_batches", 1),
                            task_tiles=params.get("task_tiles", 1),
                            defer_refill=params.get("defer_refill", False),
                            stage_epilogue=params.get("stage_epilogue", 0),
                            phased_tasks=params.get("phased_tasks", False),
                            task_producer=params.get("task_producer", False),
                            atomic_front=params.get("atomic_front", False),
                            ws_wgmma=params.get("ws_wgmma", False),
                            split_gated_mma=params.get("split_gated", False),
                            tanh_silu=params.get("tanh_silu", False),
                            interleave_sources=params.get("interleave", False),
                            own_first=params.get("own_first", False),
                            own_down_last=params.get("own_down_last", False),
                            stream_down=params.get("stream_down", False),
                            early_down=params.get("early_down", False),
                            shared_front=params.get("shared_front", False))

    def canonical(self, params: dict) -> dict:
        """The params of the config ``params`` stand for (nvlink's forced knobs set), so one
        config has one parameter set (a repeat is seen as one)."""
        params = without_moot(params)
        if params.get("transport") != "nvlink":
            return params | {k: v[0] for k, v in NVLINK_KNOBS.items() if k in params}
        return params | NVLINK_FORCED

    @staticmethod
    def params_from_config(cfg: KernelConfig) -> dict:
        p = {}
        for prefix, t in (("gu", cfg.gate_up), ("dn", cfg.down)):
            p |= {f"{prefix}_bm": t.bm, f"{prefix}_bn": t.bn, f"{prefix}_bk": t.bk,
                  f"{prefix}_w": f"{t.warps_m}x{t.warps_n}", f"{prefix}_s": t.stages,
                  f"{prefix}_mma": t.mma}
        return p | {"router": cfg.router_tokens_per_block, "chunks": cfg.chunks_per_peer,
                    "streams": cfg.comm_streams, "shared_stream": cfg.shared_stream,
                    "fuse": cfg.fuse_sources, "packed": cfg.packed_slots, "mode": cfg.mode,
                    "transport": cfg.transport, "blocks": cfg.blocks_per_sm,
                    "ksplit_gu": cfg.gu_splits, "ksplit_dn": cfg.dn_splits,
                    "dispatch": cfg.dispatch_blocks, "comm_sms": cfg.comm_sms,
                    "ws_tma": cfg.ws_tma, "own_split": cfg.own_split,
                    "own_stream": cfg.own_stream, "gather": cfg.gather_experts,
                    "senders": cfg.send_blocks, "router_batches": cfg.router_batches,
                    "task_tiles": cfg.task_tiles, "defer_refill": cfg.defer_refill,
                    "stage_epilogue": cfg.stage_epilogue, "phased_tasks": cfg.phased_tasks,
                    "task_producer": cfg.task_producer, "atomic_front": cfg.atomic_front,
                    "ws_wgmma": cfg.ws_wgmma,
                    "split_gated": cfg.split_gated_mma, "tanh_silu": cfg.tanh_silu,
                    "interleave": cfg.interleave_sources, "own_first": cfg.own_first,
                    "own_down_last": cfg.own_down_last, "stream_down": cfg.stream_down,
                    "early_down": cfg.early_down, "shared_front": cfg.shared_front}

    @property
    def fingerprint(self) -> str:
        """8 hex digits of every knob's values: a default study name carries it, so a space
        that changed (an upgrade) starts a new study instead of failing to resume one."""
        return hashlib.sha256(repr(sorted(self.choices.items())).encode()).hexdigest()[:8]

    def contains(self, cfg: KernelConfig) -> bool:
        return all(v in self.choices[k] for k, v in self.params_from_config(cfg).items())

    # -- constraints ---------------------------------------------------------------------
    def check(self, params: dict) -> str | None:
        """None when valid, else the reason (names the knob and the limit)."""
        if params.get("transport", "nccl") != "nvlink":
            for k, values in self.nvlink_only.items():
                if params.get(k) in values:
                    return f"{k}={params[k]!r} is in this space for transport nvlink only"
        try:
            self.config_from_params(params).validate(self.problem, self.limits)
        except ConfigError as e:
            return str(e)
        return None

    def _valid_tiles(self, prefix: str, which: str) -> list[dict]:
        """The prefix's tile knobs that fit on their own (most combinations fail here)."""
        if prefix not in self._memo:
            self._memo[prefix] = self._filter_tiles(prefix, which)
        return self._memo[prefix]

    def _filter_tiles(self, prefix: str, which: str) -> list[dict]:
        n, k, b_operands = KernelConfig.gemm_shapes(self.problem)[which]
        keys = [key for key in self.choices if key.startswith(prefix + "_")]
        out = []
        for values in itertools.product(*(self.choices[key] for key in keys)):
            params = dict(zip(keys, values, strict=True))
            try:
                self._tile(params, prefix).validate(which, n, k, b_operands, self.limits, None)
            except ConfigError:
                continue
            out.append(params)
        return out

    def valid_configs(self) -> Iterator[KernelConfig]:
        """Every valid config: tiles are filtered on their own first, then combined with the
        other knobs by a walk that drops a value as soon as ``canonical`` would change it (a
        knob moot where it stands, away from its neutral value), the knobs the moot rules
        read walked first (WALK_FIRST). Walking the whole product and keeping its fixed
        points took 2.2e8 draws on the seed problem's small space with transport nvlink."""
        rest = [k for k in WALK_FIRST if k in self.choices] + [
            k for k in self.choices if not k.startswith(("gu_", "dn_")) and k not in WALK_FIRST]
        neutral = {k: self.choices[k][0] for k in rest}
        for gu, dn in itertools.product(self._valid_tiles("gu", "gate_up"),
                                        self._valid_tiles("dn", "down")):
            for params in self._walk(gu | dn, rest, neutral):
                if self.check(params) is None:
                    yield self.config_from_params(params)

    def _walk(self, assigned: dict, keys: list[str], neutral: dict) -> Iterator[dict]:
        """The canonical params extending ``assigned`` over ``keys`` (in that order): a
        value is kept where ``canonical`` leaves every key so far as it is, the later ones at
        their neutral values (the moot rules of a key read only keys before it)."""
        if not keys:
            yield assigned
            return
        key, later = keys[0], keys[1:]
        for v in self.choices[key]:
            params = assigned | {key: v}
            canon = self.canonical(params | {k: neutral[k] for k in later})
            if all(canon[k] == params[k] for k in params):
                yield from self._walk(params, later, neutral)

    def repair(self, params: dict) -> dict:
        """Valid params near ``params``: a tile group (``gu_*``, ``dn_*``) that does not fit
        on its own becomes the valid tile with the most knob values in common (ties: the
        first in knob order); other knobs are kept. ``ConfigError`` when a group has no
        valid tile at all (the space holds no valid config)."""
        out = dict(params)
        if out.get("transport", "nccl") != "nvlink":  # values nccl does not search
            out |= {k: next(c for c in self.choices[k] if c not in values)
                    for k, values in self.nvlink_only.items() if out.get(k) in values}
        for prefix, which in (("gu", "gate_up"), ("dn", "down")):
            tiles = self._valid_tiles(prefix, which)
            if not tiles:
                raise ConfigError(which, self.problem.name, "no tile of this search space fits "
                                  "the problem on " + self.limits.arch + "; try --space full")
            mine = _group(params, prefix)
            if mine not in tiles:
                out |= _nearest(tiles, mine)
        out = self.canonical(out)
        if self.check(out) is not None and out.get("transport") == "nvlink":
            out = self._persistent_tiles(out, params)
        if self.check(out) is not None and out.get("transport") == "nvlink":
            out = self._neutral_knobs(out)
        if self.check(out) is not None and out.get("transport") == "nvlink" \
                and "nccl" in self.choices["transport"]:
            return self.repair(out | {"transport": "nccl"})  # no tile nvlink can take
        if (reason := self.check(out)) is not None:  # a constraint across the groups
            raise ConfigError("params", out, f"no repair found: {reason}")
        return out

    def _neutral_knobs(self, out: dict) -> dict:
        """``out`` with the persistent kernel's own knobs set back to their first values, one
        at a time in NVLINK_KNOBS' order, until it is valid (a knob the tiles refuse, e.g.
        ws_wgmma drawn with 32-row tiles), or all of them."""
        for k in NVLINK_KNOBS:
            if self.check(out) is None:
                break
            if k in out and k in self.choices:
                out = out | {k: self.choices[k][0]}
        return out

    def _persistent_tiles(self, out: dict, params: dict) -> dict:
        """``out`` with each tile group the nearest valid tile the persistent kernel takes
        (weight-streaming ones where sources are fused); unchanged where a group has none."""
        for prefix, which in (("gu", "gate_up"), ("dn", "down")):
            tiles = [t for t in self._valid_tiles(prefix, which)
                     if KernelConfig.persistent_takes(self._tile(t, prefix))]
            if out.get("fuse"):
                tiles = [t for t in tiles if t.get(f"{prefix}_mma") == "ws"] or tiles
            if tiles and _group(out, prefix) not in tiles:
                out = out | _nearest(tiles, _group(params, prefix))
        if self.check(out) is not None and out.get("fuse"):
            out = out | {"fuse": False}  # fused sources need _ws on both GEMMs
        return out

    @property
    def size(self) -> int:
        n = 1
        for v in self.choices.values():
            n *= len(v)
        return n

    def seeds(self, arch: str | None = None) -> list[KernelConfig]:
        """The heuristic default and the known-good configs that fit: the first trials."""
        arch = arch or self.limits.arch
        out = [KernelConfig.default(self.problem, arch)]
        names = list(KNOWN_GOOD)
        if "nvlink" in self.choices["transport"]:
            try:  # the persistent kernel's default, measured early like the nccl one
                pd = KernelConfig.persistent_default(self.problem, arch)
            except ConfigError:
                pd = None
            if pd is not None:
                flips = []
                for f, values in NVLINK_SEED_FLIPS.items():  # then its close neighbours
                    try:
                        v = neighbour(values, getattr(pd, f))
                        var = replace(pd, **{f: v, **SEED_FLIP_WITH.get((f, v), {})})
                        # knobs the flip makes moot back to neutral (two row tiles per
                        # task: no staged epilogue; config_from_params drops them)
                        var = self.config_from_params(self.params_from_config(var))
                        var.validate(self.problem, arch)
                        flips.append(var.name)
                    except ConfigError:
                        pass
                names[:0] = [pd.name, *flips]
        for name in names:
            cfg = KernelConfig.from_name(name)
            if cfg not in out and self.contains(cfg) and \
                    self.check(self.params_from_config(cfg)) is None:
                out.append(cfg)
        return out
