"""Replay a stored grid sweep to compare samplers without a GPU.

A grid study (``flashmoe-tune tune --sampler grid --space small``) measured every valid
config of the small space once. Here each sampler searches the same space with those stored
medians as its objective; we count the evaluations until it first comes within 5% (and 1%)
of the grid's best. Many seeds, so the numbers are distributions, not one lucky run.

    python bench/sampler_replay.py sqlite:///grid_studies.db grid-dsv2 --out replay.md
    python bench/sampler_replay.py bench/results/2026-11-26_grid_dsv2lite_small_2xH100.json -
    python bench/sampler_replay.py bench/results/2026-11-26_grid_dsv2lite_steep_2xH200.json - \
        --space steep --transports nccl,nvlink
"""

from __future__ import annotations

import argparse
import statistics
import sys

import optuna

from flashmoe_gen.arch import limits_for
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.objective import FAILED, OK, Outcome
from flashmoe_gen.tuner.space import SearchSpace
from flashmoe_gen.tuner.study import run_study


def load_grid(storage: str, study_name: str) -> dict[str, float]:
    """config name -> median ms, from an Optuna storage or a committed JSON table."""
    if storage.endswith(".json"):
        import json
        with open(storage) as f:
            return json.load(f)["medians_ms"]
    study = optuna.load_study(study_name=study_name, storage=storage)
    table = {t.user_attrs["config"]: t.value for t in study.trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    return table


def space_of(table: dict[str, float], problem: MoEProblem) -> SearchSpace:
    """The space the grid measured: each knob's values as found in the table's config
    names (a grid stored before a knob existed keeps that knob at its old value)."""
    params = [SearchSpace.params_from_config(KernelConfig.from_name(n)) for n in table]
    choices = {k: tuple(sorted({p[k] for p in params}, key=str)) for k in params[0]}
    return SearchSpace(problem, limits_for("sm_90"), choices)


def steepness(table: dict[str, float], slower: float = 1.10) -> float:
    """Share of the grid more than ``slower`` x the best: a flat grid (most configs near the
    best) makes any sampler look good, so the sampler target asks for >= 50%."""
    best = min(table.values())
    return sum(v > slower * best for v in table.values()) / len(table)


def evals_to_reach(trials, target: float) -> int | None:
    for i, t in enumerate(trials, 1):
        if t.outcome.ok and t.outcome.median_ms <= target:
            return i
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("storage", help="Optuna storage URL, or a grid table .json")
    ap.add_argument("study", help="study name (ignored for .json)")
    ap.add_argument("--problem", default="2048,1408,64,6,2,2,512",
                    help="hidden,intermediate,experts,top_k,shared,world,tokens of the sweep")
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--samplers", default="tpe,random", help="comma-separated")
    ap.add_argument("--space", default=None,
                    help="the space the grid swept (e.g. steep); default: the knob values "
                         "found in the table's config names")
    ap.add_argument("--transports", default="nccl",
                    help="with --space: the transports the grid chose between (nccl,nvlink)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    h, i, e, k, s, w, t = (int(v) for v in a.problem.split(","))
    problem = MoEProblem(h, i, e, k, shared_experts=s, world_size=w, tokens_per_rank=t)
    table = load_grid(a.storage, a.study)
    # The swept space itself where named: the knob values' cross product may hold configs
    # the grid never had (the nvlink transport forces its schedule knobs, for one).
    space = (SearchSpace.for_problem(problem, "sm_90", a.space, tuple(a.transports.split(",")))
             if a.space else space_of(table, problem))
    valid = [c.name for c in space.valid_configs()]
    missing = [c for c in valid if c not in table]
    best = min(table.values())
    budget = len(valid)

    def evaluate(cfg) -> Outcome:
        ms = table.get(cfg.name)  # a stored measurement, not a new one
        if ms is None:
            return Outcome(FAILED, reason="not in the stored grid")
        return Outcome(OK, ms, ms, ms, 0.0)

    lines = [f"grid: {len(table)} measured configs ({len(valid)} valid, {len(missing)} "
             f"unmeasured), best {best:.4f} ms, median {statistics.median(table.values()):.4f}"
             f" ms, worst {max(table.values()):.4f} ms; "
             f"{sum(v <= 1.05 * best for v in table.values())} configs within 5% of best, "
             f"{sum(v <= 1.01 * best for v in table.values())} within 1%; "
             f"{100 * steepness(table):.0f}% of the grid > 10% slower than the best "
             f"({'steep enough' if steepness(table) >= 0.5 else 'flat: says little'} for the "
             "sampler target, which asks for >= 50%)", "",
             "| sampler | within | median evals | p90 evals | never (of seeds) | "
             "median as % of grid |", "|---|---|---|---|---|---|"]
    samplers = a.samplers.split(",")
    for sampler, seeded in [(x, True) for x in samplers] + [(x, False) for x in samplers]:
        # One study per seed serves both tolerances (the same seed draws the same trials).
        runs = [run_study(problem, evaluate, space=space, study_name=f"{sampler}{seed}",
                          sampler=sampler, n_trials=budget, seed=seed,
                          enqueue_seeds=seeded).trials for seed in range(a.seeds)]
        for tol in (1.05, 1.01):
            counts = [evals_to_reach(trials, tol * best) for trials in runs]
            got = sorted(c for c in counts if c is not None)
            never = len(counts) - len(got)
            med = statistics.median(got) if got else float("nan")
            p90 = got[int(0.9 * (len(got) - 1))] if got else float("nan")
            name = sampler + ("" if seeded else " (no default/known-good first)")
            lines.append(f"| {name} | {round((tol - 1) * 100)}% | {med} | {p90} | {never} | "
                         f"{100 * med / budget:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
