"""Offline replay for issue #15: which rule over the finder's loss curves suggests an η that reaches the target about
as fast as the best grid η, on tasks where that happens in a handful of steps as well as on the tasks of record?

Each candidate rule reads only what one finder sweep saw (``lrs``, ``losses`` [η, step]: the reference run's training
loss per optimizer step, NaN after a diverged run stopped; ``learning``; for R0 ``loss_ratio``) and returns the top
of a band of η; the suggestion is that top / m for m in ``MARGINS``. τ at the suggestion, per seed, is the measured τ
where the benchmark ran that η for that seed (the default rule's edge/m for m = 1 … 3 on the design set), else
interpolated log-linearly between the two grid η around it ("~" in the tables: an estimate, not a measurement); a
neighbour that never reached the target makes it never. The cell is the median over seeds of τ(suggestion) divided by
the best grid η's median τ (the oracle, over the same seeds). The target: ≤ 1.25, or at most 3 steps more than the
best τ where that is below 12 steps; "✗" marks a cell that misses it.

Rules (``RULES``):

* R0  the current default: top of the end-of-window band (loss ratio within 1.25× of the best) — the finder's own
      ``trainability_edge_suggestion``, so it must reproduce the saved suggestions (checked and printed).
* R1  speed band: area = mean over the window of loss_t / loss_0 (a diverged or non-learning η is out); band = η with
      area ≤ 1.25 × the best area; top of that band.
* R2  min(R0's top, R1's top).
* R3  steps to a level: level = loss_0 − ½ (loss_0 − best end-of-window loss over η); per η the first step where the
      5-step running mean of the loss falls below it; band = η with steps ≤ 1.25 × the fewest + 1; top of band.
* R4  the fastest η by area (argmin of R1's area), no band: the band's top is where many η tie, biased upwards.
* R5  R3 with the level 90 % of the way down (a level that only the fast η reach early).
* R6  min(R0's top, R5's top).

Data: ``results/speed_design_cpu.json.gz`` (design set: sweeps and oracle grids, ``bench_finder.py``), and
``results/speed_record_sweeps_cpu.json.gz`` and ``…_fashion_cnn_cpu.json.gz`` (the tasks of record: sweeps only,
``bench_finder.py --sweeps-only``)
replayed against the oracle grids of ``RECORD_GRID_FILES`` (same seeds, 0–9).

    python benchmarks/analyze_speed_rule.py                  # both sets
    python benchmarks/analyze_speed_rule.py --design-only
    python benchmarks/analyze_speed_rule.py --measure "R6 min(R0,R5)" --measure-margins 1.5 2 --measure-tasks ...
        # first run τ at that rule's suggestions (m = 1.5 under SGD, 2 under adaptive optimizers) where no run of
        # that η exists, saved to results/speed_measured_cpu.json.gz and used instead of interpolating (never on
        # held-out tasks: only the loaded design and record tasks can be measured)
"""

import argparse
import math
import os
import statistics
import sys
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_finder import _key, anchored_sweep, default_margin, load_run, measure_tau, save_json  # noqa: E402
from tasks import TASKS  # noqa: E402

from lightning_chaos.functional.onset import learns_well_threshold, trainability_edge_suggestion  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DESIGN_FILE = "speed_design_cpu.json.gz"
RECORD_SWEEPS_FILES = (
    "speed_record_sweeps_cpu.json.gz",  # 18 tasks, seeds 0-9
    "speed_record_sweeps_fashion_cnn_cpu.json.gz",  # fashion_cnn, fashion_cnn_adam: seeds 0-4
    "speed_record_sweeps_fashion_cnn_b_cpu.json.gz",  # and seeds 5-9
)
RECORD_GRID_FILES = (  # where each task of record's oracle grid (1e-4 … 10, seeds 0-9) was measured
    "finder_run4_cpu.json.gz", "finder_run4_fashion_cnn_cpu.json.gz", "finder_heldout4a_cpu.json.gz",
    "finder_heldout4b_cpu.json.gz", "finder_heldout4_fashion_cnn_adam_h100.json.gz",
)
MEASURED_FILE = "speed_measured_cpu.json.gz"  # ``--measure``: τ run at rules' suggestions, {task: {"lr|seed": run}}
MARGINS = (1.0, 1.5, 2.0, 2.5, 3.0)
TOLERANCE = 1.25  # the band's width, as in the default rule
NEVER = math.inf

Sweep = dict  # one saved finder result: "lrs", "losses", "learning", "loss_ratio", "suggestion", ...


# -- the rules: a sweep -> the top of its band (None: nothing learns) --------------------------------------------------

def _usable(sweep: Sweep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lrs, losses [η, step], mask of η that learned and whose loss stayed finite over the whole window)."""
    lrs = np.asarray(sweep["lrs"], dtype=float)
    losses = np.asarray(sweep["losses"], dtype=float)
    ok = np.asarray(sweep["learning"], dtype=bool) & np.isfinite(losses).all(1)
    return lrs, losses, ok


def _band_top(lrs: np.ndarray, score: np.ndarray, ok: np.ndarray, within: Callable[[float], float]) -> Optional[float]:
    """The largest η with ``ok`` and ``score`` ≤ ``within(best score)`` (lower score = better)."""
    if not ok.any():
        return None
    bound = within(float(score[ok].min()))
    return float(lrs[ok & (score <= bound)].max())


def r0_end_band(sweep: Sweep) -> Optional[float]:
    """R0: the finder's own trainability edge (top of the end-of-window loss-ratio band)."""
    _, edge, _ = trainability_edge_suggestion(sweep["lrs"], sweep["loss_ratio"], sweep["learning"], margin=1.0)
    return edge


def area(sweep: Sweep) -> np.ndarray:
    """Mean over the window of loss_t / loss_0 per η (NaN where the run stopped)."""
    _, losses, _ = _usable(sweep)
    return (losses / losses[:, :1]).mean(1)


def r1_speed_band(sweep: Sweep) -> Optional[float]:
    lrs, _, ok = _usable(sweep)
    return _band_top(lrs, area(sweep), ok, lambda best: learns_well_threshold(best, TOLERANCE))


def r2_min(sweep: Sweep) -> Optional[float]:
    tops = [top for top in (r0_end_band(sweep), r1_speed_band(sweep)) if top is not None]
    return min(tops) if tops else None


def steps_to_level(sweep: Sweep, fraction: float) -> np.ndarray:
    """Per η, the first step where the 5-step running mean of the loss is below loss_0 − fraction · (loss_0 − the
    best end-of-window loss over the learning η); inf if never (or the η is out)."""
    _, losses, ok = _usable(sweep)
    steps = np.full(len(losses), np.inf)
    if not ok.any():
        return steps
    quarter = max(1, losses.shape[1] // 4)
    loss0 = float(np.median(losses[ok, 0]))  # the same initial loss for every η (same parameters, same batch)
    best_end = float(losses[ok, -quarter:].mean(1).min())
    level = loss0 - fraction * (loss0 - best_end)
    kernel = np.ones(5) / 5
    for i in np.flatnonzero(ok):
        running = np.convolve(losses[i], kernel, mode="valid")  # running[j]: mean of steps j … j + 4
        below = np.flatnonzero(running < level)
        if below.size:
            steps[i] = below[0] + 4  # the step at which that running mean is first known
    return steps


def _level_rule(fraction: float) -> Callable[[Sweep], Optional[float]]:
    def rule(sweep: Sweep) -> Optional[float]:
        lrs, _, ok = _usable(sweep)
        steps = steps_to_level(sweep, fraction)
        return _band_top(lrs, steps, ok & np.isfinite(steps), lambda fewest: TOLERANCE * fewest + 1)
    return rule


r3_level_half = _level_rule(0.5)
r5_level_90 = _level_rule(0.9)


def r4_fastest_area(sweep: Sweep) -> Optional[float]:
    lrs, _, ok = _usable(sweep)
    if not ok.any():
        return None
    scores = np.where(ok, area(sweep), np.inf)
    return float(lrs[int(np.argmin(scores))])


def r6_min_level90(sweep: Sweep) -> Optional[float]:
    tops = [top for top in (r0_end_band(sweep), r5_level_90(sweep)) if top is not None]
    return min(tops) if tops else None


RULES: dict[str, Callable[[Sweep], Optional[float]]] = {
    "R0 end band": r0_end_band,
    "R1 area band": r1_speed_band,
    "R2 min(R0,R1)": r2_min,
    "R3 steps to ½": r3_level_half,
    "R4 argmin area": r4_fastest_area,
    "R5 steps to 90%": r5_level_90,
    "R6 min(R0,R5)": r6_min_level90,
}


# -- τ at an η: measured where the benchmark ran it, else interpolated between grid points -----------------------------

def _measured(runs: dict, lr: float, seed: int) -> Optional[float]:
    for key, run in runs.items():
        value, run_seed = key.split("|")
        if int(run_seed) == seed and abs(float(value) - lr) <= 1e-4 * lr:
            return run["tau"]
    return None


def tau_at(task: dict, lr: float, seed: int) -> tuple[float, bool]:
    """(τ of ``seed`` at ``lr``, whether it was interpolated)."""
    measured = _measured(task["runs"], lr, seed)
    if measured is not None:
        return measured, False
    grid = task["grid"]
    below = [g for g in grid if g <= lr]
    above = [g for g in grid if g >= lr]
    if not below or not above:
        return NEVER, True
    low, high = max(below), min(above)
    a, b = _measured(task["runs"], low, seed), _measured(task["runs"], high, seed)
    if a is None or b is None:
        raise KeyError((lr, seed))
    if math.isinf(a) or math.isinf(b):
        return NEVER, True
    w = (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))
    return a * (1 - w) + b * w, True


def best_grid(task: dict, seeds: list[int]) -> tuple[float, float]:
    """(best grid η, its median τ over ``seeds``)."""
    medians = {lr: statistics.median(_measured(task["runs"], lr, s) for s in seeds) for lr in task["grid"]}
    lr = min(medians, key=lambda g: (medians[g], g))
    return lr, medians[lr]


def meets_target(tau: float, best: float) -> bool:
    return tau <= TOLERANCE * best or (best < 12 and tau <= best + 3)


# -- the tables -------------------------------------------------------------------------------------------------------

def evaluate(task: dict, finders: list[dict], rule: Callable[[Sweep], Optional[float]], margin: float):
    """(median τ, best τ, any τ interpolated, seeds whose band top was max_lr, the per-seed τ)."""
    seeds = [f["seed"] for f in finders]
    _, best = best_grid(task, seeds)
    taus, interpolated, at_max, lrs = [], False, 0, []
    for finder in finders:
        sweep = finder["chaos"]
        top = rule(sweep)
        if top is None:
            taus.append(NEVER)
            continue
        at_max += top >= max(sweep["lrs"]) * (1 - 1e-9)
        tau, estimated = tau_at(task, top / margin, finder["seed"])
        taus.append(tau)
        lrs.append(top / margin)
        interpolated |= estimated
    return statistics.median(taus), best, interpolated, at_max, taus


def fmt_cell(tau: float, best: float, interpolated: bool) -> str:
    if math.isinf(tau):
        return "∞ ✗"
    text = f"{tau / best:.2f}" + ("~" if interpolated else "")
    if best < 12:
        extra = tau - best
        text += f" ({extra:+.0f})" if extra == round(extra) else f" ({extra:+.1f})"
    return text + ("" if meets_target(tau, best) else " ✗")


def table(tasks: dict[str, tuple[dict, list[dict]]], title: str, rows: bool = True) -> str:
    """Rows: task × rule; columns: margins (``rows``). Then the worst ratio and the misses per rule and margin."""
    lines = [f"### {title}", "", "| task | best grid η → τ | rule | " + " | ".join(f"m = {m:g}" for m in MARGINS)
             + " |", "|---|---|---|" + "---:|" * len(MARGINS)]
    worst = {(r, m): [0.0, 0, "", -math.inf] for r in RULES for m in MARGINS}  # ratio, misses, where, +steps
    reached = {(r, m): [0, 0] for r in RULES for m in MARGINS}  # seed runs whose suggestion reached the target
    for name, (task, finders) in tasks.items():
        best_lr, best = best_grid(task, [f["seed"] for f in finders])
        for rule_name, rule in RULES.items():
            cells = []
            for margin in MARGINS:
                tau, best, interpolated, at_max, taus = evaluate(task, finders, rule, margin)
                reached[(rule_name, margin)][0] += sum(not math.isinf(t) for t in taus)
                reached[(rule_name, margin)][1] += len(taus)
                cells.append(fmt_cell(tau, best, interpolated) + (f" [{at_max}⊤]" if at_max and margin == 1 else ""))
                slot = worst[(rule_name, margin)]
                if best < 12:  # judged in steps
                    slot[3] = max(slot[3], tau - best)
                elif tau / best > slot[0]:
                    slot[0], slot[2] = tau / best, name
                slot[1] += not meets_target(tau, best)
            if rows:
                lines.append(f"| {name} | {best_lr:.3g} → {best:g} | {rule_name} | " + " | ".join(cells) + " |")
    lines += ["", "Per rule and margin: misses of the target / tasks; the worst ratio over the tasks whose best τ is 12"
              " steps or more (and which); the most steps above the best over those below 12 (if any); seed runs"
              " whose suggestion reached the target.", "",
              "| rule | " + " | ".join(f"m = {m:g}" for m in MARGINS) + " |", "|---|" + "---|" * len(MARGINS)]
    for rule_name in RULES:
        cells = []
        for margin in MARGINS:
            ratio, misses, where, steps = worst[(rule_name, margin)]
            cell = f"**{misses}/{len(tasks)}**, {'∞' if math.isinf(ratio) else f'{ratio:.2f}'} ({where})"
            cell += "" if math.isinf(-steps) else f", {'∞' if math.isinf(steps) else f'+{steps:.2g}'}"
            cells.append(cell + ", {}/{}".format(*reached[(rule_name, margin)]))
        lines.append(f"| {rule_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_r0(tasks: dict[str, tuple[dict, list[dict]]]) -> str:
    """R0 against the suggestions the finder saved (same margin): every seed should agree."""
    agree, total, unmatched = 0, 0, []
    for name, (_, finders) in tasks.items():
        for finder in finders:
            sweep = finder["chaos"]
            margin = sweep.get("margin") or default_margin(TASKS[name])
            top = r0_end_band(sweep)
            replay = None if top is None or top >= max(sweep["lrs"]) else top / margin
            saved = sweep["suggestion"]
            total += 1
            if (replay is None and saved is None) or (
                replay is not None and saved is not None and abs(replay - saved) <= 1e-9 * saved
            ):
                agree += 1
            else:
                unmatched.append(f"{name} seed {finder['seed']}: saved {saved}, replayed {replay}")
    return f"R0 replay reproduces the saved suggestion on {agree} of {total} sweeps" + (
        ":\n" + "\n".join(unmatched) if unmatched else "."
    )


def split_by_optimizer(tasks: dict[str, tuple[dict, list[dict]]]) -> tuple[dict, dict]:
    """(adaptive-optimizer tasks, SGD tasks), by the finder's automatic margin (2.5 adaptive, 1.5 otherwise)."""
    adaptive = {n: v for n, v in tasks.items() if default_margin(TASKS[n]) > 1.5}
    return adaptive, {n: v for n, v in tasks.items() if n not in adaptive}


def load_measured() -> dict[str, dict]:
    path = os.path.join(RESULTS, MEASURED_FILE)
    return load_run(path) if os.path.exists(path) else {}


def load_design(path: str) -> dict[str, tuple[dict, list[dict]]]:
    saved = load_run(path)
    measured = load_measured()
    out = {}
    for name, task in saved["tasks"].items():
        task["runs"].update(measured.get(name, {}))
        finders = [f for f in task["finders"] if f["seed"] in task["seeds"]]
        finders = [f for f in finders if all(_measured(task["runs"], lr, f["seed"]) is not None for lr in task["grid"])]
        # (a run stopped part-way saves the seeds whose grid is complete; the others are left out)
        if finders:
            out[name] = (task, finders)
    return out


def load_record(sweeps_paths: list[str]) -> dict[str, tuple[dict, list[dict]]]:
    sweeps: dict[str, dict] = {}
    for path in sweeps_paths:  # a task's seeds may be split over several files: pooled
        for name, data in load_run(path)["tasks"].items():
            sweeps.setdefault(name, {"finders": []})["finders"] += data["finders"]
    measured = load_measured()
    grids: dict[str, dict] = {}
    for name in RECORD_GRID_FILES:
        for task_name, task in load_run(os.path.join(RESULTS, name))["tasks"].items():
            grids.setdefault(task_name, task)
    out = {}
    for name, data in sweeps.items():
        task = grids[name]
        finders = [f for f in data["finders"] if f["seed"] in task["seeds"]]
        if finders:
            old = {f["seed"]: anchored_sweep(f, "trainability_edge") for f in task["finders"]}
            runs = {**task["runs"], **measured.get(name, {})}
            out[name] = ({"grid": task["grid"], "runs": runs, "seeds": task["seeds"], "old_sweeps": old}, finders)
    return out


def check_old_edges(tasks: dict[str, tuple[dict, list[dict]]]) -> str:
    """Whether the re-run sweeps found the same top of the learning band as the sweeps saved with the oracle grids
    (the finder has changed since: a different edge means the replay judges today's finder, not the saved one)."""
    same, total, moved = 0, 0, []
    for name, (task, finders) in tasks.items():
        for finder in finders:
            old = task["old_sweeps"].get(finder["seed"])
            if old is None or old.get("trainability_edge") is None:
                continue
            total += 1
            new_edge, old_edge = finder["chaos"]["trainability_edge"], old["trainability_edge"]
            if new_edge is not None and abs(new_edge - old_edge) <= 1e-6 * old_edge:
                same += 1
            else:
                moved.append(f"{name}/{finder['seed']}: {old_edge:.3g} -> {new_edge}")
    return (f"Re-run sweeps vs the saved ones beside the oracle grids: the same band top on {same} of {total}"
            + (f" (moved: {', '.join(moved)})" if moved else "") + ".")


def report(tasks: dict[str, tuple[dict, list[dict]]], label: str) -> None:
    print(check_r0(tasks), "\n")
    adaptive, sgd = split_by_optimizer(tasks)
    for group, title in ((adaptive, "adaptive optimizers"), (sgd, "SGD")):
        if group:
            print(table(group, f"{label}: {title}"), "\n")
    print(table(tasks, f"{label}: all tasks, one margin for every optimizer (summary only)", rows=False), "\n")


def measure(tasks: dict[str, tuple[dict, list[dict]]], rule_name: str, margins: dict[str, float]) -> None:
    """Run τ at ``rule_name``'s suggestion (top / the task's margin from ``margins``, keyed "adaptive"/"sgd") for every
    seed where no run of that η exists yet; saved to ``MEASURED_FILE`` after each run."""
    import contextlib
    import io
    import logging
    import tempfile
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for logger in list(logging.root.manager.loggerDict):
        if logger.startswith("lightning"):
            logging.getLogger(logger).setLevel(logging.ERROR)
    measured = load_measured()
    path = os.path.join(RESULTS, MEASURED_FILE)
    with tempfile.TemporaryDirectory() as root:
        for name, (task, finders) in tasks.items():
            margin = margins["adaptive" if default_margin(TASKS[name]) > 1.5 else "sgd"]
            for finder in finders:
                top = RULES[rule_name](finder["chaos"])
                if top is None or _measured(task["runs"], top / margin, finder["seed"]) is not None:
                    continue
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    run = measure_tau(TASKS[name], top / margin, finder["seed"], root)
                task["runs"][_key(top / margin, finder["seed"])] = run
                measured.setdefault(name, {})[_key(top / margin, finder["seed"])] = run
                save_json(path, measured)
                print(f"[{name}] seed {finder['seed']}: {rule_name} top {top:.3g} / {margin:g} -> τ {run['tau']}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", default=os.path.join(RESULTS, DESIGN_FILE))
    parser.add_argument("--record", nargs="+", default=[os.path.join(RESULTS, f) for f in RECORD_SWEEPS_FILES],
                        help="sweeps-only files of the tasks of record (those that exist are read)")
    parser.add_argument("--design-only", action="store_true")
    parser.add_argument("--measure", default="", choices=["", *RULES],
                        help="run τ at this rule's suggestions (where not measured yet) before the tables")
    parser.add_argument("--measure-margins", type=float, nargs=2, default=[1.5, 2.0], metavar=("SGD", "ADAPTIVE"))
    parser.add_argument("--measure-tasks", nargs="*", default=None, help="only these tasks (default: all loaded)")
    args = parser.parse_args()
    print("Cells: median over seeds of τ(top/m) / τ(best grid η); ~ = some τ interpolated between grid points;"
          " (+k) = steps above the best where it is below 12; ✗ = misses ≤ 1.25× (or ≤ +3 steps below 12);"
          " [k⊤] = seeds whose band top was the sweep's max_lr (the finder returns no suggestion there).\n")
    design = load_design(args.design)
    record = [path for path in args.record if os.path.exists(path)]
    if args.measure:
        margins = {"sgd": args.measure_margins[0], "adaptive": args.measure_margins[1]}
        for group in (design, load_record(record) if record and not args.design_only else {}):
            wanted = {n: v for n, v in group.items() if args.measure_tasks is None or n in args.measure_tasks}
            measure(wanted, args.measure, margins)
        design = load_design(args.design)
    report(design, "Design set")
    if not args.design_only and record:
        tasks = load_record(record)
        print(check_old_edges(tasks))
        report(tasks, "Tasks of record")


if __name__ == "__main__":
    main()
