"""The down TMA row tiles' K parts (config ``dn_ksplit``) on the CPU: which configs take
them, their name, scratch and template constants, the tuner's moot rule, and a port of the
kernel's per-call choice of parts (templates/persistent.cu.j2 ``choose_ks`` and the down
task's part decode), tied to the template's text: the parts of every split tile fit the
scratch, keep at least KS_MIN_STEPS k-tiles each and cover the tile's K range once."""
from dataclasses import replace

import pytest

from flashmoe_gen.config import DN_KSPLIT_CHOICES, KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.persistent import state_words
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import persistent_split_base, render
from flashmoe_gen.splitk import KSPLIT_TASKS, SPLIT_MIN_STEPS, ksplit_words

SEED4 = MoEProblem(512, 2048, 8, 2, world_size=4, tokens_per_rank=256)
SEED1 = SEED4.replace(world_size=1)


def _rows(problem):
    cfg = KernelConfig.persistent_default(problem, "sm_90")
    assert cfg.ws_tma and cfg.down.mma == "wgmma", cfg.name
    return cfg


def choose_ks(tiles: int, grid: int, cap: int, k_tiles: int) -> int:
    """The kernel's choose_ks: the most parts (up to the config's) with which the call's
    down tiles fit min(grid, KS_TASKS) tasks, each part KS_MIN_STEPS k-tiles."""
    room = min(grid, KSPLIT_TASKS) // max(tiles, 1)
    return max(1, min(cap, room, k_tiles // SPLIT_MIN_STEPS))


def k_range(k: int, ks: int, k_tiles: int) -> tuple[int, int]:
    """Part k's first k-tile and count (the down task's KPart)."""
    return k_tiles * k // ks, k_tiles * (k + 1) // ks - k_tiles * k // ks


def test_the_template_chooses_and_decodes_parts_as_the_port():
    code = " ".join(render(SEED4, replace(_rows(SEED4), dn_ksplit=8)).code.split())
    for text in (
            "constexpr int DN_KS = 8, KS_TASKS = 132;",
            "constexpr int KS_MIN_STEPS = 4;",
            "constexpr int DN_KT = (INTERMEDIATE + 63) / 64;",
            "const int room = min(grid, KS_TASKS) / max(tiles, 1); "
            "dn_ks = max(1, min(min(DN_KS, room), DN_KT / KS_MIN_STEPS));",
            "tiles += NDN * task_parts<DN_BM, DN_ROWS, DN_S>(min(my_counts[a], capacity));",
            "const int k = part % ks, tile = (r - down_begin()) / ks; kp = {k, ks, DN_KT * k / "
            "ks, DN_KT * (k + 1) / ks - DN_KT * k / ks, reinterpret_cast<float*>(state + "
            "KS_BASE + KS_TASKS) + static_cast<long long>(tile) * ks * DN_BM * DN_BN, state + "
            "KS_BASE + tile, epoch};",
            "const int m_tiles = part_row_tiles<DN_BM>(n_rows, part / ks);",
            "for (int q = 0; q < SOURCES; ++q) wait_dispatch(q); choose_ks();",
            # the split tile's last part stores it, the others nothing
            "const bool out = kp == nullptr || kp->parts == 1 || split_sum<NB * BN / 2, "
            "WARPS * 32>(&acc[0][0], kp->part, kp->parts, kp->scratch, kp->arrivals, "
            "kp->epoch);"):
        assert text in code, text
    plain = render(SEED4, _rows(SEED4)).code
    assert "KPart kp" not in plain and "constexpr int DN_KS = 1," in plain


@pytest.mark.parametrize("k_tiles", [22, 32, 112])
@pytest.mark.parametrize("cap", DN_KSPLIT_CHOICES)
def test_parts_fit_the_scratch_and_cover_k_once(cap, k_tiles):
    for tiles in (0, 1, 2, 7, 16, 33, 66, 67, 200):
        for grid in (66, 132, 264):
            ks = choose_ks(tiles, grid, cap, k_tiles)
            assert 1 <= ks <= cap
            if ks > 1:  # every split tile's parts inside the scratch, the counters too
                assert tiles * ks <= min(grid, KSPLIT_TASKS) and tiles < KSPLIT_TASKS
                assert k_tiles // ks >= SPLIT_MIN_STEPS
            covered = [kt for k in range(ks)
                       for kt in range(k_range(k, ks, k_tiles)[0], sum(k_range(k, ks, k_tiles)))]
            assert covered == list(range(k_tiles))
    # the seed example at 256 tokens on 4 ranks: 16 down tiles of 32 k-tiles -> 8 parts
    assert choose_ks(16, 132, 8, 32) == 8 and choose_ks(32, 132, 8, 32) == 4


def test_configs_that_take_the_parts_and_those_refused():
    for p in (SEED4, SEED1):
        cfg = replace(_rows(p), dn_ksplit=4)
        cfg.validate(p, "sm_90")
        assert cfg.name.endswith("__dk4") and KernelConfig.from_name(cfg.name) == cfg
        assert state_words(p, cfg) == persistent_split_base(p, cfg) + ksplit_words(cfg)
        assert ksplit_words(cfg) == KSPLIT_TASKS * (1 + 128 * 256 // 2)
    rows = _rows(SEED4)
    fused = KernelConfig.persistent_default(SEED4.replace(tokens_per_rank=1), "sm_90")
    for bad, text in ((replace(rows, dn_ksplit=3), "choose one of"),
                      (replace(fused, dn_ksplit=2), "TMA row tasks"),
                      (replace(rows, task_tiles=2, stage_epilogue=0, dn_ksplit=2),
                       "task_tiles 1"),
                      (replace(rows, task_producer=True, interleave_sources=False,
                               dn_ksplit=2), "task_producer False"),
                      (replace(rows, interleave_sources=False, phased_tasks=False,
                               dn_ksplit=2), "set phased_tasks")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(SEED4, "sm_90")
        assert e.value.field == "dn_ksplit"
    # one rank: one source, whose down list follows its gate/up list anyway
    replace(_rows(SEED1), phased_tasks=False, dn_ksplit=8).validate(SEED1, "sm_90")


def test_the_tuner_searches_the_parts_where_they_apply():
    from flashmoe_gen.tuner.space import SearchSpace

    space = SearchSpace.for_problem(SEED4, "sm_90", "full", ("nccl", "nvlink"))
    assert set(space.choices["dn_ksplit"]) == set(DN_KSPLIT_CHOICES)
    params = space.params_from_config(replace(_rows(SEED4), dn_ksplit=8))
    assert space.canonical(params)["dn_ksplit"] == 8
    assert space.config_from_params(params).dn_ksplit == 8
    for moot in ({"task_tiles": 2}, {"task_producer": True}, {"ws_tma": False},
                 {"transport": "nccl"}, {"dn_mma": "sync"}):
        assert space.canonical(params | moot)["dn_ksplit"] == 1, moot


def test_prefetch_down_shares_cover_the_down_weights_once():
    """prefetch_down: the gate/up tasks' shares (n x SOURCES + q of NGU x SOURCES, the
    shared experts' t of their gate/up tasks) of 16-byte multiples cover the down weights
    once; refused with fused sources and the producer's loop; moot for the tuner likewise."""
    from flashmoe_gen.tuner.space import SearchSpace

    def shares(elems, n):  # the kernel's prefetch_share, per share: [first, end) bytes
        size = elems * 2
        share = -(-size // (16 * n)) * 16
        return [(share * i, min(size, share * (i + 1))) for i in range(n)
                if share * i < size]

    for elems, n in ((512 * 2048, 16 * 4), (2048 * 1408, 11 * 2), (7168 * 2048, 8), (24, 5)):
        got = shares(elems, n)
        assert got[0][0] == 0 and got[-1][1] == elems * 2
        assert all(a[1] == b[0] and a[0] % 16 == 0 for a, b in zip(got, got[1:], strict=False))
    code = " ".join(render(SEED4, replace(_rows(SEED4), prefetch_down=True)).code.split())
    for text in ("constexpr bool PREFETCH_DOWN = true;",
                 "const long long share = (bytes + 16LL * n - 1) / (16LL * n) * 16;",
                 "n * SOURCES + (s - self_rank + SOURCES) % SOURCES, NGU * SOURCES);",
                 "if (PREFETCH_DOWN && part == 0 && threadIdx.x == TMA_THREAD)"):
        assert text in code, text
    cfg = replace(_rows(SEED4), prefetch_down=True)
    cfg.validate(SEED4, "sm_90")
    assert cfg.name.endswith("__pfd") and KernelConfig.from_name(cfg.name) == cfg
    fused = KernelConfig.persistent_default(SEED4.replace(tokens_per_rank=1), "sm_90")
    for bad, text in ((replace(fused, prefetch_down=True), "fuse_sources False"),
                      (replace(cfg, task_producer=True, interleave_sources=False),
                       "task_producer False")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(SEED4, "sm_90")
        assert e.value.field == "prefetch_down"
    space = SearchSpace.for_problem(SEED4, "sm_90", "full", ("nccl", "nvlink"))
    params = space.params_from_config(cfg)
    assert space.canonical(params)["prefetch_down"] is True
    for moot in ({"fuse": True}, {"task_producer": True}, {"transport": "nccl"}):
        assert space.canonical(params | moot)["prefetch_down"] is False, moot
