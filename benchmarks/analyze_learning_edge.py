"""Offline what-if on saved bench_finder.py results: τ of a "top of the learning band" rule instead of the onset.

The rule: among the swept η that learn, take the largest whose window loss ratio is within ``k`` times the best
ratio of the sweep, and divide it by ``margin``. τ at that η is interpolated (log-linear in η) between the measured
grid τ around it: an estimate, not a measurement. The rule is evaluated on all eight tasks at once, so nothing here
is held out: it is a lead for the next benchmark, not evidence for a default.

    python benchmarks/analyze_learning_edge.py            # the rule, before it was built (eight tasks)
    python benchmarks/analyze_learning_edge.py --margins  # the built anchor's margin over all 15 tasks

``--margins`` replays the trainability-anchored sweeps of all 15 tasks and gives τ at edge/m for several m: measured
where the benchmark ran that η, interpolated otherwise. It asks whether another margin than 1.5 would meet the
≤ 1.25 target everywhere (it would not).

``--record`` does the same over the table of record (runs 4 and 5, 20 seeds per task) for m = 1.5, 2, 2.5 and 3: where
a larger margin for adaptive optimizers was chosen before the fourth held-out set tested it. ``--files F ...`` does it
for any saved runs (the fourth held-out set: ``--files finder_heldout4a_cpu.json.gz finder_heldout4b_cpu.json.gz
finder_heldout4_fashion_cnn_adam_h100.json.gz``).
"""

import gzip
import json
import math
import os
import statistics
import sys
from typing import Optional

from bench_finder import anchored_sweep, load_run

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FILES = ("finder_run3_cpu.json.gz", "finder_heldout_cpu.json.gz")
TRAINABILITY_FILES = (  # every task's sweep with anchor="trainability" (set 3 and fashion_cnn swept both anchors)
    "finder_trainability_cpu.json.gz",
    "finder_heldout2_trainability_cpu.json.gz",
    "finder_fashion_cnn_trainability_cpu.json.gz",
    "finder_heldout3_cpu.json.gz",
)


def grid_tau(task: dict, lr: float, seed: int) -> float:
    """The measured τ of grid point ``lr`` for ``seed`` (run keys are ``"<lr>|<seed>"``)."""
    for key, run in task["runs"].items():
        value, run_seed = key.split("|")
        if int(run_seed) == seed and abs(float(value) - lr) / lr < 1e-4:
            return run["tau"]
    raise KeyError((lr, seed))


def interpolated_tau(task: dict, lr: float, seed: int) -> float:
    below = [g for g in task["grid"] if g <= lr * (1 + 1e-7)]
    above = [g for g in task["grid"] if g >= lr * (1 - 1e-7)]
    if not below or not above:
        return math.inf
    low, high = max(below), min(above)
    a, b = grid_tau(task, low, seed), grid_tau(task, high, seed)
    if low == high or math.isinf(a) or math.isinf(b):
        return a if low == high else max(a, b)
    w = (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))
    return a * (1 - w) + b * w


def learning_edge(sweep: dict, k: float, margin: float) -> Optional[float]:
    learned = [(lr, ratio) for lr, ratio, learns in zip(sweep["lrs"], sweep["loss_ratio"], sweep["learning"]) if learns]
    if not learned:
        return None
    best = min(ratio for _, ratio in learned)
    return max(lr for lr, ratio in learned if ratio <= best * k) / margin


def main() -> None:
    tasks: dict = {}
    for name in FILES:
        with gzip.open(os.path.join(RESULTS, name)) as fh:
            tasks.update(json.load(fh)["tasks"])
    for k in (1.25, 1.5, 2.0, 3.0):
        for margin in (1.0, 1.25, 1.5, 2.0):
            cells, worst = [], 0.0
            for name, task in tasks.items():
                best = min(statistics.median(grid_tau(task, g, s) for s in task["seeds"]) for g in task["grid"])
                taus = []
                for finder in task["finders"][: len(task["seeds"])]:
                    lr = learning_edge(finder["chaos"], k, margin)
                    taus.append(math.inf if lr is None else interpolated_tau(task, lr, finder["seed"]))
                ratio = statistics.median(taus) / best
                worst = max(worst, ratio)
                cells.append(f"{name} {ratio:.2f}")
            print(f"k={k} margin={margin}: worst {worst:.2f} | " + ", ".join(cells))


RECORD_FILES = (  # the table of record: runs 4 and 5, seeds 0-19 of every task
    "finder_run4_cpu.json.gz", "finder_run4_fashion_cnn_cpu.json.gz",
    "finder_run5a_cpu.json.gz", "finder_run5b_cpu.json.gz",
)


def pooled(files: tuple[str, ...]) -> dict:
    """The files' tasks, the seeds of a task that appears in several files pooled into one."""
    tasks: dict = {}
    for name in files:
        for task_name, task in load_run(name if os.path.exists(name) else os.path.join(RESULTS, name))["tasks"].items():
            into = tasks.setdefault(task_name, {"seeds": [], "grid": task["grid"], "finders": [], "runs": {}})
            into["seeds"] += task["seeds"]
            into["finders"] += task["finders"][: len(task["seeds"])]
            into["runs"].update(task["runs"])
    return tasks


def margins(candidates: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5, 2.0), files: tuple[str, ...] = ()) -> None:
    """τ ratio at edge/m per task and m, over every task measured with the trainability anchor (or in ``files``)."""
    ratios: dict[str, list[float]] = {}
    reached = {margin: [0, 0] for margin in candidates}  # seed runs that reached the target, of all
    for tasks in [pooled(files)] if files else [pooled((name,)) for name in TRAINABILITY_FILES]:
        for task_name, task in tasks.items():
            best = min(statistics.median(grid_tau(task, g, s) for s in task["seeds"]) for g in task["grid"])
            row = []
            for margin in candidates:
                taus = []
                for finder in task["finders"][: len(task["seeds"])]:
                    lr, seed = anchored_sweep(finder, "trainability_edge")["trainability_edge"] / margin, finder["seed"]
                    try:
                        taus.append(grid_tau(task, lr, seed))  # measured where the benchmark ran this η
                    except KeyError:
                        taus.append(interpolated_tau(task, lr, seed))
                row.append(statistics.median(taus) / best)
                reached[margin][0] += sum(not math.isinf(tau) for tau in taus)
                reached[margin][1] += len(taus)
            ratios[task_name] = row
            print(f"{task_name:16s} " + " ".join(f"m={m:g}: {r:5.2f}" for m, r in zip(candidates, row)))
    for index, margin in enumerate(candidates):
        column = [row[index] for row in ratios.values()]
        within = sum(r <= 1.25 for r in column)
        print(f"m={margin:g}: worst {max(column):.2f}, within 1.25x on {within} of {len(column)};"
              f" reached the target on {reached[margin][0]} of {reached[margin][1]} seed runs")


if __name__ == "__main__":
    if "--record" in sys.argv:
        margins((1.5, 2.0, 2.5, 3.0), RECORD_FILES)
    elif "--files" in sys.argv:  # saved bench_finder.py runs (paths, or names in results/), pooled by task
        margins((1.5, 2.0, 2.5, 3.0), tuple(sys.argv[sys.argv.index("--files") + 1 :]))
    elif "--margins" in sys.argv:
        margins()
    else:
        main()
