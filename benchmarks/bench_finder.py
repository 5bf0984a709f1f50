"""Does the edge-of-chaos learning rate pay off?  Time-to-accuracy τ(η) of ChaosLRFinder's suggestion against a dense
grid (the oracle), Lightning's ``lr_find`` suggestion and the task's default learning rate, on real offline tasks.

What is measured
----------------
* τ(η): optimizer steps (``trainer.global_step``) until the validation accuracy first reaches the task's target.
  A ``TimeToTarget`` callback evaluates the whole validation set every ``--eval-every`` steps (default 5) in
  ``on_train_batch_end`` and stops the fit at the target; "never" when the target is not reached within the task's
  step budget or the loss turns non-finite. Steps, not seconds: τ does not depend on CPU contention.
  Each τ is measured for ``--seeds`` training seeds (seed s fixes the initialisation and the shuffling); the table
  gives the median over seeds (never = ∞, so a median is "never" when most seeds never reach the target).
* The oracle: τ for every η of a geometric grid, ``--per-decade`` points per decade from ``--grid-min`` to
  ``--grid-max``; the best grid η is the one with the smallest median τ.
* Chaos suggestion: ``find_chaos_lr(trainer, model, datamodule=dm)`` with the finder's defaults, run once per seed on
  that seed's initial model; τ of seed s is measured at seed s's suggestion.
* lr_find suggestion: ``Tuner(trainer).lr_find(model, datamodule=dm).suggestion()`` with Lightning's defaults, per seed,
  likewise.
* Default: the task's default LR (the module's ``lr`` default, 0.1 for every task).
* Margin evidence: τ at onset/m and at (top of the learning band)/m for m in ``--margins`` (both read off each seed's
  sweep, whichever ``--anchor`` it ran with), and where the best grid η sits relative to η* (onset / η_best).
* Wall time: ``find_chaos_lr`` against ``lr_find`` on the same freshly built model and data module, the two calls
  interleaved in one process (the order alternates with the seed), each timed around the whole call (Trainer
  construction excluded, the call's own ``fit`` setup included). The ratio is formed per seed and the median over
  seeds and tasks is reported.

Usage
-----
    python benchmarks/bench_finder.py                                   # all tasks, 3 seeds (~20 min on 2 cores)
    python benchmarks/bench_finder.py --tasks digits_mlp --seeds 1      # quick look
    python benchmarks/bench_finder.py --tasks fashion_mlp fashion_cnn digits_relu   # the held-out tasks
    python benchmarks/bench_finder.py --json /tmp/finder.json           # raw results (every run) as JSON
    python benchmarks/bench_finder.py --timing-only --timing-reps 5     # wall times only: stacked, sequential, lr_find
    python benchmarks/bench_finder.py --timing-only --accelerator cuda  # the same on a GPU

Tasks are defined in benchmarks/tasks.py. Torch runs with one intra-op thread (``--threads``): a shared 2-core machine
gains nothing from a second thread on these models and loses a lot when the other core is busy.
"""

import argparse
import contextlib
import functools
import gzip
import inspect
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.tuner import Tuner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tasks import NOT_DEFAULT, TASKS, Task  # noqa: E402

import lightning_chaos  # noqa: E402
from lightning_chaos import ChaosLRFinder, find_chaos_lr  # noqa: E402
from lightning_chaos.finder import ADAPTIVE_MARGIN, MARGIN, auto_margin  # noqa: E402

NEVER = math.inf
DEFAULT_MARGIN = inspect.signature(ChaosLRFinder).parameters["margin"].default  # the README table's


@functools.lru_cache(maxsize=None)
def default_margin(task: Task) -> float:
    """The finder's default step back below the top of the learning band on ``task`` (``"auto"`` resolved by the
    task's optimizer, built once per task)."""
    if DEFAULT_MARGIN != "auto":
        return float(DEFAULT_MARGIN)
    return auto_margin(task.make_model(task.default_lr).configure_optimizers())


METRICS = ("accuracy", "r2", "loss")  # what τ can wait for (``Task.metric``)


def validation_score(metric: str, output: torch.Tensor, target: torch.Tensor) -> float:
    """The validation set's ``metric`` from the model's ``output``: accuracy of the argmax (classification), R² of a
    scalar output (regression with the mean squared error), or the mean cross-entropy of the logits (a language
    model's next-token loss)."""
    if metric == "accuracy":
        return (output.argmax(1) == target).double().mean().item()
    if metric == "r2":
        output, target = output.double().reshape(target.shape), target.double()
        return (1 - ((output - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()).item()
    if metric == "loss":
        return torch.nn.functional.cross_entropy(output.double(), target).item()
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")


def target_reached(metric: str, score: float, target: float) -> bool:
    """Whether ``score`` meets ``target``: at least it for accuracy and R², at most it for a loss."""
    return score <= target if metric == "loss" else score >= target


class TimeToTarget(Callback):
    """Evaluate the validation ``metric`` (``Task.metric``: accuracy by default) every ``every`` optimizer steps; stop
    at ``target`` (reached from above for ``"loss"``) or on a non-finite training loss."""

    def __init__(
        self, x_val: torch.Tensor, y_val: torch.Tensor, target: float, every: int, metric: str = "accuracy",
        stop_at_target: bool = True,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
        self.x_val, self.y_val, self.target, self.every, self.metric = x_val, y_val, target, every, metric
        self.stop_at_target = stop_at_target  # False: record τ (the first hit) and train on to the end of the run
        self.tau: Optional[int] = None
        self.diverged = False
        self.curve: list[tuple[int, float]] = []

    @torch.no_grad()
    def accuracy(self, pl_module: LightningModule) -> float:
        """The validation score of ``self.metric`` (accuracy unless the task says otherwise; the name is kept for
        subclasses that evaluate another model, such as an averaged one)."""
        was_training = pl_module.training
        pl_module.eval()
        output = pl_module(self.x_val.to(pl_module.device))
        pl_module.train(was_training)
        return validation_score(self.metric, output.cpu(), self.y_val)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            self.diverged = True
            trainer.should_stop = True
            return
        step = trainer.global_step
        if step % self.every:
            return
        self.on_check(trainer, step)
        score = self.accuracy(pl_module)
        self.curve.append((step, score))
        if math.isnan(score):
            self.diverged = True
            trainer.should_stop = True
        elif self.tau is None and target_reached(self.metric, score, self.target):
            self.tau = step
            if self.stop_at_target:
                trainer.should_stop = True

    def on_check(self, trainer: Trainer, step: int) -> None:
        """Called at every check, before the score (subclasses record more there)."""


ACCELERATOR = "cpu"  # --accelerator
ANCHOR = "trainability"  # --anchor (the finder's default)


def _trainer(max_steps: int, callbacks: list[Callback], root: str) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        accelerator=ACCELERATOR,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )


def fit_to_target(task: Task, model: LightningModule, dm: Any, timer: "TimeToTarget", lr: float, seed: int,
                  root: str) -> dict:
    """Fit ``model`` on ``dm`` with ``timer`` (a :class:`TimeToTarget`) within the task's budget: τ, the curve and
    the wall time of the run at ``lr`` from seed ``seed``."""
    started = time.perf_counter()
    _trainer(task.budget, [timer], root).fit(model, datamodule=dm)
    return {
        "lr": lr,
        "seed": seed,
        "tau": timer.tau if timer.tau is not None else NEVER,
        "diverged": timer.diverged,
        "curve": timer.curve,
        "seconds": time.perf_counter() - started,
    }


def measure_tau(task: Task, lr: float, seed: int, root: str) -> dict:
    """Train ``task`` at ``lr`` from seed ``seed`` until the target or the budget; return τ and the curve of the
    task's validation metric."""
    seed_everything(seed, verbose=False)
    dm = task.make_datamodule()
    dm.setup("fit")
    x_val, y_val = dm.val_set.tensors
    model = task.make_model(lr)
    timer = TimeToTarget(x_val, y_val, task.target, task.eval_every, task.metric)
    return {**fit_to_target(task, model, dm, timer, lr, seed, root), "inferred": False}


def default_finder(task: Task, seed: int, root: str) -> tuple[Any, float]:
    """``find_chaos_lr`` with its defaults on seed ``seed``'s fresh model and data: the result and its wall time."""
    seed_everything(seed, verbose=False)
    dm, model = task.make_datamodule(), task.make_model(task.default_lr)
    trainer = _trainer(task.budget, [], root)
    started = time.perf_counter()
    result = find_chaos_lr(trainer, model, datamodule=dm)
    return result, time.perf_counter() - started


def measure_suggestions(task: Task, data: dict, finder: dict, floor: float, margins: list[float], root: str) -> None:
    """τ at every η a finder run of seed ``finder["seed"]`` points to (its suggestion, lr_find's, the default LR, both
    anchors at every margin) that ``data["runs"]`` lacks; below ``floor`` taken as never without running."""
    seed = finder["seed"]
    wanted = [finder["chaos"]["suggestion"], finder["lrfind"]["suggestion"], task.default_lr]
    for anchor in ("onset", "trainability_edge"):  # both anchors' suggestions at every margin and at the default
        sweep = anchored_sweep(finder, anchor)
        if sweep is not None and sweep.get(anchor) is not None:
            default = default_margin(task) if anchor == "trainability_edge" else MARGIN
            wanted += [sweep[anchor] / m for m in [*margins, default]]
    for lr in wanted:
        key = _key(lr, seed) if lr is not None else None
        if key is None or key in data["runs"]:
            continue
        if lr < floor:
            data["runs"][key] = inferred_never(lr, seed)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            data["runs"][key] = measure_tau(task, lr, seed, root)


def never_floor(data: dict, seed: int) -> float:
    """The η below which a saved grid inferred τ = never for ``seed``: the largest η that failed without diverging
    below one that reached the target (0 when none did)."""
    reached = False
    for lr in sorted(data["grid"], reverse=True):
        run = data["runs"][_key(lr, seed)]
        if not math.isinf(run["tau"]):
            reached = True
        elif reached and not run["diverged"]:
            return lr
    return 0.0


def resuggest(saved: dict, args: argparse.Namespace) -> dict:
    """``--resuggest``: the finders of a saved run again, with the code as it is now, on the same seeds; τ measured at
    the η they point to that the saved run lacks. The grid (the oracle) is reused as it was measured."""
    with tempfile.TemporaryDirectory() as root:
        for name in saved["tasks"]:
            task, data = TASKS[name], saved["tasks"][name]
            old = {f["seed"]: f for f in data["finders"]}
            data["finders"] = []
            for seed in data["seeds"]:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    finder = run_finders(task, seed, root)
                    measure_suggestions(task, data, finder, never_floor(data, seed), args.margins, root)
                data["finders"].append(finder)
                before = old[seed]["chaos"]["suggestion"]
                print(f"[{name}] seed {seed}: suggestion {fmt_lr(before)} -> {fmt_lr(finder['chaos']['suggestion'])}",
                      flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(saved, fh, default=str)
    return saved


def inferred_never(lr: float, seed: int) -> dict:
    return {"lr": lr, "seed": seed, "tau": NEVER, "diverged": False, "inferred": True, "curve": [], "seconds": 0.0}


def run_finders(task: Task, seed: int, root: str, both_anchors: bool = True, lrfind: bool = True) -> dict:
    """find_chaos_lr and lr_find on the same fresh model of seed ``seed``, interleaved (order alternates with seed);
    without ``lrfind`` the finder alone (no time ratio)."""
    out: dict[str, Any] = {"seed": seed}

    def chaos(anchor: str = ANCHOR, key: str = "chaos") -> None:
        seed_everything(seed, verbose=False)
        dm, model = task.make_datamodule(), task.make_model(task.default_lr)
        trainer = _trainer(task.budget, [], root)
        started = time.perf_counter()
        result = find_chaos_lr(trainer, model, datamodule=dm, anchor=anchor)
        out[f"{key}_seconds"] = time.perf_counter() - started
        out[key] = {
            "suggestion": result.suggestion,
            "onset": result.onset,
            "trainability_edge": result.trainability_edge,
            "anchor": result.anchor,
            "reason": result.reason,
            "lrs": result.lrs.tolist(),
            "exponents": result.exponents.tolist(),
            "sensitive_fraction": result.sensitive_fraction.tolist(),
            "learning": result.learning.tolist(),
            "loss_ratio": result.loss_ratio.tolist(),
            "steps_per_lr": result.steps_per_lr,
            "model_lr_after": float(model.lr),
            "margin": result.margin,
            "losses": result.losses.tolist(),  # [η, step]: the reference's training loss, NaN after it stopped
            "model_steps": result.model_steps,  # the sweep's cost in forward+backward passes of one model copy
        }

    def lr_find() -> None:
        seed_everything(seed, verbose=False)
        dm, model = task.make_datamodule(), task.make_model(task.default_lr)
        trainer = _trainer(task.budget, [], root)
        started = time.perf_counter()
        finder = Tuner(trainer).lr_find(model, datamodule=dm)
        out["lrfind_seconds"] = time.perf_counter() - started
        out["lrfind"] = {"suggestion": finder.suggestion() if finder is not None else None}

    calls = ((chaos, lr_find) if seed % 2 == 0 else (lr_find, chaos)) if lrfind else (chaos,)
    for call in calls:
        call()
    if both_anchors:  # the other anchor's own sweep (it refines the grid elsewhere), untimed, for the comparison
        chaos("trainability" if ANCHOR == "onset" else "onset", "chaos_other")
    if lrfind:
        out["time_ratio"] = out["chaos_seconds"] / out["lrfind_seconds"]
    return out


def save_json(path: str, results: dict) -> None:
    """Write ``results`` to ``path`` (gzipped when it ends in ``.gz``), through a temporary file so that a run
    stopped while writing leaves the previous complete file."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path + ".tmp", "wt") as fh:
        json.dump(results, fh, default=str)
    os.replace(path + ".tmp", path)


def sweeps_only(args: argparse.Namespace, results: dict) -> None:
    """``--sweeps-only``: each task's finder sweep (the default anchor, every field incl. the loss curves) on every
    seed, no lr_find, no τ; saved after every seed. For replaying suggestion rules against oracle grids measured
    before (benchmarks/analyze_speed_rule.py)."""
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            data: dict[str, Any] = {"seeds": [], "finders": []}
            results["tasks"][name] = data
            for seed in seeds:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    finder = run_finders(TASKS[name], seed, root, both_anchors=False, lrfind=False)
                data["seeds"].append(seed)
                data["finders"].append(finder)
                print(f"[{name}] seed {seed}: suggestion {fmt_lr(finder['chaos']['suggestion'])} edge"
                      f" {fmt_lr(finder['chaos']['trainability_edge'])} ({finder['chaos_seconds']:.1f} s,"
                      f" {finder['chaos']['model_steps']} model steps)", flush=True)
                if args.json:
                    save_json(args.json, results)


def run_timing(task: Task, rep: int, root: str, sequential: bool = True) -> dict:
    """Wall time of find_chaos_lr stacked (one vmap per step) and one candidate at a time (with ``sequential``), and
    of lr_find, on fresh copies of the same model, in an order that rotates with ``rep``."""
    out: dict[str, Any] = {"rep": rep}

    def chaos(vectorize: bool) -> None:
        seed_everything(rep, verbose=False)
        dm, model = task.make_datamodule(), task.make_model(task.default_lr)
        trainer = _trainer(task.budget, [], root)
        started = time.perf_counter()
        result = find_chaos_lr(trainer, model, datamodule=dm, vectorize=vectorize)
        name = "stacked" if vectorize else "sequential"
        out[f"{name}_seconds"] = time.perf_counter() - started
        out[f"{name}_suggestion"] = result.suggestion
        out[f"{name}_exponents"] = dict(zip(result.lrs.tolist(), result.exponents.tolist()))

    def lr_find() -> None:
        seed_everything(rep, verbose=False)
        dm, model = task.make_datamodule(), task.make_model(task.default_lr)
        trainer = _trainer(task.budget, [], root)
        started = time.perf_counter()
        Tuner(trainer).lr_find(model, datamodule=dm)
        out["lrfind_seconds"] = time.perf_counter() - started

    calls = [lambda: chaos(True), lambda: chaos(False), lr_find] if sequential else [lambda: chaos(True), lr_find]
    for call in calls[rep % len(calls) :] + calls[: rep % len(calls)]:
        call()
    return out


def timing_only(args: argparse.Namespace) -> None:
    """``--timing-only``: the finder's wall time, stacked and sequential, against lr_find; no τ runs."""
    report: dict[str, Any] = {"accelerator": ACCELERATOR, "tasks": {}}
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run_timing(TASKS[name], 99, root, args.sequential)  # warm-up: imports, kernels, data caches
                reps = [run_timing(TASKS[name], rep, root, args.sequential) for rep in range(args.timing_reps)]
            report["tasks"][name] = reps
            med = {k: statistics.median(r[f"{k}_seconds"] for r in reps) for k in ("stacked", "lrfind")}
            ratio = statistics.median(r["stacked_seconds"] / r["lrfind_seconds"] for r in reps)
            line = f"[{name}] stacked {med['stacked']:.2f} s ({ratio:.1f}x lr_find) | lr_find {med['lrfind']:.2f} s"
            if args.sequential:
                sequential = statistics.median(r["sequential_seconds"] for r in reps)
                speedup = statistics.median(r["sequential_seconds"] / r["stacked_seconds"] for r in reps)
                same = all(r["stacked_suggestion"] == r["sequential_suggestion"] for r in reps)
                line += (f" | sequential {sequential:.2f} s ({sequential / med['lrfind']:.1f}x) |"
                         f" sequential/stacked {speedup:.2f} | same suggestion: {same}")
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, default=str)


def median_tau(values: list[float]) -> float:
    return statistics.median(values) if values else NEVER


def fmt_tau(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:g}"


def fmt_target(task: Task) -> str:
    """The task's target as the table shows it: accuracy in %, R² ≥ value, loss ≤ value."""
    if task.metric == "accuracy":
        return f"{task.target:.0%}"
    return f"R² ≥ {task.target:g}" if task.metric == "r2" else f"loss ≤ {task.target:g}"


def fmt_lr(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3g}"


def tau_at(curve: list[tuple[int, float]], target: float, metric: str = "accuracy") -> float:
    return next((step for step, score in curve if target_reached(metric, score, target)), NEVER)


def fastest_grid_lr(data: dict, seeds: list[int], tau: Callable[[dict], float] = lambda run: run["tau"]):
    """(median τ over ``seeds`` per grid η, the grid η with the smallest; ties go to the smaller η)."""
    grid = {lr: median_tau([tau(data["runs"][_key(lr, s)]) for s in seeds]) for lr in data["grid"]}
    return grid, min(grid, key=lambda lr: (grid[lr], lr))


def ratio_interval(data: dict, lr_by_seed: dict[int, Optional[float]], resamples: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of τ(lr_by_seed)/τ(best grid η): the seeds resampled with replacement, the best grid η
    re-chosen in every resample (its minimum over noisy medians is part of what the interval measures)."""
    rng = random.Random(0)
    seeds = list(lr_by_seed)
    ratios = []
    for _ in range(resamples):
        sample = rng.choices(seeds, k=len(seeds))
        grid, best_lr = fastest_grid_lr(data, sample)
        if math.isinf(grid[best_lr]):
            continue
        taus = [data["runs"][_key(lr_by_seed[s], s)]["tau"] if lr_by_seed[s] is not None else NEVER for s in sample]
        ratios.append(median_tau(taus) / grid[best_lr])
    if not ratios:
        return NEVER, NEVER
    ratios.sort()
    return ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]


def fmt_interval(interval: tuple[float, float]) -> str:
    return "–".join("∞" if math.isinf(v) else f"{v:.2f}" for v in interval)


def summarise(results: dict, args: argparse.Namespace) -> str:
    lines: list[str] = []
    add = lines.append
    ratios_time: list[float] = []
    margin_rows: list[str] = []
    margin_ratios: dict[float, list[float]] = {m: [] for m in args.margins}
    margin_ratios_suggested: dict[float, list[float]] = {m: [] for m in args.margins}
    add("| task | target | budget | default η → τ | lr_find η → τ | chaos onset η* → suggestion η (τ) |"
        " best grid η → τ | τ(chaos)/τ(best) | its 95 % interval | τ(lr_find)/τ(best) | chaos beats lr_find? |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, data in results["tasks"].items():
        task = TASKS[name]
        runs = data["runs"]

        def taus(lr_by_seed: dict[int, Optional[float]]) -> list[float]:
            return [
                runs[_key(lr, seed)]["tau"] if lr is not None else NEVER for seed, lr in lr_by_seed.items()
            ]

        grid, best_lr = fastest_grid_lr(data, data["seeds"])
        best = grid[best_lr]
        finders = [f for f in data["finders"] if f["seed"] in data["seeds"]]  # the others are timing-only
        chaos_lrs = {f["seed"]: f["chaos"]["suggestion"] for f in finders}
        onset_sweeps = {f["seed"]: anchored_sweep(f, "onset") for f in finders}  # the onset-anchored sweeps
        onsets = {s: (sweep or {}).get("onset") for s, sweep in onset_sweeps.items()}
        lrfind_lrs = {f["seed"]: f["lrfind"]["suggestion"] for f in finders}
        tau_chaos = median_tau(taus(chaos_lrs))
        tau_lrfind = median_tau(taus(lrfind_lrs))
        tau_default = median_tau(taus({s: task.default_lr for s in data["seeds"]}))
        ratios_time += [f["time_ratio"] for f in data["finders"]]

        def med(lrs: dict) -> Optional[float]:
            values = [v for v in lrs.values() if v is not None]
            return statistics.median(values) if values else None

        def ratio(tau: float) -> str:
            if math.isinf(best):
                return "n/a"
            return "∞" if math.isinf(tau) else f"{tau / best:.2f}"

        beats = "yes" if tau_chaos < tau_lrfind else ("tie" if tau_chaos == tau_lrfind else "no")
        add(
            f"| {name} | {fmt_target(task)} | {task.budget} | {task.default_lr:g} → {fmt_tau(tau_default)} |"
            f" {fmt_lr(med(lrfind_lrs))} → {fmt_tau(tau_lrfind)} |"
            f" {fmt_lr(med(onsets))} → {fmt_lr(med(chaos_lrs))} ({fmt_tau(tau_chaos)}) |"
            f" {best_lr:.3g} → {fmt_tau(best)} | {ratio(tau_chaos)} | {fmt_interval(ratio_interval(data, chaos_lrs))} |"
            f" {ratio(tau_lrfind)} | {beats} |"
        )
        # margin evidence
        onset = med(onsets)
        cells = []
        for margin in args.margins:
            keys = [_key(onsets[s] / margin, s) for s in data["seeds"] if onsets[s] is not None]
            if any(k not in runs for k in keys):
                cells.append("—")  # this margin was not measured in this run
                continue
            tau_m = median_tau([runs[k]["tau"] for k in keys])
            cells.append(f"{fmt_tau(tau_m)} ({ratio(tau_m)})")
            margin_ratios[margin].append(tau_m / best if not math.isinf(best) else NEVER)
            if any(lr is not None for lr in chaos_lrs.values()):
                margin_ratios_suggested[margin].append(margin_ratios[margin][-1])
        near = sorted(lr for lr in grid if not math.isinf(best) and grid[lr] <= 1.25 * best)
        band = f"{near[0]:.3g}–{near[-1]:.3g}" if near else "—"
        margin_rows.append(
            f"| {name} | {fmt_lr(onset)} | {best_lr:.3g} | {onset / best_lr:.2f} | {band} |"
            f" {onset / near[-1]:.2f}–{onset / near[0]:.2f} | " + " | ".join(cells) + " |"
            if onset is not None and near
            else f"| {name} | {fmt_lr(onset)} | {best_lr:.3g} | — | {band} | — | " + " | ".join(cells) + " |"
        )
    add("")
    add("Margin evidence (τ at η*/m, median over seeds, and its ratio to the best grid τ):")
    add("")
    add("| task | onset η* | best grid η | η*/η_best | grid η within 1.25× of best τ | η*/η over that band | "
        + " | ".join(f"m={m:g}" for m in args.margins) + " |")
    add("|---|---|---|---|---|---|" + "---|" * len(args.margins))
    lines += margin_rows
    add("| worst ratio over tasks | | | | | | "
        + " | ".join(f"{max(v):.2f}" if v else "—" for v in margin_ratios.values()) + " |")
    add("| worst ratio, tasks with a suggestion | | | | | | "
        + " | ".join(f"{max(v):.2f}" if v else "—" for v in margin_ratios_suggested.values()) + " |")
    add("")
    if ratios_time:
        add(
            f"Wall time find_chaos_lr / lr_find: median {statistics.median(ratios_time):.2f}×"
            f" (range {min(ratios_time):.2f}–{max(ratios_time):.2f}, {len(ratios_time)} interleaved pairs)"
        )
        for name, data in results["tasks"].items():
            chaos_s = [f["chaos_seconds"] for f in data["finders"]]
            lrf_s = [f["lrfind_seconds"] for f in data["finders"]]
            per = [f["time_ratio"] for f in data["finders"]]
            add(
                f"  {name}: find_chaos_lr median {statistics.median(chaos_s):.2f} s, lr_find median"
                f" {statistics.median(lrf_s):.2f} s, ratio median {statistics.median(per):.2f}×"
            )
    # secondary target from the same curves
    if args.secondary:
        add("")
        add(f"Secondary target (accuracy or R² − {args.secondary:g}, a loss + it; read off the same runs):"
            " best grid η, τ; chaos τ ratio")
        for name, data in results["tasks"].items():
            task, runs, seeds = TASKS[name], data["runs"], data["seeds"]
            target = task.target + (args.secondary if task.metric == "loss" else -args.secondary)
            grid, best_lr = fastest_grid_lr(data, seeds, lambda run: tau_at(run["curve"], target, task.metric))
            finders = [f for f in data["finders"] if f["seed"] in seeds]
            chaos = median_tau([
                tau_at(runs[_key(f["chaos"]["suggestion"], f["seed"])]["curve"], target, task.metric)
                if f["chaos"]["suggestion"] is not None else NEVER
                for f in finders
            ])
            lrf = median_tau([
                tau_at(runs[_key(f["lrfind"]["suggestion"], f["seed"])]["curve"], target, task.metric)
                if f["lrfind"]["suggestion"] is not None else NEVER
                for f in finders
            ])
            best = grid[best_lr]
            add(
                f"  {name} @ {target:.0%}: best η {best_lr:.3g} τ {fmt_tau(best)}; chaos τ {fmt_tau(chaos)}"
                f" ({chaos / best:.2f}×); lr_find τ {fmt_tau(lrf)} ({lrf / best:.2f}×)"
            )
    return "\n".join(lines)


def grid_table(results: dict) -> str:
    """Median τ per grid η per task (the oracle curves)."""
    lines = []
    for name, data in results["tasks"].items():
        runs = data["runs"]
        cells = []
        for lr in data["grid"]:
            per_seed = [runs[_key(lr, s)]["tau"] for s in data["seeds"]]
            flag = "†" if any(runs[_key(lr, s)]["diverged"] for s in data["seeds"]) else ""
            flag += "‡" if any(runs[_key(lr, s)]["inferred"] for s in data["seeds"]) else ""
            cells.append(f"{lr:.3g}: {fmt_tau(median_tau(per_seed))}{flag}")
        lines.append(f"{name}: " + ", ".join(cells))
    return "\n".join(lines)


MAX_SPLITS = 2000


def oracle_transfer(results: dict) -> str:
    """How well the grid's own best η carries over to other seeds: the noise floor of τ(choice)/τ(best).

    For every split of the seeds (a seeded sample of ``MAX_SPLITS`` when there are more) into a choosing half (the
    smaller) and a judging half, the best grid η by median τ over
    the choosing seeds is judged like the finder: median τ over the judging seeds, over the best median τ of any grid η
    on those same seeds. A ratio above 1 here is seed noise alone, with the best η known from other runs.
    """
    lines = ["| task | seeds | splits | median ratio | worst ratio |", "|---|---:|---:|---:|---:|"]
    for name, data in results["tasks"].items():
        seeds = data["seeds"]
        if len(seeds) < 2:
            continue
        ratios = []
        splits = list(itertools.islice(itertools.combinations(seeds, len(seeds) // 2), MAX_SPLITS + 1))
        if len(splits) > MAX_SPLITS:  # 20 seeds have 184 756 splits: a seeded sample of them
            rng = random.Random(0)
            splits = [tuple(sorted(rng.sample(seeds, len(seeds) // 2))) for _ in range(MAX_SPLITS)]
        for choosing in splits:
            _, choice = fastest_grid_lr(data, list(choosing))
            judged, best_lr = fastest_grid_lr(data, [s for s in seeds if s not in choosing])
            if not math.isinf(judged[best_lr]):
                ratios.append(judged[choice] / judged[best_lr])
        if ratios:
            worst = max(ratios)
            lines.append(f"| {name} | {len(seeds)} | {len(ratios)} | {statistics.median(ratios):.2f} |"
                         f" {'∞' if math.isinf(worst) else f'{worst:.2f}'} |")
    return "\n".join(lines)


def anchored_sweep(finder: dict, anchor: str) -> Optional[dict]:
    """The sweep that ran with ``anchor`` ("onset" or "trainability_edge"), or None: each anchor refines its own
    bracket, so one anchor's edge read off the other's sweep is not what that anchor would have suggested."""
    wanted = "onset" if anchor == "onset" else "trainability"
    for key in ("chaos", "chaos_other"):
        if key in finder and finder[key].get("anchor", "onset") == wanted:  # saved before anchors existed: onset
            return finder[key]
    return None


def anchor_table(results: dict, margins: list[float]) -> str:
    """τ at onset/m and at (top of the learning band)/m, per task and margin, as a ratio to the best grid τ."""
    lines = ["| task | best grid η → τ | " + " | ".join(f"onset/{m:g}" for m in margins) + " | "
             + " | ".join(f"edge/{m:g}" for m in margins) + " |", "|---|---|" + "---:|" * (2 * len(margins))]
    for name, data in results["tasks"].items():
        runs, seeds = data["runs"], data["seeds"]
        grid, best_lr = fastest_grid_lr(data, seeds)
        finders = [f for f in data["finders"] if f["seed"] in seeds]
        cells = []
        for anchor in ("onset", "trainability_edge"):
            for margin in margins:
                sweeps = [(anchored_sweep(f, anchor), f["seed"]) for f in finders]
                keys = [
                    _key(sweep[anchor] / margin, seed) if sweep is not None and sweep.get(anchor) is not None else None
                    for sweep, seed in sweeps
                ]
                if any(sweep is None for sweep, _ in sweeps) or any(k is not None and k not in runs for k in keys):
                    cells.append("—")  # not measured in this run
                    continue
                tau = median_tau([runs[k]["tau"] if k is not None else NEVER for k in keys])
                cells.append("∞" if math.isinf(tau) else f"{tau / grid[best_lr]:.2f}")
        lines.append(f"| {name} | {best_lr:.3g} → {fmt_tau(grid[best_lr])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(results: dict) -> str:
    """The README's table: τ (median over seeds) and the median η behind it, for the default LR, ``lr_find``, both
    anchors at the finder's default margins (the task's :func:`default_margin` below the top of the learning band,
    1.5 below the onset) and the best grid η; the anchors' ratios to the best, the default's with its interval."""
    lines = ["| task | default LR | Lightning `lr_find` | finder (default: top of the learning band) | onset anchor |"
             " best grid η | finder / best | its 95 % interval | onset / best |", "| --- " * 9 + "|"]
    for name, data in results["tasks"].items():
        runs, seeds, task = data["runs"], data["seeds"], TASKS[name]
        grid, best_lr = fastest_grid_lr(data, seeds)
        finders = [f for f in data["finders"] if f["seed"] in seeds]

        def cell(lr_by_seed: dict[int, Optional[float]]) -> tuple[str, float]:
            taus = [runs[_key(lr, s)]["tau"] if lr is not None else NEVER for s, lr in lr_by_seed.items()]
            known = [lr for lr in lr_by_seed.values() if lr is not None]
            where = f" (η = {statistics.median(known):.2g})" if known else ""
            return f"{fmt_tau(median_tau(taus))}{where}", median_tau(taus)

        def anchored(anchor: str) -> Optional[dict[int, Optional[float]]]:
            sweeps = {f["seed"]: anchored_sweep(f, anchor) for f in finders}
            if any(sweep is None for sweep in sweeps.values()):
                return None
            edges = {s: sweep.get(anchor) for s, sweep in sweeps.items()}
            margin = default_margin(task) if anchor == "trainability_edge" else MARGIN
            return {s: None if edge is None else edge / margin for s, edge in edges.items()}

        best = grid[best_lr]
        cells = [cell({s: task.default_lr for s in seeds})[0], cell({f["seed"]: f["lrfind"]["suggestion"]
                                                                     for f in finders})[0]]
        ratios = []
        for anchor in ("trainability_edge", "onset"):
            lr_by_seed = anchored(anchor)
            if lr_by_seed is None or any(lr is not None and _key(lr, s) not in runs for s, lr in lr_by_seed.items()):
                cells.append("—")
                ratios.append("—")
                continue
            text, tau = cell(lr_by_seed)
            cells.append(text)
            ratios.append("∞" if math.isinf(tau) else f"{tau / best:.2f}")
            if anchor == "trainability_edge":
                ratios.append(fmt_interval(ratio_interval(data, lr_by_seed)))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt_tau(best)} (η = {best_lr:.2g}) | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """The finder's own sweep for seed 0 of each task (Λ, ρ, learning, loss ratio per η)."""
    lines = []
    for name, data in results["tasks"].items():
        c = data["finders"][0]["chaos"]
        lines.append(f"{name} (seed {data['finders'][0]['seed']}): onset {fmt_lr(c['onset'])}, suggestion"
                     f" {fmt_lr(c['suggestion'])} {c['reason']}")
        for lr, lam, rho, learn, lr_ratio in zip(
            c["lrs"], c["exponents"], c["sensitive_fraction"], c["learning"], c["loss_ratio"]
        ):
            lines.append(
                f"    η={lr:9.4g}  Λ={lam:+.4f}  ρ={rho:.1f}  learning={int(learn)}  loss ratio={lr_ratio:.3f}"
            )
    return "\n".join(lines)


def load_run(path: str) -> dict:
    """A saved ``--json`` file, gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def merge_runs(saved: list[dict]) -> dict:
    """Several saved runs as one: per task, the seeds, finder runs and τ runs pooled (the grids must agree; a seed
    measured twice is an error, not silently overwritten)."""
    merged: dict[str, Any] = {"meta": [run["meta"] for run in saved], "tasks": {}}
    for run in saved:
        for name, data in run["tasks"].items():
            into = merged["tasks"].setdefault(name, {"seeds": [], "grid": data["grid"], "finders": [], "runs": {}})
            if into["grid"] != data["grid"]:
                raise ValueError(f"{name}: the saved runs' oracle grids differ; they cannot be pooled")
            twice = set(into["seeds"]) & set(data["seeds"])
            if twice:
                raise ValueError(f"{name}: seeds {sorted(twice)} are in more than one saved run")
            into["seeds"] += data["seeds"]
            into["finders"] += data["finders"]
            into["runs"].update(data["runs"])
    return merged


def run_meta(args: argparse.Namespace) -> dict:
    """What a saved run records about itself."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightning_chaos": lightning_chaos.__version__,
        "threads": args.threads,
        "argv": sys.argv,
    }


def _key(lr: float, seed: int) -> str:
    return f"{lr:.6e}|{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                        help="default: the tasks not held out; with --from-json, every task in the files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed + seeds - 1")
    parser.add_argument("--grid-min", type=float, default=1e-3)
    parser.add_argument("--grid-max", type=float, default=10.0)
    parser.add_argument("--per-decade", type=int, default=4)
    parser.add_argument("--timing-reps", type=int, default=3, help="finder/lr_find pairs per task (>= --seeds)")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    parser.add_argument("--secondary", type=float, default=0.05, help="also report τ for target − this (0: off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="write every run here")
    parser.add_argument("--from-json", nargs="+", default=[],
                        help="only print the tables of saved --json files (several: their seeds are pooled per task)")
    parser.add_argument("--timing-only", action="store_true", help="only the wall times, stacked and sequential")
    parser.add_argument("--resuggest", action="store_true",
                        help="with --from-json: rerun the finders (the code as it is now) on the saved seeds of --tasks")
    parser.add_argument("--no-sequential", dest="sequential", action="store_false",
                        help="with --timing-only: time the stacked finder and lr_find only")
    parser.add_argument("--accelerator", default="cpu", help="the Trainers' accelerator (cpu, cuda)")
    parser.add_argument("--anchor", default="trainability", choices=["onset", "trainability"],
                        help="the anchor of the timed finder run (the other anchor's sweep runs untimed beside it)")
    parser.add_argument("--no-other-anchor", dest="other_anchor", action="store_false",
                        help="skip the other anchor's untimed sweep")
    parser.add_argument("--sweeps-only", action="store_true",
                        help="only the finder's sweeps (loss curves included) per task and seed: no lr_find, no τ")
    args = parser.parse_args()
    if args.tasks is None and not args.from_json:
        args.tasks = [t for t in TASKS if t not in NOT_DEFAULT]
    global ACCELERATOR, ANCHOR
    ACCELERATOR, ANCHOR = args.accelerator, args.anchor
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_chaos", *logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.from_json:
        saved = merge_runs([load_run(path) for path in args.from_json])
        if args.tasks is not None:
            saved["tasks"] = {name: data for name, data in saved["tasks"].items() if name in args.tasks}
        if args.resuggest:
            saved = resuggest(saved, args)
        print(summarise(saved, args), grid_table(saved), oracle_transfer(saved), anchor_table(saved, args.margins),
              readme_table(saved), sweep_table(saved), sep="\n\n")
        return

    if args.timing_only:
        timing_only(args)
        return
    if args.sweeps_only:
        sweeps_only(args, {"meta": run_meta(args), "tasks": {}})
        return

    decades = math.log10(args.grid_max / args.grid_min)
    num = int(round(decades * args.per_decade)) + 1
    exponents = torch.linspace(math.log10(args.grid_min), math.log10(args.grid_max), num, dtype=torch.float64)
    grid = [float(10.0**v) for v in exponents]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict[str, Any] = {"meta": run_meta(args), "tasks": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            task = TASKS[name]
            task_started = time.perf_counter()
            data: dict[str, Any] = {"seeds": seeds, "grid": grid, "finders": [], "runs": {}}
            results["tasks"][name] = data
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                for rep in range(max(args.timing_reps, len(seeds))):
                    seed = args.first_seed + rep
                    data["finders"].append(
                        run_finders(task, seed, root, both_anchors=seed in seeds and args.other_anchor))
            for f in data["finders"]:
                print(
                    f"[{name}] seed {f['seed']}: chaos onset {fmt_lr(f['chaos']['onset'])} suggestion"
                    f" {fmt_lr(f['chaos']['suggestion'])} ({f['chaos_seconds']:.1f} s) | lr_find"
                    f" {fmt_lr(f['lrfind']['suggestion'])} ({f['lrfind_seconds']:.1f} s) {f['chaos']['reason']}",
                    flush=True,
                )
            for seed in seeds:
                # The grid from the top down. Below the first η (under one that reached the target) that fails
                # without diverging, τ is taken as never without running: in the ordered regime τ grows like 1/η.
                floor = 0.0
                reached = False
                for lr in sorted(grid, reverse=True):
                    key = _key(lr, seed)
                    if lr < floor:
                        data["runs"][key] = inferred_never(lr, seed)
                        continue
                    with contextlib.redirect_stdout(io.StringIO()):
                        run = data["runs"][key] = measure_tau(task, lr, seed, root)
                    if not math.isinf(run["tau"]):
                        reached = True
                    elif reached and not run["diverged"] and floor == 0.0:
                        floor = lr
                measure_suggestions(task, data, data["finders"][seed - args.first_seed], floor, args.margins, root)
                print(f"[{name}] seed {seed}: grid " + ", ".join(
                    f"{lr:.3g}:{fmt_tau(data['runs'][_key(lr, seed)]['tau'])}" for lr in grid), flush=True)
                if args.json:  # after every seed: a long run stopped early keeps what it measured
                    save_json(args.json, results)
            data["seconds"] = time.perf_counter() - task_started
            print(f"[{name}] done in {data['seconds']:.0f} s ({len(data['runs'])} runs)", flush=True)
            if args.json:
                save_json(args.json, results)
    results["meta"]["seconds"] = time.perf_counter() - started
    if args.json:
        save_json(args.json, results)
    print()
    print(summarise(results, args))
    print()
    print("Median τ per grid η († = a seed's loss turned non-finite; ‡ = a seed's 'never' inferred, not run):")
    print(grid_table(results))
    print()
    print("The oracle's own noise floor (best grid η chosen on some seeds, judged on the others):")
    print(oracle_transfer(results))
    print()
    print("Both anchors at every margin (τ median over seeds, ratio to the best grid τ):")
    print(anchor_table(results, args.margins))
    print()
    print(f"The README's table (the default margin, {DEFAULT_MARGIN!r}: {ADAPTIVE_MARGIN:g} below the top of the"
          f" learning band under adaptive optimizers, else {MARGIN:g}):")
    print(readme_table(results))
    print()
    print("The finder's sweep, seed 0:")
    print(sweep_table(results))
    print(f"\nTotal {results['meta']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
