"""Does a schedule through ``result.lr_range`` beat a constant LR at ``result.suggestion``?  (issue #15, part 3)

``find_chaos_lr`` returns ``lr_range = (low, high)``: the smallest and the largest swept η that learn well (the
end-of-window loss ratio within 1.25× of the sweep's best; ``lightning_chaos.functional.onset.learning_band``), meant
for ``OneCycleLR(max_lr=high)`` and ``CyclicLR(base_lr=low, max_lr=high)``. ``suggestion`` is ``high / margin``
(1.5, or 2.5 under adaptive optimizers). This benchmark measures whether the schedules do better than the constant.

Protocol (fixed before any result was looked at)
------------------------------------------------
* Tasks (benchmarks/tasks.py): ``digits_mlp``, ``mnist_mlp``, ``digits_relu``, ``digits_mom`` (SGD; ``digits_mom``
  with momentum 0.9) and ``digits_adam``, ``mnist_adam`` (Adam); seeds 0–9. Seed s fixes the initialisation and the
  shuffling: ``seed_everything(s)`` before the data module and the model are built (as bench_finder.py does), and
  the same for every training of that seed, so all schedules of a seed start from the same weights and see the same
  batches.
* Per task and seed: one ``find_chaos_lr`` with the finder's defaults on the seed's fresh model (recorded: the
  suggestion, ``lr_range``, ``trainability_edge``, the sweep, its wall time and ``model_steps``). Then trainings of
  N optimizer steps from the same seed, N = 300 for every task (and, in a second invocation with ``--steps 1000``,
  N = 1000 when time allows; the finder results are reused from the JSON, ``--resume``). The run recorded in
  benchmarks/results/lr_range_cpu.json.gz has N = 1000 for seeds 0–4 only and without the two diagnostics (the time
  budget of a shared 2-core machine, fixed before the N = 300 results were read; run as seeds 0–2, then 3–4, since
  ``--resume`` skips what the file holds):

  - ``constant``: constant η = suggestion (the task's optimizer, no scheduler).
  - ``onecycle``: ``OneCycleLR(max_lr=high, total_steps=N)``, torch's defaults otherwise (pct_start 0.3, cosine,
    div_factor 25, final_div_factor 1e4, **cycle_momentum=True**), stepped every optimizer step.
  - ``cyclic``: ``CyclicLR(base_lr=low, max_lr=high, step_size_up=N // 4)``, triangular (two full cycles in N
    steps); SGD tasks with torch's defaults (**cycle_momentum=True**), Adam tasks with ``cycle_momentum=False``.
  - ``onecycle_flat`` and ``cyclic_flat``: the same with ``cycle_momentum=False``. Added because torch's default
    ``cycle_momentum=True`` *overwrites* the optimizer's momentum: on plain SGD (momentum 0: ``digits_mlp``,
    ``mnist_mlp``, ``digits_relu``) it switches on heavy-ball momentum 0.85–0.95 (one-cycle) or 0.8–0.9 (cyclic),
    about a 10× larger effective step than the η the range was measured at; on ``digits_mom`` it moves momentum
    around its 0.9; on Adam it cycles β1 in 0.85–0.95 (one-cycle). ``lr_range`` was measured at the task's own
    momentum, so the ``_flat`` variants are the like-for-like test of the range; the default variants are what a
    user who copies ``OneCycleLR(opt, max_lr=high, total_steps=N)`` gets. For Adam, ``cyclic`` already has
    ``cycle_momentum=False``, so ``cyclic_flat`` is the same run and is not repeated (it is aliased to ``cyclic``).
  - Diagnostics: ``const_high`` (constant η = high: is the top of the range itself trainable for N steps?) and
    ``const_low`` (constant η = low: is the bottom a sensible rate or a wasted one?).

  The schedules are installed by overriding the model instance's ``configure_optimizers``: it returns the optimizer
  the task's model builds (its class and settings) plus ``{"scheduler": ..., "interval": "step"}``.
  A seed whose ``lr_range`` (or suggestion) is None gets no schedule runs; the tables count such seeds.
* Metrics, on the task's validation set exactly as ``TimeToTarget`` computes it: the validation accuracy at the end of
  the N steps, and τ, the first step (checked every ``Task.eval_every`` = 5 steps) at which it reaches the task's
  target; "never" when not within N. The training does not stop at the target (``FullRunTimer``, a non-stopping
  ``TimeToTarget``); a non-finite training loss stops it (diverged: final accuracy = that of the model as it is, the
  run flagged).
* Output: every run to ``--json`` (gzip, default benchmarks/results/lr_range_cpu.json.gz), written after every seed.
  Tables per N: per task, the median over seeds of the final accuracy and τ per schedule (τ's median counts never as
  ∞), the median ``lr_range`` and suggestion, and for each schedule how many seeds it beat / tied / lost to the
  constant LR on final accuracy (W/T/L; tie = equal accuracy on the validation set, i.e. the same number of correct
  answers).

Second run, after the definition of ``low`` changed (lr_range_v2_cpu.json.gz)
--------------------------------------------------------------------------
The first run found ``low`` (then the bottom of the learning band) degenerate: low = high on 12 of 60 seeds, low
above the suggestion on 21. The package then made ``low = min(band bottom, high / margin)``: the cycle always passes
through the suggestion; ``high`` and the suggestion are unchanged. The second run re-measures only what depends on
``low``, with the same protocol, tasks, seeds and N: ``cyclic_flat`` and ``cyclic`` against ``constant`` at N = 300
(seeds 0–9) and N = 1000 (seeds 0–4), plus ``const_low`` at N = 300. The finder sweeps are re-run (the new
``lr_range`` comes from the package; ``constant`` is re-run too, for the pairing), into a separate file, and
``--compare`` checks them against the first run: the suggestion and ``high`` of every seed must be equal, and every run
whose η schedule did not change (``constant``; the low-using runs of the seeds whose ``low`` did not change) should
reproduce exactly. The tables show only the schedules a file has runs of.

Usage
-----
    python benchmarks/bench_lr_range.py                              # N = 300, six tasks × 10 seeds (~15-20 min)
    python benchmarks/bench_lr_range.py --steps 1000 --resume        # add N = 1000, reusing the saved finder runs
    python benchmarks/bench_lr_range.py --steps 1000 --resume --seeds 5 --schedules constant onecycle cyclic \
        onecycle_flat cyclic_flat                                     # as recorded: seeds 0-4, no diagnostics
    python benchmarks/bench_lr_range.py --from-json benchmarks/results/lr_range_cpu.json.gz   # tables again

    # the second run (low = min(band bottom, suggestion)), as recorded in benchmarks/results/lr_range_v2_cpu.json.gz:
    V2=benchmarks/results/lr_range_v2_cpu.json.gz
    python benchmarks/bench_lr_range.py --json $V2 --schedules constant cyclic cyclic_flat const_low   # N = 300
    python benchmarks/bench_lr_range.py --json $V2 --resume --steps 1000 --seeds 5 \
        --schedules constant cyclic cyclic_flat                                  # N = 1000, seeds 0-4, reusing finders
    python benchmarks/bench_lr_range.py --from-json $V2 --compare benchmarks/results/lr_range_cpu.json.gz

Torch runs with one intra-op thread (``--threads``), one process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, OneCycleLR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_finder import NEVER, TimeToTarget, _trainer, default_finder, load_run, run_meta, save_json

from lightning_chaos.finder import ADAPTIVE_OPTIMIZERS

DEFAULT_TASKS = ("digits_mlp", "mnist_mlp", "digits_relu", "digits_mom", "digits_adam", "mnist_adam")
SCHEDULES = ("constant", "onecycle", "cyclic", "onecycle_flat", "cyclic_flat", "const_high", "const_low")
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lr_range_cpu.json.gz")


def tasks() -> dict:
    """benchmarks/tasks.py's TASKS, imported when needed (another helper owns that file)."""
    from tasks import TASKS

    return TASKS


class FullRunTimer(TimeToTarget):
    """``TimeToTarget`` that records τ (the first checked step at the target) but trains on to the end of the run;
    it still stops on a non-finite training loss or validation score. It also records the optimizer's η and momentum
    (β1 for Adam) at every check, to show what the scheduler did."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, stop_at_target=False)
        self.schedule: list[tuple[int, float, float]] = []  # (step, η, momentum or β1) at every check

    def on_check(self, trainer: Trainer, step: int) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.schedule.append((step, group["lr"], group["betas"][0] if "betas" in group else group.get("momentum", 0.0)))


def is_adaptive(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, ADAPTIVE_OPTIMIZERS)


def make_scheduler(schedule: str, optimizer: Optimizer, low: float, high: float, steps: int) -> LRScheduler | None:
    """The protocol's scheduler for ``schedule`` on ``optimizer`` (None for the constant ones)."""
    if schedule in ("onecycle", "onecycle_flat"):
        return OneCycleLR(optimizer, max_lr=high, total_steps=steps, cycle_momentum=schedule == "onecycle")
    if schedule in ("cyclic", "cyclic_flat"):
        cycle_momentum = schedule == "cyclic" and not is_adaptive(optimizer)
        return CyclicLR(optimizer, base_lr=low, max_lr=high, step_size_up=steps // 4, mode="triangular",
                        cycle_momentum=cycle_momentum)
    return None


def schedule_lr(schedule: str, finder: dict) -> float | None:
    """The η the model is built with (the constant, or the scheduler's starting point, which it overwrites)."""
    lr_range = finder["lr_range"]
    if schedule == "constant":
        return finder["suggestion"]
    if lr_range is None:
        return None
    return lr_range[0] if schedule in ("cyclic", "cyclic_flat", "const_low") else lr_range[1]


def train(task: Any, seed: int, schedule: str, finder: dict, steps: int, root: str) -> dict:
    """Train ``task`` from seed ``seed`` for ``steps`` optimizer steps under ``schedule``; final score, τ, curve."""
    lr = schedule_lr(schedule, finder)
    if lr is None:
        return {"skipped": "no lr_range" if schedule != "constant" else "no suggestion"}
    low, high = finder["lr_range"] if finder["lr_range"] is not None else (lr, lr)
    seed_everything(seed, verbose=False)
    dm = task.make_datamodule()
    dm.setup("fit")
    x_val, y_val = dm.val_set.tensors
    model = task.make_model(lr)
    build_optimizer: Callable[[], Any] = model.configure_optimizers  # the task's optimizer, as its model builds it
    optimizer_names: list[str] = []

    def configure_optimizers() -> Any:
        optimizer = build_optimizer()
        optimizer_names.append(type(optimizer).__name__)
        scheduler = make_scheduler(schedule, optimizer, low, high, steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    timer = FullRunTimer(x_val, y_val, task.target, task.eval_every, task.metric)
    started = time.perf_counter()
    trainer = _trainer(steps, [timer], root)
    trainer.fit(model, datamodule=dm)
    final = timer.accuracy(model)
    return {
        "lr": lr,
        "optimizer": optimizer_names[0] if optimizer_names else None,
        "final": final,
        "final_step": trainer.global_step,
        "tau": timer.tau if timer.tau is not None else NEVER,
        "diverged": timer.diverged,
        "curve": timer.curve,
        "schedule": timer.schedule,
        "seconds": time.perf_counter() - started,
    }


def run_finder(task: Any, seed: int, root: str) -> dict:
    """``find_chaos_lr`` with its defaults on seed ``seed``'s fresh model (as bench_finder.py's ``run_finders``)."""
    result, seconds = default_finder(task, seed, root)
    return {
        "suggestion": result.suggestion,
        "lr_range": list(result.lr_range) if result.lr_range is not None else None,
        "trainability_edge": result.trainability_edge,
        "onset": result.onset,
        "margin": result.margin,
        "anchor": result.anchor,
        "reason": result.reason,
        "seconds": seconds,
        "model_steps": result.model_steps,
        "steps_per_lr": result.steps_per_lr,
        "lrs": result.lrs.tolist(),
        "loss_ratio": result.loss_ratio.tolist(),
        "learning": result.learning.tolist(),
    }


def schedules_for(task: Any) -> list[str]:
    """The schedules to run on ``task``: all, except ``cyclic_flat`` under Adam (the same run as ``cyclic``)."""
    adaptive = is_adaptive(task.make_model(task.default_lr).configure_optimizers())
    return [s for s in SCHEDULES if not (adaptive and s == "cyclic_flat")]


def run_for(runs: dict, schedule: str) -> dict | None:
    """A seed's run of ``schedule`` at one N (``cyclic_flat`` falls back to ``cyclic``, its alias under Adam)."""
    if schedule in runs:
        return runs[schedule]
    if schedule == "cyclic_flat":
        return runs.get("cyclic")
    return None


# -- tables ---------------------------------------------------------------------------------------------------------


def fmt_tau(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:g}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_wtl(diffs: list[float], bold: bool = False) -> str:
    """``wins/ties/losses (median paired difference in points)`` of a schedule against the constant LR."""
    if not diffs:
        return "—"
    wins, ties = sum(d > 1e-12 for d in diffs), sum(abs(d) <= 1e-12 for d in diffs)
    text = f"{wins}/{ties}/{len(diffs) - wins - ties}"
    return (f"**{text}**" if bold else text) + f" ({100 * median(diffs):+.1f})"


def tables(results: dict) -> str:
    """Markdown tables per N: medians over seeds per schedule, the median range and suggestion, W/T/L vs constant."""
    out: list[str] = []
    all_steps = sorted({int(n) for data in results["tasks"].values() for s in data["seeds"].values()
                        for n in s.get("runs", {})})
    for steps in all_steps:
        key = str(steps)
        # the columns: the schedules this N has runs of (all of them in lr_range_cpu.json.gz; v2 ran a subset)
        cols = [s for s in SCHEDULES if s == "constant" or any(
            run_for(v["runs"][key], s) is not None for data in results["tasks"].values()
            for v in data["seeds"].values() if key in v.get("runs", {}))]
        acc_lines = ["| task | seeds (with range) | median low | median suggestion | median high | high/low | "
                     + " | ".join(cols) + " |", "|---|---|---|---|---|---|" + "---:|" * len(cols)]
        tau_lines = ["| task | target | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        wtl_lines = ["| task | " + " | ".join(cols[1:]) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        div_lines: list[str] = []
        shape_lines = [
            "| task | seeds | lr_range None | low = high | suggestion < low | margin | finder s | model_steps |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        totals: dict[str, list[float]] = {s: [] for s in cols[1:]}  # every seed's paired difference
        for name, data in results["tasks"].items():
            task = tasks()[name]
            seeds = {int(s): v for s, v in data["seeds"].items() if key in v.get("runs", {})}
            if not seeds:
                continue
            finders = [v["finder"] for v in seeds.values()]
            ranges = [f["lr_range"] for f in finders if f["lr_range"] is not None]
            sugg = [f["suggestion"] for f in finders if f["suggestion"] is not None]
            lows, highs = [r[0] for r in ranges], [r[1] for r in ranges]
            ratio = median([r[1] / r[0] for r in ranges])
            acc_cells, tau_cells, wtl_cells = [], [], []
            for schedule in cols:
                runs = [run_for(v["runs"][key], schedule) for v in seeds.values()]
                done = [r for r in runs if r is not None and "skipped" not in r]
                diverged = sum(r["diverged"] for r in done)
                if diverged:
                    div_lines.append(f"{name} N={steps} {schedule}: {diverged} of {len(done)} seeds diverged")
                acc = median([r["final"] for r in done])
                acc_cells.append("—" if math.isnan(acc) else f"{acc:.1%}" + ("" if len(done) == len(seeds)
                                                                             else f" ({len(done)})"))
                # τ: a seed without the run (no range) counts as never for that schedule.
                taus = [r["tau"] if r is not None and "skipped" not in r else NEVER for r in runs]
                tau_cells.append(fmt_tau(median(taus)) if done else "—")
                if schedule == "constant":
                    continue
                w = t = lo = 0
                diffs: list[float] = []
                for v in seeds.values():
                    mine, const = run_for(v["runs"][key], schedule), v["runs"][key].get("constant")
                    if mine is None or const is None or "skipped" in mine or "skipped" in const:
                        continue
                    diff = mine["final"] - const["final"]  # same validation set: equal = same number correct
                    diffs.append(diff)
                    if abs(diff) < 1e-12:
                        t += 1
                    elif diff > 0:
                        w += 1
                    else:
                        lo += 1
                totals[schedule] += diffs
                wtl_cells.append(fmt_wtl(diffs))
            acc_lines.append(
                f"| {name} | {len(seeds)} ({len(ranges)}) | {median(lows):.3g} | {median(sugg):.3g} |"
                f" {median(highs):.3g} | {ratio:.3g} | " + " | ".join(acc_cells) + " |")
            tau_lines.append(f"| {name} | {task.target:.0%} | " + " | ".join(tau_cells) + " |")
            wtl_lines.append(f"| {name} | " + " | ".join(wtl_cells) + " |")
            below = sum(f["suggestion"] is not None and f["lr_range"] is not None and f["suggestion"] < f["lr_range"][0]
                        for f in finders)
            shape_lines.append(
                f"| {name} | {len(seeds)} | {len(finders) - len(ranges)} | {sum(r[0] == r[1] for r in ranges)} |"
                f" {below} | {median([f['margin'] for f in finders]):g} |"
                f" {median([f['seconds'] for f in finders]):.1f} | {median([f['model_steps'] for f in finders]):.0f} |")
        wtl_lines.append("| **all** | " + " | ".join(fmt_wtl(d, bold=True) for d in totals.values()) + " |")
        out += [f"### N = {steps} steps", "",
                "Final validation accuracy, median over seeds (a count in parentheses: seeds with that run):", "",
                *acc_lines, "", "τ (steps to the target, checked every 5; median over seeds, no run = never):", "",
                *tau_lines, "", ("Seeds where the schedule's final accuracy beat / tied / lost to the constant LR (in"
                                 " parentheses: the median over seeds of the paired difference, in accuracy points):"),
                "",
                *wtl_lines, "",
                ("The range itself: seeds without one, degenerate (low = high), with the suggestion below low; the"
                 " margin; the finder's median seconds (this machine) and model_steps:"), "",
                *shape_lines, ""]
        if div_lines:
            out += ["Diverged runs (non-finite loss; final accuracy of the model as it was):", "",
                    *[f"* {line}" for line in div_lines], ""]
    return "\n".join(out)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test p-value of ``wins`` against ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return math.nan
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(results: dict, reference: dict) -> str:
    """Check ``results`` against an earlier file (v2 against lr_range_cpu.json.gz): per seed, the suggestion and
    ``high`` must be equal (the sweep is the same); which ``low`` changed; whether the runs whose η schedule did not
    change reproduce exactly (final accuracy and τ); W/T/L against the constant on the seeds whose ``low`` changed,
    before and after; the pooled sign tests of ``results``."""
    out: list[str] = []
    mismatched, changed, total, low_is_sugg = [], [], 0, 0
    same = differ = 0
    differing: list[str] = []
    before: dict[tuple[str, str], list[float]] = {}
    after: dict[tuple[str, str], list[float]] = {}
    pooled: dict[tuple[str, str], list[float]] = {}
    for name, data in results["tasks"].items():
        for seed, entry in data["seeds"].items():
            f = entry["finder"]
            ref = reference["tasks"].get(name, {}).get("seeds", {}).get(seed)
            total += 1
            low_is_sugg += f["lr_range"] is not None and f["lr_range"][0] == f["suggestion"]
            for key, runs in entry.get("runs", {}).items():
                for schedule in SCHEDULES[1:]:  # cyclic_flat falls back to cyclic (Adam), as in the tables
                    mine, const = run_for(runs, schedule), runs.get("constant")
                    if mine and const and "skipped" not in mine and "skipped" not in const:
                        pooled.setdefault((key, schedule), []).append(mine["final"] - const["final"])
            if ref is None:
                mismatched.append(f"{name} seed {seed}: not in the reference")
                continue
            g = ref["finder"]
            high = None if f["lr_range"] is None else f["lr_range"][1]
            ref_high = None if g["lr_range"] is None else g["lr_range"][1]
            if f["suggestion"] != g["suggestion"] or high != ref_high:
                mismatched.append(f"{name} seed {seed}: suggestion {f['suggestion']} vs {g['suggestion']},"
                                  f" high {high} vs {ref_high}")
            low_changed = (f["lr_range"] or [None])[0] != (g["lr_range"] or [None])[0]
            if low_changed:
                changed.append(f"{name} seed {seed}: low {g['lr_range'][0]:.4g} -> {f['lr_range'][0]:.4g}")
            for key, runs in entry.get("runs", {}).items():
                ref_runs = ref.get("runs", {}).get(key, {})
                for schedule in SCHEDULES:
                    run, old = run_for(runs, schedule), run_for(ref_runs, schedule)
                    if run is None or old is None or "skipped" in run or "skipped" in old:
                        continue
                    uses_low = schedule in ("cyclic", "cyclic_flat", "const_low")
                    aliased = schedule == "cyclic_flat" and "cyclic_flat" not in runs  # Adam: the cyclic run
                    if uses_low and low_changed:
                        const, ref_const = runs.get("constant"), ref_runs.get("constant")
                        if const and ref_const:
                            after.setdefault((key, schedule), []).append(run["final"] - const["final"])
                            before.setdefault((key, schedule), []).append(old["final"] - ref_const["final"])
                        continue
                    if aliased:
                        continue
                    if run["final"] == old["final"] and run["tau"] == old["tau"]:
                        same += 1
                    else:
                        differ += 1
                        differing.append(f"{name} seed {seed} N={key} {schedule}: final {old['final']:.4f} ->"
                                         f" {run['final']:.4f}, tau {old['tau']} -> {run['tau']}")
    out.append(f"Finder: {total} seeds; suggestion or high differing from the reference on {len(mismatched)}"
               + (":" if mismatched else "."))
    out += [f"  * {m}" for m in mismatched]
    out.append(f"low changed on {len(changed)} of {total} seeds; low == suggestion (exactly) on {low_is_sugg}.")
    out += [f"  * {c}" for c in changed]
    out.append(f"Runs whose η schedule is unchanged (constant, and low-using runs of seeds whose low did not change):"
               f" {same} reproduce the reference exactly, {differ} differ" + (":" if differing else "."))
    out += [f"  * {d}" for d in differing]
    out.append("On the seeds whose low changed, W/T/L vs constant (median paired difference), reference -> this run:")
    for k in sorted(after, key=lambda k: (int(k[0]), SCHEDULES.index(k[1]))):
        out.append(f"  * N={k[0]} {k[1]}: {fmt_wtl(before[k])} -> {fmt_wtl(after[k])} ({len(after[k])} seeds)")
    out.append("Pooled sign tests of this run (ties dropped):")
    for k in sorted(pooled, key=lambda k: (int(k[0]), SCHEDULES.index(k[1]))):
        d = pooled[k]
        wins, losses = sum(x > 1e-12 for x in d), sum(x < -1e-12 for x in d)
        out.append(f"  * N={k[0]} {k[1]}: {wins}/{losses}, p = {sign_test(wins, losses):.2g}")
    return "\n".join(out)


# -- running --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = load_run(args.json) if args.resume and os.path.exists(args.json) else {"tasks": {}}
    results.setdefault("meta", []).append(run_meta(args))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            task = tasks()[name]
            data = results["tasks"].setdefault(name, {"seeds": {}})
            schedules = [s for s in schedules_for(task) if s in args.schedules]
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                entry = data["seeds"].setdefault(str(seed), {})
                quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
                with quiet[0], quiet[1]:
                    if "finder" not in entry:
                        entry["finder"] = run_finder(task, seed, root)
                    for steps in args.steps:
                        runs = entry.setdefault("runs", {}).setdefault(str(steps), {})
                        for schedule in schedules:
                            if schedule not in runs:
                                runs[schedule] = train(task, seed, schedule, entry["finder"], steps, root)
                f = entry["finder"]
                rng = "None" if f["lr_range"] is None else f"{f['lr_range'][0]:.3g}..{f['lr_range'][1]:.3g}"
                secs = sum(r.get("seconds", 0.0) for n in args.steps for r in entry["runs"][str(n)].values())
                print(f"[{name}] seed {seed}: suggestion {f['suggestion']} range {rng} (finder {f['seconds']:.1f} s,"
                      f" trainings {secs:.1f} s)", flush=True)
                save_json(args.json, results)
    results["meta"][-1]["seconds"] = time.perf_counter() - started
    save_json(args.json, results)
    print(f"Total {results['meta'][-1]['seconds']:.0f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[300], help="N, the training length(s)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES,
                        help="run only these (the tables show — for the others)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=DEFAULT_JSON, help="every run, written after every seed (gzip if .gz)")
    parser.add_argument("--resume", action="store_true", help="start from --json: reuse its finder runs and runs")
    parser.add_argument("--from-json", default="", help="only print the tables of a saved --json file")
    parser.add_argument("--compare", default="", help="also check the results against this earlier --json file"
                        " (same suggestion and high per seed; unchanged runs reproduce; W/T/L where low changed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_chaos", *logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.from_json:
        print(tables(load_run(args.from_json)))
        if args.compare:
            print(compare(load_run(args.from_json), load_run(args.compare)))
        return
    unknown = [name for name in args.tasks if name not in tasks()]
    if unknown:
        parser.error(f"unknown tasks {unknown}")
    results = run(args)
    print()
    print(tables(results))
    if args.compare:
        print(compare(results, load_run(args.compare)))


if __name__ == "__main__":
    main()
