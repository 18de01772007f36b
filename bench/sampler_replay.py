"""Replay a stored grid sweep to compare samplers without a GPU.

A grid study (``flashmoe-tune tune --sampler grid --space small``) measured every valid
config of the small space once. Here each sampler searches the same space with those stored
medians as its objective; we count the evaluations until it first comes within 5% (and 1%)
of the grid's best. Many seeds, so the numbers are distributions, not one lucky run.

    python bench/sampler_replay.py sqlite:///grid_studies.db grid-dsv2 --out replay.md
    python bench/sampler_replay.py bench/results/2026-11-26_grid_dsv2lite_small_2xH100.json -
"""

from __future__ import annotations

import argparse
import statistics
import sys

import optuna

from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.objective import OK, Outcome
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
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    h, i, e, k, s, w, t = (int(v) for v in a.problem.split(","))
    problem = MoEProblem(h, i, e, k, shared_experts=s, world_size=w, tokens_per_rank=t)
    table = load_grid(a.storage, a.study)
    space = SearchSpace.for_problem(problem, "sm_90", "small")
    valid = [c.name for c in space.valid_configs()]
    missing = [c for c in valid if c not in table]
    best = min(table.values())
    budget = len(valid)

    def evaluate(cfg) -> Outcome:
        ms = table[cfg.name]  # a stored measurement, not a new one
        return Outcome(OK, ms, ms, ms, 0.0)

    lines = [f"grid: {len(table)} measured configs ({len(valid)} valid, {len(missing)} "
             f"unmeasured), best {best:.4f} ms, median {statistics.median(table.values()):.4f}"
             f" ms, worst {max(table.values()):.4f} ms; "
             f"{sum(v <= 1.05 * best for v in table.values())} configs within 5% of best, "
             f"{sum(v <= 1.01 * best for v in table.values())} within 1%", "",
             "| sampler | within | median evals | p90 evals | never (of seeds) | "
             "median as % of grid |", "|---|---|---|---|---|---|"]
    for sampler, seeded in (("tpe", True), ("random", True), ("tpe", False), ("random", False)):
        for tol in (1.05, 1.01):
            counts = []
            for seed in range(a.seeds):
                res = run_study(problem, evaluate, space=space, study_name=f"{sampler}{seed}",
                                sampler=sampler, n_trials=budget, seed=seed,
                                enqueue_seeds=seeded)
                counts.append(evals_to_reach(res.trials, tol * best))
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
