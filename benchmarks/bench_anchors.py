"""The learning-rate-free optimizers as anchor rows of the finder benchmark: how long does a user who skips the LR
finder and trains with an LR-free optimizer take to reach each task's target?  (issue #15, part 2)

What is measured
----------------
τ exactly as ``benchmarks/bench_finder.py`` measures it (its ``TimeToTarget`` and Trainer settings): optimizer steps
(``trainer.global_step``) until the accuracy on the whole validation set, checked every ``task.eval_every`` steps,
first reaches the task's target; "never" beyond the task's step budget or when the loss turns non-finite. Seed s
fixes the initialisation and the shuffling (``seed_everything(s)`` before the data module and the model are built, as
in ``measure_tau``). The task's data module, network, target, budget and ``eval_every`` are kept; only its optimizer
is replaced, by overriding ``configure_optimizers`` on the model instance (Lightning looks the hook up there). The
anchors:

* ``prodigy``      ``prodigyopt.Prodigy(params, lr=1.0)``, its defaults.
* ``dadapt_adam``  ``dadaptation.DAdaptAdam(params, lr=1.0)``, its defaults.
* ``dog``          ``dog.DoG(params)`` (its defaults: lr = c = 1, reps_rel = 1e-6) with the
                   ``dog.PolynomialDecayAverager`` (γ = 8) its authors require: the averager steps after every
                   optimizer step and τ is read off the accuracy of the *averaged* model.
* ``sf_adamw``     ``schedulefree.AdamWScheduleFree(params)`` at its default LR (0.0025); put in train mode when
                   training starts, evaluated in eval mode (``optimizer.eval()`` before the validation accuracy,
                   ``optimizer.train()`` after), as its authors require.
* ``sf_adamw_chaos`` the same optimizer at the chaos finder's suggestion: per seed,
                   ``lightning_chaos.find_chaos_lr(trainer, model, datamodule=dm)`` with the finder's defaults, on
                   seed s's initial model configured with ``AdamWScheduleFree`` (model ``lr`` = 0.0025 before the
                   sweep), then τ of seed s at ``result.suggestion`` ("never" when there is none). The sweep's cost is
                   recorded in model steps: ``result.model_steps`` where the result has it, else
                   ``len(result.lrs) × 2 × result.steps_per_lr`` (one reference and one shadow per η), with its source.

Extra anchors, not in the default run: ``prodigy_chaos`` (Prodigy with its ``lr`` multiplier at the finder's
suggestion: does sweeping it pay?), ``dog_plain`` (DoG without the averager, τ of the raw iterate) and
``sf_adamw_train`` (schedule-free τ read in train mode, the y sequence), to tell apart what the averaging does.

Tasks that differ only in their optimizer (``digits_mlp``/``digits_mom``/``digits_adam``/``digits_rmsprop``,
``mnist_mlp``/``mnist_adam``, ...) are the same experiment once the optimizer is replaced. Unless ``--no-share``, a
task whose fingerprint (data module class and settings, network structure, initial weights of seed 0, training and
forward code, target, budget, eval_every) equals an already measured task's takes that task's runs, marked
``shared_from``. The fingerprint leaves out the model's ``lr`` and ``momentum`` attributes, which only the task's own
``configure_optimizers`` reads.

Usage
-----
    python benchmarks/bench_anchors.py --tasks digits_mlp mnist_mlp --seeds 5          # a quick look
    python benchmarks/bench_anchors.py --mlp --seeds 10                                 # every MLP task in TASKS
    python benchmarks/bench_anchors.py --tasks digits_cnn digits_cnn_adam --seeds 5
    python benchmarks/bench_anchors.py --from-json benchmarks/results/anchors_cpu.json.gz   # the tables only

Every finished run is written at once to ``--json`` (default ``benchmarks/results/anchors_cpu.json.gz``); a rerun
with the same file skips the (task, anchor, seed) runs it already holds, so an interrupted run can be continued.
Torch runs with one intra-op thread (``--threads``).
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning
import torch
from lightning.pytorch.utilities.parsing import lightning_setattr
from lightning.pytorch import LightningModule, Trainer, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks
from bench_finder import NEVER, TimeToTarget, _trainer, fit_to_target, fmt_lr, fmt_target, fmt_tau, load_run, median_tau, save_json
from tasks import Task

import lightning_chaos
from lightning_chaos import find_chaos_lr

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "anchors_cpu.json.gz")
SF_DEFAULT_LR = 0.0025  # schedulefree.AdamWScheduleFree's default lr


def _prodigy(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr)


def _dadapt_adam(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    from dadaptation import DAdaptAdam

    return DAdaptAdam(params, lr=lr)


def _dog(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    from dog import DoG

    return DoG(params, lr=lr)


def _sf_adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params, lr=lr)


@dataclass(frozen=True)
class Anchor:
    name: str
    optimizer: str  # what the JSON and the table call it
    make_optimizer: Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]
    lr: float  # the LR the optimizer is built with (the chaos anchor: the LR the sweep starts from)
    averaged: bool = False  # DoG: τ of the polynomial-decay averaged model
    schedule_free: bool = False  # optimizer.train() when training starts (a schedule-free optimizer refuses otherwise)
    eval_mode: bool = False  # schedule-free: accuracy with optimizer.eval() (the averaged sequence x), train() after
    chaos: bool = False  # lr = find_chaos_lr's suggestion, per seed


ANCHORS: dict[str, Anchor] = {
    anchor.name: anchor
    for anchor in (
        Anchor("prodigy", "prodigyopt.Prodigy", _prodigy, 1.0),
        Anchor("dadapt_adam", "dadaptation.DAdaptAdam", _dadapt_adam, 1.0),
        Anchor("dog", "dog.DoG + PolynomialDecayAverager(gamma=8)", _dog, 1.0, averaged=True),
        Anchor("sf_adamw", "schedulefree.AdamWScheduleFree", _sf_adamw, SF_DEFAULT_LR, schedule_free=True,
               eval_mode=True),
        Anchor("sf_adamw_chaos", "schedulefree.AdamWScheduleFree @ find_chaos_lr", _sf_adamw, SF_DEFAULT_LR,
               schedule_free=True, eval_mode=True, chaos=True),
        # not in the default run
        Anchor("prodigy_chaos", "prodigyopt.Prodigy @ find_chaos_lr (its lr, a multiplier of d)", _prodigy, 1.0,
               chaos=True),
        Anchor("dog_plain", "dog.DoG (no averaging)", _dog, 1.0),
        Anchor("sf_adamw_train", "schedulefree.AdamWScheduleFree, τ in train mode", _sf_adamw, SF_DEFAULT_LR,
               schedule_free=True),
    )
}
DEFAULT_ANCHORS = ("prodigy", "dadapt_adam", "dog", "sf_adamw", "sf_adamw_chaos")
GRID_PREFIX = "sf_adamw@"  # --sf-grid: schedule-free AdamW at a fixed LR, the oracle for the finder's suggestion


def grid_anchor(lr: float) -> Anchor:
    """Schedule-free AdamW at ``lr`` (a ``--sf-grid`` point), evaluated in eval mode like ``sf_adamw``."""
    return Anchor(f"{GRID_PREFIX}{lr:.4g}", "schedulefree.AdamWScheduleFree", _sf_adamw, lr, schedule_free=True,
                  eval_mode=True)


class AnchorTimeToTarget(TimeToTarget):
    """``TimeToTarget`` that reads the accuracy off an averaged model (stepping its averager after every optimizer
    step first) and/or with a schedule-free optimizer in eval mode, and puts such an optimizer in train mode when
    training starts."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, target: float, every: int,
                 averager: Any = None, schedule_free: bool = False, eval_mode: bool = False,
                 metric: str = "accuracy") -> None:
        super().__init__(x_val, y_val, target, every, metric)
        self.averager, self.schedule_free, self.eval_mode = averager, schedule_free, eval_mode
        self.trainer: Optional[Trainer] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainer = trainer
        if self.schedule_free:
            for optimizer in trainer.optimizers:
                optimizer.train()  # type: ignore[attr-defined]  # schedule-free: it refuses to step in eval mode

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int):
        if self.averager is not None:
            self.averager.step()  # after the optimizer step of this batch, before τ is checked
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    @torch.no_grad()
    def accuracy(self, pl_module: LightningModule) -> float:
        model = self.averager.averaged_model if self.averager is not None else pl_module
        if not self.eval_mode:
            return super().accuracy(model)
        assert self.trainer is not None
        for optimizer in self.trainer.optimizers:
            optimizer.eval()  # type: ignore[attr-defined]  # parameters to the averaged sequence x
        try:
            return super().accuracy(model)
        finally:
            for optimizer in self.trainer.optimizers:
                optimizer.train()  # type: ignore[attr-defined]  # back to y, where the gradients are taken


def with_optimizer(model: LightningModule, anchor: Anchor, lr: float) -> LightningModule:
    """``model`` training with ``anchor``'s optimizer at ``model.lr`` (set to ``lr``): ``configure_optimizers``
    overridden on the instance. ``lr`` is set wherever Lightning's attribute lookup finds it (the model and its
    hparams): the finder reads the last holder, and a stale ``hparams.lr`` made its first sf_adamw_chaos run sweep
    in the wrong units."""
    lightning_setattr(model, "lr", lr)

    def configure_optimizers(self: LightningModule) -> torch.optim.Optimizer:
        return anchor.make_optimizer(self.parameters(), float(self.lr))

    model.configure_optimizers = types.MethodType(configure_optimizers, model)  # type: ignore[method-assign]
    return model


def measure_anchor_tau(task: Task, anchor: Anchor, lr: float, seed: int, root: str) -> dict:
    """τ of ``task`` trained with ``anchor``'s optimizer at ``lr`` from seed ``seed`` (``measure_tau``'s semantics)."""
    seed_everything(seed, verbose=False)
    dm = task.make_datamodule()
    dm.setup("fit")
    x_val, y_val = dm.val_set.tensors
    model = with_optimizer(task.make_model(task.default_lr), anchor, lr)
    averager = None
    if anchor.averaged:
        from dog import PolynomialDecayAverager

        averager = PolynomialDecayAverager(model)  # a deep copy of the initial model; consumes no random numbers
    timer = AnchorTimeToTarget(x_val, y_val, task.target, task.eval_every, averager, anchor.schedule_free,
                                anchor.eval_mode, task.metric)
    return fit_to_target(task, model, dm, timer, lr, seed, root)


def run_chaos_finder(task: Task, anchor: Anchor, seed: int, root: str) -> dict:
    """``find_chaos_lr`` with its defaults on seed ``seed``'s initial model, configured with ``anchor``'s optimizer."""
    seed_everything(seed, verbose=False)
    dm = task.make_datamodule()
    model = with_optimizer(task.make_model(task.default_lr), anchor, anchor.lr)
    trainer = _trainer(task.budget, [], root)
    started = time.perf_counter()
    result = find_chaos_lr(trainer, model, datamodule=dm)
    seconds = time.perf_counter() - started
    model_steps = getattr(result, "model_steps", None)
    source = "result.model_steps"
    if model_steps is None:
        model_steps, source = len(result.lrs) * 2 * result.steps_per_lr, "len(lrs) x 2 x steps_per_lr"
    return {
        "seed": seed,
        "suggestion": result.suggestion,
        "onset": result.onset,
        "trainability_edge": result.trainability_edge,
        "anchor": result.anchor,
        "margin": result.margin,
        "reason": result.reason,
        "lrs": result.lrs.tolist(),
        "learning": result.learning.tolist(),
        "loss_ratio": result.loss_ratio.tolist(),
        "exponents": result.exponents.tolist(),
        "steps_per_lr": result.steps_per_lr,
        "model_steps": int(model_steps),
        "model_steps_source": source,
        "seconds": seconds,
    }


def fingerprint(task: Task) -> str:
    """What decides an anchor's runs on ``task`` once its optimizer is replaced (see the module docstring)."""
    seed_everything(0, verbose=False)
    dm = task.make_datamodule()
    model = task.make_model(task.default_lr)
    simple = (int, float, str, bool, tuple, type(None))
    parts: list[Any] = [
        type(dm).__module__ + "." + type(dm).__qualname__,
        sorted((k, repr(v)) for k, v in vars(dm).items() if isinstance(v, simple) and not k.startswith("_")),
        [(name, repr(child)) for name, child in model.named_children()],
        sorted((k, repr(v)) for k, v in vars(model).items()
               if isinstance(v, simple) and not k.startswith("_") and k not in ("lr", "momentum")),
        [getattr(type(model), hook).__qualname__ for hook in ("forward", "training_step")],
        task.target, task.budget, task.eval_every,
    ]
    digest = hashlib.sha256(repr(parts).encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _run_key(task: str, anchor: str, seed: int) -> str:
    return f"{task}|{anchor}|{seed}"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "lightning_chaos": lightning_chaos.__version__}
    for package in ("prodigyopt", "dadaptation", "dog-optimizer", "schedulefree"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = load_run(args.json) if os.path.exists(args.json) else {"meta": [], "runs": {}, "finders": {}}
    results["meta"].append({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": args.threads,
                            "argv": sys.argv, **versions()})
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    prints: dict[str, str] = {}  # fingerprint -> the first task measured with it
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            task = tasks.TASKS[name]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                print_ = fingerprint(task)
            source = prints.setdefault(print_, name) if args.share else name
            for seed in seeds:
                for anchor_name in args.anchors:
                    anchor = ANCHORS[anchor_name]
                    key = _run_key(name, anchor_name, seed)
                    if key in results["runs"]:
                        continue
                    shared = results["runs"].get(_run_key(source, anchor_name, seed)) if source != name else None
                    if shared is not None:
                        results["runs"][key] = {**shared, "task": name, "shared_from": source}
                        fkey = f"{name}|{seed}"
                        if anchor.chaos and f"{source}|{seed}" in results["finders"] and fkey not in results["finders"]:
                            results["finders"][fkey] = {**results["finders"][f"{source}|{seed}"], "task": name,
                                                             "shared_from": source}
                        continue  # saved at the end of the task: a copy costs nothing to redo
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        lr: Optional[float] = anchor.lr
                        if anchor.chaos:
                            finder = results["finders"].get(f"{name}|{seed}")
                            if finder is None:
                                finder = results["finders"][f"{name}|{seed}"] = {
                                    "task": name, **run_chaos_finder(task, anchor, seed, root)}
                            lr = finder["suggestion"]
                        if lr is None:
                            run_ = {"lr": None, "seed": seed, "tau": NEVER, "diverged": False, "curve": [],
                                    "seconds": 0.0}
                        else:
                            run_ = measure_anchor_tau(task, anchor, lr, seed, root)
                    results["runs"][key] = {"task": name, "anchor": anchor_name, "optimizer": anchor.optimizer,
                                            **run_}
                    save_json(args.json, results)
                    extra = ""
                    if anchor.chaos:
                        f = results["finders"][f"{name}|{seed}"]
                        extra = f" (sweep {f['seconds']:.1f} s, {f['model_steps']} model steps) {f['reason']}"
                    print(f"[{name}] seed {seed} {anchor_name}: lr {fmt_lr(run_['lr'])} -> τ {fmt_tau(run_['tau'])}"
                          f"{' diverged' if run_['diverged'] else ''} ({run_['seconds']:.1f} s){extra}", flush=True)
            save_json(args.json, results)
    return results


def table(results: dict, anchors: list[str], task_names: Optional[list[str]] = None) -> str:
    """Per task: median τ over seeds (never = ∞) and the seeds that reached the target, for every anchor; the chaos
    finder's median suggestion and its sweep's model steps."""
    runs = [r for r in results["runs"].values() if not r["anchor"].startswith(GRID_PREFIX)]
    names = task_names or list(dict.fromkeys(r["task"] for r in runs))
    present = [a for a in anchors if any(r["anchor"] == a for r in runs)]
    head = ["task", "target", "seeds", *present]
    if "sf_adamw_chaos" in present:
        head += ["finder η (median)", "sweep model steps", "sweep s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * (len(head) - 3)]
    for name in names:
        mine = [r for r in runs if r["task"] == name]
        if not mine:
            continue
        target = tasks.TASKS[name].target if name in tasks.TASKS else float("nan")
        cells = []
        seed_counts = set()
        for anchor in present:
            taus = [r["tau"] for r in mine if r["anchor"] == anchor]
            if taus:
                seed_counts.add(len(taus))
            else:
                cells.append("—")
                continue
            reached = sum(not math.isinf(t) for t in taus)
            diverged = sum(r["diverged"] for r in mine if r["anchor"] == anchor)
            cells.append(f"{fmt_tau(median_tau(taus))} ({reached}/{len(taus)}{f', {diverged} div.' if diverged else ''})")
        shared = {r.get("shared_from") for r in mine} - {None}
        row = [name + (f" (= {', '.join(sorted(shared))})" if shared else ""),
               fmt_target(tasks.TASKS[name]) if name in tasks.TASKS else f"{target:.0%}",
               "/".join(str(n) for n in sorted(seed_counts)), *cells]
        if "sf_adamw_chaos" in present:
            finders = [f for f in results["finders"].values() if f["task"] == name]
            known = [f["suggestion"] for f in finders if f["suggestion"] is not None]
            row.append(f"{statistics.median(known):.3g}" if known else "—")
            steps = sorted({(f["model_steps"], f["model_steps_source"]) for f in finders})
            row.append(", ".join(f"{s}" for s, _ in steps) if steps else "—")
            row.append(f"{statistics.median(f['seconds'] for f in finders):.1f}" if finders else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def grid_table(results: dict, task_names: Optional[list[str]] = None) -> str:
    """``--sf-grid``: per task and LR, schedule-free AdamW's median τ (seeds reaching the target), with the chaos
    finder's suggestions on the same task for comparison."""
    runs = [r for r in results["runs"].values()
            if r["anchor"].startswith(GRID_PREFIX) and (task_names is None or r["task"] in task_names)]
    if not runs:
        return ""
    lrs = sorted({r["lr"] for r in runs})
    lines = ["| task | " + " | ".join(f"η={lr:.3g}" for lr in lrs) + " | finder η (per seed) |",
             "|---|" + "---:|" * (len(lrs) + 1)]
    for name in task_names or list(dict.fromkeys(r["task"] for r in runs)):
        mine = [r for r in runs if r["task"] == name]
        if not mine:
            continue
        cells = []
        for lr in lrs:
            taus = [r["tau"] for r in mine if r["lr"] == lr]
            reached = sum(not math.isinf(t) for t in taus)
            cells.append(f"{fmt_tau(median_tau(taus))} ({reached}/{len(taus)})" if taus else "—")
        seeds = sorted({r["seed"] for r in mine})
        finders = [results["finders"].get(f"{name}|{seed}") for seed in seeds]
        cells.append(", ".join(fmt_lr(f["suggestion"]) if f else "—" for f in finders))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None, help="task names in tasks.TASKS")
    parser.add_argument("--mlp", action="store_true", help="every task in tasks.TASKS whose name has no 'cnn'")
    parser.add_argument("--anchors", nargs="+", default=list(DEFAULT_ANCHORS), choices=list(ANCHORS))
    parser.add_argument("--sf-grid", nargs="+", type=float, default=[],
                        help="also schedule-free AdamW at these fixed LRs (anchors named sf_adamw@LR)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed + seeds - 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=DEFAULT_JSON, help="gzip JSON of every run, written after each run")
    parser.add_argument("--no-share", dest="share", action="store_false",
                        help="measure tasks that are the same experiment under a replaced optimizer separately")
    parser.add_argument("--from-json", nargs="+", default=[], help="only print the table of saved files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_chaos", *logging.root.manager.loggerDict):
        if name.startswith(("lightning", "dog")):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.from_json:
        merged: dict[str, Any] = {"meta": [], "runs": {}, "finders": {}}
        for path in args.from_json:
            saved = load_run(path)
            merged["meta"] += saved["meta"]
            merged["runs"].update(saved["runs"])
            merged["finders"].update(saved["finders"])
        for meta in merged["meta"][-1:]:
            print("versions: " + ", ".join(f"{k} {meta.get(k)}" for k in (
                "torch", "lightning", "lightning_chaos", "prodigyopt", "dadaptation", "dog-optimizer", "schedulefree")))
        print(table(merged, args.anchors if args.anchors != list(DEFAULT_ANCHORS) else list(ANCHORS), args.tasks))
        grid = grid_table(merged, args.tasks)
        if grid:
            print("\nSchedule-free AdamW at fixed LRs (median τ, seeds that reached the target):")
            print(grid)
        return
    for lr in args.sf_grid:
        anchor = grid_anchor(lr)
        ANCHORS[anchor.name] = anchor
        args.anchors.append(anchor.name)
    if args.mlp:
        args.tasks = [*(args.tasks or []), *(name for name in tasks.TASKS if "cnn" not in name)]
    if not args.tasks:
        parser.error("name --tasks or --mlp")
    unknown = [name for name in args.tasks if name not in tasks.TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; tasks.TASKS has {list(tasks.TASKS)}")
    started = time.perf_counter()
    results = run(args)
    print()
    print(table(results, args.anchors, args.tasks))
    grid = grid_table(results, args.tasks)
    if grid:
        print("\nSchedule-free AdamW at fixed LRs (median τ, seeds that reached the target):")
        print(grid)
    print(f"\nTotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
