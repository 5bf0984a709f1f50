"""The decision registered in FINDER_RESULTS.md ("Fifth held-out set") on held-out set 5: R0 (the finder's default as
it ran, no suggestion = never) against R6 (min of the end band's and the speed band's tops / 1.5 under SGD, / 2 under
adaptive optimizers; no suggestion where that top is the grid's max_lr), τ measured at both, medians over seeds.

    python benchmarks/decide_set5.py results/finder_heldout5a_cpu.json.gz results/finder_heldout5b_cpu.json.gz
"""

import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from analyze_speed_rule import load_measured, r6_min_level90  # noqa: E402
from bench_finder import _key, default_margin, load_run  # noqa: E402
from tasks import TASKS  # noqa: E402

NEVER = math.inf


def tau(runs: dict, lr, seed: int) -> float:
    if lr is None:
        return NEVER
    run = runs.get(_key(lr, seed))
    if run is None:
        for key, value in runs.items():
            at, s = key.split("|")
            if int(s) == seed and abs(float(at) - lr) <= 1e-4 * lr:
                return value["tau"]
        raise KeyError(f"τ not measured at {lr} for seed {seed}")
    return run["tau"]


def main() -> None:
    measured = load_measured()
    rows, totals = [], {"R0": [0, 0, 0.0, 0], "R6": [0, 0, 0.0, 0]}  # misses, tasks, worst, seed runs reaching
    for path in sys.argv[1:]:
        for name, data in load_run(path)["tasks"].items():
            runs = {**data["runs"], **measured.get(name, {})}
            seeds = data["seeds"]
            grid = {lr: statistics.median([tau(runs, lr, s) for s in seeds]) for lr in data["grid"]}
            reach = {lr: sum(not math.isinf(tau(runs, lr, s)) for s in seeds) for lr in data["grid"]}
            best_lr = min(grid, key=lambda lr: (grid[lr], -lr))
            best = grid[best_lr]
            informative = max(reach.values()) >= 5
            adaptive = default_margin(TASKS[name]) > 1.5  # 2.5 when this ran, 2 since
            suggestions = {"R0": {}, "R6": {}}
            for finder in data["finders"]:
                sweep = finder["chaos"]
                suggestions["R0"][finder["seed"]] = sweep["suggestion"]
                top = r6_min_level90(sweep)
                no = top is None or top >= sweep["lrs"][-1]
                suggestions["R6"][finder["seed"]] = None if no else top / (2.0 if adaptive else 1.5)
            cells = []
            for rule, by_seed in suggestions.items():
                taus = [tau(runs, lr, s) for s, lr in by_seed.items()]
                median = statistics.median(taus)
                ratio = median / best
                miss = (median - best > 3) if best < 12 else ratio > 1.25
                reached = sum(not math.isinf(t) for t in taus)
                cells.append(f"{median:g} ({ratio:.2f}×{', ✗' if miss else ''}; {reached}/{len(taus)})")
                if informative:
                    totals[rule][0] += miss
                    totals[rule][1] += 1
                    if best >= 12:
                        totals[rule][2] = max(totals[rule][2], ratio)
                    totals[rule][3] += reached
            flag = "" if informative else " (left out: no grid η reaches the target on 5 of 10 seeds)"
            rows.append(f"| {name}{flag} | {best_lr:.3g} → {best:g} | " + " | ".join(cells) + " |")
    print("| task | best grid η → τ | R0 (default today) | R6 |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    for rule, (misses, tasks, worst, reached) in totals.items():
        print(f"{rule}: misses {misses} of {tasks}, worst ratio (best τ ≥ 12) {worst:.2f}, seed runs reaching {reached}")
    r0, r6 = totals["R0"], totals["R6"]
    adopt = r6[0] <= r0[0] and r6[2] <= r0[2] and r6[3] >= r0[3]
    print("decision:", "adopt R6" if adopt else "keep R0", f"(a) {r6[0]} <= {r0[0]}, (b) {r6[2]:.2f} <= {r0[2]:.2f},"
          f" (c) {r6[3]} >= {r0[3]}")


if __name__ == "__main__":
    main()
