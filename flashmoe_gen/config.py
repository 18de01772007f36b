"""Kernel configs: every tunable knob, validated against a problem and a GPU target."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace

from .arch import DEFAULT_ARCH, DeviceLimits, limits_for
from .config_nvlink import (  # noqa: F401  (re-exported: the nvlink knobs' value sets)
    BLOCKS_PER_SM_CHOICES,
    DISPATCH_BLOCK_CHOICES,
    K_SPLIT_CHOICES,
    PERSISTENT_SCHEDULE,
    PERSISTENT_THREADS,
    PRODUCER_THREADS,
    ROUTER_BATCH_CHOICES,
    SEND_BLOCK_CHOICES,
    STAGE_EPILOGUE_CHOICES,
    TASK_TILE_CHOICES,
    check_persistent,
    check_persistent_knobs,
    check_ws_wgmma,
    persistent_takes,
    producer_ring_bytes,
)
from .errors import ArgumentError, ConfigError
from .problem import MoEProblem
from .splitk import SplitK
from .tiles import HOPPER_KINDS, SWIZZLE_ALIGN, TMA_MAX_GROUPS, GemmTile

ROUTER_CHOICES = (1, 2, 4, 8, 16, 32)
COMM_STREAM_CHOICES = (1, 2, 4)
#: Expert chunks per peer (each exchanged as it is computed).
CHUNK_RANGE = range(1, 17)
#: How a forward runs: "host" reads the exchanged counts on the host and sizes every
#: transfer and launch from them (one host synchronisation per call); "graph" keeps counts
#: and row offsets on the device, moves fixed-size blocks (sized when the layer is built) and
#: replays the whole forward as one CUDA graph per token count (docs/architecture.md).
MODE_CHOICES = ("host", "graph")
#: How tokens move between ranks: "nccl" (the forward plan: kernels on streams, NCCL
#: grouped send/recv) or "nvlink" (one node: one persistent kernel per forward stores rows
#: into the peers' symmetric buffers over NVLink/P2P, templates/persistent.cu.j2).
TRANSPORT_CHOICES = ("nccl", "nvlink")
#: SMs the tma kernel's persistent grid leaves free (``comm_sms``; transport nccl, P > 1):
#: one block per SM with ~200 KB of shared memory and every register leaves NCCL's kernels
#: no room, so transfers wait for a launch to end (overlap efficiency 0.015-0.024 on
#: Mixtral T=4096, 4 x H200, against 0.36 with the non-persistent tiles on 4 x H100).
COMM_SMS_CHOICES = (0, 4, 8, 16, 32)


@dataclass(frozen=True)
class KernelConfig:
    """Every tunable knob of the generated layer.

    ``gate_up`` tiles the fused gate/up projection (two B operands, SiLU·mul epilogue),
    ``down`` the down projection; both also serve the shared experts. ``fuse_sources``:
    compute all peers' tokens in one launch once they have all arrived (each expert's
    weights read once, from L2 for the later sources) instead of peer by peer as they land
    (more overlap, but weights re-read per peer): the better choice when weights dominate.
    ``packed_slots``: within each (peer, round, buffer) slot of the symmetric layout the
    local experts' rows sit back to back (offsets from the exchanged counts) instead of at
    ``e * C``, so a peer's chunk is one contiguous NCCL send/recv instead of one per expert.
    Same tensor, same single writer per slot; only the rows' place inside the slot moves.
    ``own_split`` (fused sources): this rank's tokens for the first half of the local experts
    are computed while the dispatch is in flight, the second half while the combine is
    (instead of all before the fused launch, leaving the combine exposed). ``own_stream``
    (with ``own_split``): those two halves run on the shared-experts stream beside the fused
    launch, so each persistent GEMM grid's last, partly idle wave is filled by the other's
    blocks instead of waiting for it. ``gather_experts`` (fused sources, mode "host"): the
    dispatch lands each local expert's rows from every peer back to back in one buffer, so
    the fused launch has one group per expert instead of one per (peer, expert) and no
    partial m tile per peer (the layer's groups are ragged: a 1088-row group cost 26% more
    than a 1024-row one on H200); its results leave from there for the combine. Only where
    the rows land on this rank moves; what goes over the wire is unchanged.
    ``mode`` (``MODE_CHOICES``): "host" plans each call on the host from the exchanged
    counts; "graph" runs with no host synchronisation and replays a CUDA graph.
    """

    gate_up: GemmTile
    down: GemmTile
    router_tokens_per_block: int = 8
    chunks_per_peer: int = 1
    comm_streams: int = 1
    shared_stream: bool = True
    overlap: bool = True
    fuse_sources: bool = False
    packed_slots: bool = False
    mode: str = "host"
    transport: str = "nccl"
    blocks_per_sm: int = 0  # transport "nvlink" only (BLOCKS_PER_SM_CHOICES)
    gu_splits: int = 1  # transport "nvlink", fused ws tiles only (K_SPLIT_CHOICES)
    dn_splits: int = 1
    dispatch_blocks: int = 1  # transport "nvlink" only (DISPATCH_BLOCK_CHOICES)
    # transport "nvlink", Hopper, BK 64, both tiles _ws (their weights by TMA) or both
    # wgmma (a routed row task's rows and weights by TMA)
    ws_tma: bool = False
    comm_sms: int = 0  # transport "nccl", tma tiles, P > 1 (COMM_SMS_CHOICES)
    own_split: bool = False  # fused sources (not _ws), P > 1, >= 2 local experts
    own_stream: bool = False  # own_split's halves on the shared-experts stream
    gather_experts: bool = False  # fused sources, mode host: one group per local expert
    send_blocks: int = 0  # transport "nvlink", P > 1, per-source tasks (SEND_BLOCK_CHOICES)
    router_batches: int = 1  # transport "nvlink", 8, 32 or 64 experts (ROUTER_BATCH_CHOICES)
    task_tiles: int = 1  # transport "nvlink", TMA row tiles (TASK_TILE_CHOICES)
    defer_refill: bool = False  # transport "nvlink", TMA row tiles: refills never block
    stage_epilogue: int = 0  # transport "nvlink", TMA row tiles (STAGE_EPILOGUE_CHOICES)
    phased_tasks: bool = False  # transport "nvlink", per-source lists: all gate/up first
    # transport "nvlink", TMA row tasks on both GEMMs: a producer warpgroup claims the tasks
    # and feeds their ring, the two MMA warpgroups only compute (check_task_producer)
    task_producer: bool = False
    # transport "nvlink": where no row can drop, rows take their slots by atomics as they are
    # routed (no positions scan, no grid barrier before the dispatch)
    atomic_front: bool = False
    # wgmma or tma gate/up tiles: gate and up in two MMAs of BN (default: one of 2 BN)
    split_gated_mma: bool = False
    # transport "nvlink", Hopper, both tiles _ws of 128 tokens with TMA weights: warpgroup
    # MMAs with the tokens on the 64-row side (check_ws_wgmma)
    ws_wgmma: bool = False
    # every gated epilogue: silu(g) = h + h tanh(h), h = g / 2, one tanh.approx (one
    # special-function op per element, not ex2 and rcp; |sigmoid error| <= 2.5e-4)
    tanh_silu: bool = False
    # transport "nvlink", phased per-source lists: one list over every source, the sources'
    # row tasks of an (expert, n-tile) side by side (check_interleave_sources)
    interleave_sources: bool = False
    # ... with this rank's own rows in a list of their own ahead of the peers' one list (their
    # tasks need only this rank's flag): 3 or more ranks (check_own_first)
    own_first: bool = False
    # ... the phased lists' down tasks (or own_first's) with this rank's own last: the
    # peers' results leave first (check_own_down_last)
    own_down_last: bool = False
    # transport "nvlink", down TMA row tasks: each k-tile's rows loaded once the gate/up
    # n-tile writing them is complete, the gate/up tasks n-tile-major (check_stream_down)
    stream_down: bool = False
    # ... and the down tasks ahead of the gate/up tasks in the queue, where the lists are
    # known whole (one rank, or the one list over every source) (check_early_down)
    early_down: bool = False
    # transport "nvlink", shared experts: their gate/up tiles on blocks of their own beside
    # the route and dispatch (check_shared_front)
    shared_front: bool = False

    @property
    def uses_wgmma(self) -> bool:
        """Whether a tile issues Hopper-only instructions (wgmma; the tma kernel too)."""
        return any(self.wgmma_tile(t) for t in (self.gate_up, self.down))

    @property
    def fuses_own_tokens(self) -> bool:
        """Fused sources with weight-streaming tiles: this rank's tokens join the one
        launch, so each weight byte is read once per forward. (Computing them early, while
        the dispatch is in flight, reads every weight twice where decode is bound by
        reading weights.)"""
        return self.fuse_sources and self.gate_up.mma == "ws"

    def wgmma_tile(self, tile: GemmTile) -> bool:
        """Whether ``tile`` (one of this config's) multiplies with warpgroup MMAs."""
        return tile.mma in HOPPER_KINDS or (self.ws_wgmma and tile.mma == "ws")

    @property
    def uses_tma(self) -> bool:
        return "tma" in (self.gate_up.mma, self.down.mma)

    @property
    def encodes_tensor_maps(self) -> bool:
        """Whether the layer encodes TMA tensor maps (the tma kernel's, or the weight tiles'
        with ``ws_tma``): an exported build then calls the driver API (-lcuda)."""
        return self.uses_tma or self.ws_tma

    @property
    def block_m(self) -> int:
        """Row granularity of capacity: both GEMMs tile the same expert rows."""
        return max(self.gate_up.bm, self.down.bm)

    @property
    def name(self) -> str:
        parts = [f"gu_{self.gate_up.name}", f"dn_{self.down.name}",
                 f"r{self.router_tokens_per_block}", f"c{self.chunks_per_peer}",
                 f"cs{self.comm_streams}", "ss1" if self.shared_stream else "ss0"]
        for f, tag in _SUFFIXES:  # a knob at its default adds nothing
            v = getattr(self, f)
            if f == "gu_splits":  # both K splits in one suffix
                if (v, self.dn_splits) != (1, 1):
                    parts.append(f"{tag}{v}x{self.dn_splits}")
            elif isinstance(_DEFAULTS[f], bool):
                if bool(v) != _DEFAULTS[f]:
                    parts.append(tag)
            elif v != _DEFAULTS[f]:
                parts.append(f"{tag}{v}")  # a word knob's tag is empty: its value
        return "__".join(parts)

    @classmethod
    def from_name(cls, name: str) -> KernelConfig:
        if not isinstance(name, str):
            raise ConfigError("name", name, "expected a config name (str) as "
                              "KernelConfig.name prints it")
        m = _NAME_RE.fullmatch(name)
        if not m:
            raise ConfigError("name", name, "expected a name as KernelConfig.name prints it, "
                              "e.g. gu_bm128_bn64_bk64_w4x2_s3__dn_bm128_bn128_bk64_w2x4_s3"
                              "__r8__c1__cs1__ss1")
        gu, dn, r, c, cs, ss, *rest = m.groups()
        groups, knobs = iter(rest), {}
        for f, _ in _SUFFIXES:
            d, v = _DEFAULTS[f], next(groups)
            if f == "gu_splits":
                knobs["gu_splits"], knobs["dn_splits"] = int(v or 1), int(next(groups) or 1)
            else:
                knobs[f] = (d if v is None else not d if isinstance(d, bool)
                            else v if isinstance(d, str) else int(v))
        return cls(GemmTile.parse(gu), GemmTile.parse(dn), int(r), int(c), int(cs),
                   ss == "1", **knobs)

    # -- validation -------------------------------------------------------------------
    @staticmethod
    def gemm_shapes(problem: MoEProblem) -> dict[str, tuple[int, int, int]]:
        """(N, K, B operands) each tile must fit: the narrower of the routed and the shared
        experts' widths, since the same GEMMs serve both."""
        width = min(problem.intermediate, problem.shared_width or problem.intermediate)
        return {"gate_up": (width, problem.hidden, 2), "down": (problem.hidden, width, 1)}

    def validate(self, problem: MoEProblem, limits: DeviceLimits | str = DEFAULT_ARCH) -> None:
        if not isinstance(problem, MoEProblem):
            raise ArgumentError("problem", problem, "a flashmoe_gen.MoEProblem")
        if not isinstance(limits, DeviceLimits):
            limits = limits_for(limits)
        for which in ("gate_up", "down"):
            if not isinstance(getattr(self, which), GemmTile):
                raise ConfigError(which, getattr(self, which), "must be a GemmTile")
        name = self.name
        for f, d in _DEFAULTS.items():  # each knob of its default's type (a new one too)
            v = getattr(self, f)
            if type(d) is int and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f, v, "must be an integer", name)
            if isinstance(d, bool) and not isinstance(v, bool):
                raise ConfigError(f, v, "must be a bool", name)
        for which, (n, k, b_operands) in self.gemm_shapes(problem).items():
            getattr(self, which).validate(which, n, k, b_operands, limits, name)
        groups = problem.world_size * problem.local_experts  # the fused launch's groups
        if self.uses_tma and groups > TMA_MAX_GROUPS:
            raise ConfigError("gate_up.mma", "tma", f"a launch may cover {groups} groups "
                              f"(sources x local experts), the tma kernel at most "
                              f"{TMA_MAX_GROUPS}: use wgmma tiles", name)
        if self.router_tokens_per_block not in ROUTER_CHOICES:
            raise ConfigError("router_tokens_per_block", self.router_tokens_per_block,
                              f"choose one of {list(ROUTER_CHOICES)}", name)
        if self.chunks_per_peer not in CHUNK_RANGE:
            raise ConfigError("chunks_per_peer", self.chunks_per_peer,
                              f"choose {CHUNK_RANGE.start}..{CHUNK_RANGE.stop - 1}", name)
        if self.comm_streams not in COMM_STREAM_CHOICES:
            raise ConfigError("comm_streams", self.comm_streams,
                              f"choose one of {list(COMM_STREAM_CHOICES)}", name)
        if self.mode not in MODE_CHOICES:
            raise ConfigError("mode", self.mode, f"choose one of {list(MODE_CHOICES)}", name)
        if self.transport not in TRANSPORT_CHOICES:
            raise ConfigError("transport", self.transport,
                              f"choose one of {list(TRANSPORT_CHOICES)}", name)
        if self.blocks_per_sm not in BLOCKS_PER_SM_CHOICES:
            raise ConfigError("blocks_per_sm", self.blocks_per_sm,
                              f"choose one of {list(BLOCKS_PER_SM_CHOICES)} (0: as many as fit)",
                              name)
        for f in ("gu_splits", "dn_splits"):
            v = getattr(self, f)
            if v not in K_SPLIT_CHOICES:
                raise ConfigError(f, v, f"choose one of {list(K_SPLIT_CHOICES)}", name)
            if v > 1 and not (self.transport == "nvlink" and self.fuses_own_tokens):
                raise ConfigError(f, v, "only transport 'nvlink' with fused weight-streaming "
                                  "tiles (fuse_sources, _ws) splits a tile's K range: use 1",
                                  name)
        if self.transport == "nvlink":
            check_persistent(self, name)
            SplitK.of(problem, self).check(name)
        elif self.blocks_per_sm:
            raise ConfigError("blocks_per_sm", self.blocks_per_sm, "only transport 'nvlink' "
                              "runs a persistent kernel: use 0", name)
        if self.dispatch_blocks not in DISPATCH_BLOCK_CHOICES:
            raise ConfigError("dispatch_blocks", self.dispatch_blocks,
                              f"choose one of {list(DISPATCH_BLOCK_CHOICES)} (1: one block for "
                              "a handful of tokens, 0: every block)", name)
        if self.dispatch_blocks != 1 and self.transport != "nvlink":
            raise ConfigError("dispatch_blocks", self.dispatch_blocks, "only transport "
                              "'nvlink' runs a persistent kernel: use 1", name)
        check_persistent_knobs(self, problem, limits, name)
        if self.split_gated_mma and not self.wgmma_tile(self.gate_up):
            raise ConfigError("split_gated_mma", True, "only wgmma or tma gate/up tiles "
                              "(or ws with ws_wgmma) compute gate and up in one MMA: use "
                              "False", name)
        if self.ws_wgmma:
            check_ws_wgmma(self, limits, name)
        if self.comm_sms:
            self._validate_comm_sms(problem, name)
        if self.own_split:
            self._validate_own_split(problem, name)
        if self.own_stream and not self.own_split:
            raise ConfigError("own_stream", True, "moves own_split's halves to the shared "
                              "stream: turn own_split on too (__os__ost) or leave it off", name)
        if self.gather_experts:
            self._validate_gather_experts(problem, name)

    def _validate_gather_experts(self, problem: MoEProblem, name: str) -> None:
        """Each local expert's peer rows in one run: there must be a fused launch of peers'
        rows only, whose offsets the host plans from the counts it read."""
        why = None
        if not self.fuse_sources or self.fuses_own_tokens:
            why = ("only fused sources without _ws tiles (whose launch takes this rank's "
                   "tokens in) gather the peers' rows: use fs with sync, wgmma or tma tiles")
        elif self.transport != "nccl" or problem.world_size == 1:
            why = "only NCCL transfers from peers land rows to gather: use several ranks"
        elif self.mode != "host":
            why = ("mode 'graph' keeps each peer's rows in its fixed slot region (offsets "
                   "on the device): use mode 'host'")
        elif self.own_stream:
            why = ("own_stream computes this rank's rows in its region of the per-source "
                   "activations, which the gathered launch uses whole: drop __ost")
        if why:
            raise ConfigError("gather_experts", True, why + " (or leave gather_experts off)",
                              name)

    def _validate_own_split(self, problem: MoEProblem, name: str) -> None:
        """This rank's tokens split around the fused launch: there must be a fused launch of
        peers' tokens only (not _ws, which takes this rank's in too), peers, and two halves
        of local experts."""
        why = None
        if not self.fuse_sources or self.fuses_own_tokens:
            why = ("only fused sources without _ws tiles (whose launch takes this rank's "
                   "tokens in) compute this rank's tokens apart: use fs with sync, wgmma or "
                   "tma tiles")
        elif self.transport != "nccl" or problem.world_size == 1 or not self.overlap:
            why = "only an overlapped NCCL forward over several ranks has transfers to hide"
        elif problem.local_experts < 2:
            why = (f"{problem.local_experts} local expert: nothing to put after the fused "
                   f"launch")
        if why:
            raise ConfigError("own_split", True, why + " (or leave own_split off)", name)

    def _validate_comm_sms(self, problem: MoEProblem, name: str) -> None:
        """SMs left to NCCL: only the tma kernel's grid is sized to the SMs (other tiles'
        blocks retire one by one and let NCCL's in), only where NCCL moves tokens."""
        v = self.comm_sms
        if v not in COMM_SMS_CHOICES:
            raise ConfigError("comm_sms", v, f"choose one of {list(COMM_SMS_CHOICES)}", name)
        if not self.uses_tma:
            raise ConfigError("comm_sms", v, "only the tma kernel (_tma tiles) takes every "
                              "SM; other tiles leave room for NCCL as they go: use 0", name)
        if self.transport != "nccl" or problem.world_size == 1:
            raise ConfigError("comm_sms", v, "SMs are left to NCCL only where it moves "
                              "tokens (transport 'nccl', world_size > 1): use 0", name)

    persistent_takes = staticmethod(persistent_takes)

    def persistent_smem(self) -> int:
        """Dynamic shared memory of the persistent kernel: the larger of its two GEMMs', and
        SWIZZLE_ALIGN bytes to align TMA boxes to the swizzle's atoms (``ws_tma``); with
        ``task_producer`` the one ring both GEMMs' tasks share."""
        if self.task_producer:
            return producer_ring_bytes(self)
        return max(self.gate_up.smem_bytes(2), self.down.smem_bytes(1)) + \
            (SWIZZLE_ALIGN if self.ws_tma else 0)

    @property
    def persistent_threads(self) -> int:
        """The persistent kernel's block: its tiles' warps, and with ``task_producer`` the
        producer warpgroup."""
        return self.gate_up.threads + (PRODUCER_THREADS if self.task_producer else 0)

    def graph_mode(self) -> KernelConfig:
        """The same config in mode "graph", without the knobs only mode "host" has
        (``gather_experts``: the host plans the gathered offsets from the counts it read)."""
        return replace(self, mode="graph", gather_experts=False)

    # -- defaults (flashmoe_gen.defaults) and serialisation --------------------------------
    @classmethod
    def default(cls, problem: MoEProblem, arch: str = DEFAULT_ARCH) -> KernelConfig:
        """The heuristic default for transport "nccl" (``defaults.heuristic_default``)."""
        from .defaults import heuristic_default
        return heuristic_default(problem, arch)

    @classmethod
    def persistent_default(cls, problem: MoEProblem, arch: str = DEFAULT_ARCH) -> KernelConfig:
        """The heuristic default for transport "nvlink" (``defaults.persistent_default``)."""
        from .defaults import persistent_default
        return persistent_default(problem, arch)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise ConfigError("config", d, f"expected a JSON object / dict with the fields "
                              f"{sorted(known)}")
        d = dict(d)
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ConfigError(str(unknown[0]), d[unknown[0]],
                              f"unknown field; known fields: {sorted(known)}")
        for key in ("gate_up", "down"):
            if key not in d:
                raise ConfigError(key, None, "required: a tile such as "
                                  '{"bm": 128, "bn": 64, "bk": 64, "warps_m": 4, "warps_n": 2, '
                                  '"stages": 3}')
        tile_fields = {f.name for f in fields(GemmTile)}
        for key in ("gate_up", "down"):
            if isinstance(d.get(key), dict):
                extra = {str(k) for k in d[key]} - tile_fields
                missing = tile_fields - set(d[key]) - {"mma"}  # older JSON: mma.sync
                if extra or missing:
                    raise ConfigError(key, d[key], f"unknown {sorted(extra)} / missing "
                                      f"{sorted(missing)}; tile fields: {sorted(tile_fields)}")
                d[key] = GemmTile(**d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> KernelConfig:
        if not isinstance(s, (str, bytes)):
            raise ConfigError("json", s, "expected JSON text (str)")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError("json", s if len(s) <= 80 else s[:77] + "...",
                              f"not valid JSON ({e}); expected an object such as "
                              "KernelConfig.to_json() prints, or a config name") from None
        return cls.from_dict(d)

    @classmethod
    def parse(cls, text: str) -> KernelConfig:
        """A config from JSON text or from its name (CLI ``--config``)."""
        if not isinstance(text, str):
            raise ConfigError("config", text, "expected JSON text or a config name (str), "
                              "e.g. KernelConfig.default(problem).name")
        text = text.strip()
        return cls.from_json(text) if text.startswith(("{", "[")) else cls.from_name(text)


#: The name's optional suffixes in order, one per knob: a knob at its default adds
#: nothing; else a bool adds its tag, a number the tag and its value, a word knob (mode,
#: transport; empty tag) its value, and the K splits ``ks{gu_splits}x{dn_splits}``. One
#: table spells ``name`` (the cache and DB key) and parses it back (``from_name``).
_SUFFIXES = (("overlap", "serial"), ("fuse_sources", "fs"), ("packed_slots", "pk"),
             ("mode", ""), ("transport", ""), ("blocks_per_sm", "b"), ("gu_splits", "ks"),
             ("dispatch_blocks", "d"), ("ws_tma", "wt"), ("comm_sms", "cm"),
             ("own_split", "os"), ("own_stream", "ost"), ("gather_experts", "ge"),
             ("send_blocks", "sb"), ("router_batches", "rb"), ("task_tiles", "tt"),
             ("defer_refill", "dr"), ("stage_epilogue", "se"), ("phased_tasks", "ph"),
             ("task_producer", "pr"), ("atomic_front", "af"), ("split_gated_mma", "g2"),
             ("ws_wgmma", "wsg"), ("tanh_silu", "ts"), ("interleave_sources", "il"),
             ("own_first", "of"), ("own_down_last", "odl"),
             ("stream_down", "sd"), ("early_down", "ed"), ("shared_front", "sf"))
_DEFAULTS = {f.name: f.default for f in fields(KernelConfig)}
_WORDS = {"mode": MODE_CHOICES, "transport": TRANSPORT_CHOICES}
#: The knob a name tag stands for ("ts" -> "tanh_silu"): the benches' short knob names.
FIELD_OF_TAG = {tag: f for f, tag in _SUFFIXES if tag}


def _suffix_pattern(field_name: str, tag: str) -> str:
    default = _DEFAULTS[field_name]
    if field_name == "gu_splits":
        return rf"(?:__{tag}(\d+)x(\d+))?"
    if isinstance(default, bool):
        return f"(__{tag})?"
    if isinstance(default, str):
        return "(?:__(" + "|".join(w for w in _WORDS[field_name] if w != default) + "))?"
    return rf"(?:__{tag}(\d+))?"


_NAME_RE = re.compile(r"gu_(\S+?)__dn_(\S+?)__r(\d+)__c(\d+)__cs(\d+)__ss([01])"
                      + "".join(_suffix_pattern(f, t) for f, t in _SUFFIXES))


def expert_chunks(problem: MoEProblem, config: KernelConfig) -> list[tuple[int, int]]:
    """Local-expert ranges ``[e0, e1)`` computed (and exchanged) together per peer."""
    el = problem.local_experts
    n = min(config.chunks_per_peer, el)
    bounds = [round(i * el / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]
