"""Per-step overhead of ChaosProbe before and after a change to the package, both versions in one process.

What is compared
----------------
Two versions of ``lightning_chaos`` run side by side in this process:

* **before**: the package at a git revision (``--before``, default ``HEAD``), exported with ``git archive`` into a
  temporary directory and renamed ``lightning_chaos_before``. Its imports of ``lightning_chaos`` are rewritten to
  ``lightning_chaos_before`` (only ``from lightning_chaos...`` and ``import lightning_chaos...`` statements), and the
  script checks after importing it that none of its modules reaches into the working tree's package.
* **after**: the working tree's ``lightning_chaos``, imported as usual.

Arms, each its own ``Trainer.fit`` of the quickstart model: ``none`` (plain training), ``beforeK`` and ``afterK``
(``ChaosProbe(num_shadows=K)`` of that version, its other arguments at their defaults, so ``vectorize="auto"``), for
each K of ``--shadows`` (default 4, the quickstart's, and 1). The model and data are ``bench_probe.MODELS["digits"]``:
the quickstart MLP 64-128-10 (tanh, dropout 0.1, SGD) on ``DigitsDataModule(batch_size=64)``, 22 optimizer steps per
epoch. The Trainer logs every ``--log-every-n-steps`` (5, the quickstart's: the probe computes its metrics at that
cadence), with ``logger=False``, no validation, no checkpointing and no progress bar, as in ``bench_probe.py``.

What is timed
-------------
Whole training epochs: a callback listed before the probe stamps ``time.perf_counter()`` and ``time.process_time()``
at ``on_train_epoch_start``, one listed after it at ``on_train_epoch_end``, so an epoch's interval holds every step's
hooks and the probe's epoch-end work. Per-step time = the measured epochs' summed time / their optimizer steps.

Only steady-state steps are measured: the first epoch is dropped (``on_fit_start`` copies, the first vmap calls), and
so is every epoch that starts before the end of the after-probe's ``sentinel_steps`` window (a check that runs for
the first N steps only), when that version has the argument. ``--sentinel-steps`` passes a value to each version that
accepts the argument; by default each keeps its own default. A version without the argument is simply built without
it.

Noise handling: every arm runs once per round, for ``--rounds`` rounds, in one fixed order that is reversed in every
other round (so before and after each run first half of the time). Overheads (probed step − plain step) and their
ratios are formed within a round and summarised by the median over rounds with the range; the ratio of the median
overheads is reported next to it, and so is the ratio of the overheads of each arm's fastest round (contention only
adds time). The per-round times are printed, and a warning says when the load average shows other processes on the
cores: on a shared 2-core machine a round that another job lands on can take ten times longer.

Usage
-----
    python benchmarks/bench_mirror.py                                   # 7 rounds, K = 4 and 1, 2 torch threads
    python benchmarks/bench_mirror.py --rounds 3 --epochs 8 --json /tmp/mirror_check.json   # a quick check
    python benchmarks/bench_mirror.py --before 10ec848        # against the last commit before the mirroring engine
    python benchmarks/bench_mirror.py --before 10ec848 --sentinel-steps 10

Writes ``benchmarks/results/mirror_overhead_cpu.json`` by default (``--json``).
"""

import argparse
import importlib
import inspect
import io
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import lightning.pytorch as pl
from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_probe import MODELS, environment, ratio_stats, write_json  # noqa: E402

import lightning_chaos  # noqa: E402  (the "after": the working tree's package)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_chaos"
RENAMED = "lightning_chaos_before"
MODEL = "digits"
_IMPORT = re.compile(rf"^(\s*)(from|import)(\s+){PACKAGE}(?=[\s.,]|$)", re.MULTILINE)
_UNRENAMED = re.compile(rf"^\s*(from|import)\s+{PACKAGE}(?![\w])", re.MULTILINE)

# -- the "before" package --------------------------------------------------------------------------------------------


def export_before(ref: str, into: str) -> str:
    """``git archive ref lightning_chaos`` extracted into ``into`` as ``lightning_chaos_before``, its imports of the
    package renamed; the commit it came from."""
    rev_parse = ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"]
    commit = subprocess.run(rev_parse, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, PACKAGE], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(into)
    target = Path(into) / RENAMED
    (Path(into) / PACKAGE).rename(target)
    for path in target.rglob("*.py"):
        text = _IMPORT.sub(rf"\1\2\3{RENAMED}", path.read_text())
        left = _UNRENAMED.findall(text)
        if left:
            raise RuntimeError(f"{path}: an import of {PACKAGE} was not renamed")
        path.write_text(text)
    return commit


def import_before(directory: str) -> types.ModuleType:
    """Import the renamed package and check that none of its modules holds an object of the working tree's."""
    sys.path.insert(0, directory)
    try:
        package = importlib.import_module(RENAMED)
    finally:
        sys.path.remove(directory)
    for name, module in list(sys.modules.items()):
        if not (name == RENAMED or name.startswith(RENAMED + ".")):
            continue
        if not os.path.abspath(module.__file__ or "").startswith(os.path.abspath(directory)):
            raise RuntimeError(f"{name} was imported from {module.__file__}, not from the export")
        for attribute, value in vars(module).items():
            owner = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(owner, str) and (owner == PACKAGE or owner.startswith(PACKAGE + ".")):
                raise RuntimeError(f"{name}.{attribute} comes from the working tree's {owner}")
    return package


def sentinel_default(probe_class: type) -> Optional[int]:
    """The default of the probe's ``sentinel_steps``, or None when this version has no such argument."""
    parameter = inspect.signature(probe_class.__init__).parameters.get("sentinel_steps")
    if parameter is None:
        return None
    default = parameter.default
    return default if isinstance(default, int) and not isinstance(default, bool) else 0


def make_probe(probe_class: type, shadows: int, sentinel_steps: Optional[int]) -> Callback:
    kwargs: dict[str, Any] = {"num_shadows": shadows}
    if sentinel_steps is not None and sentinel_default(probe_class) is not None:
        kwargs["sentinel_steps"] = sentinel_steps
    return probe_class(**kwargs)


# -- one fit ---------------------------------------------------------------------------------------------------------


class EpochStamps:
    """Wall and CPU time of each training epoch: ``opener`` goes first in the callback list, ``closer`` last, so that
    an epoch's interval holds every other callback's epoch hooks."""

    def __init__(self, sync_cuda: bool) -> None:
        self.sync_cuda = sync_cuda
        self.epochs: list[dict[str, float]] = []
        self._start: tuple[int, float, float] = (0, 0.0, 0.0)
        stamps = self

        class Opener(Callback):
            def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
                stamps._start = (trainer.global_step, *stamps._now())

        class Closer(Callback):
            def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
                wall, cpu = stamps._now()
                step, wall0, cpu0 = stamps._start
                steps = trainer.global_step - step
                stamps.epochs.append({"first_step": step, "steps": steps, "wall_s": wall - wall0, "cpu_s": cpu - cpu0})

        self.opener, self.closer = Opener(), Closer()

    def _now(self) -> tuple[float, float]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


def run_fit(arm: str, probe: Optional[Callback], epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    _, make_model, make_data = MODELS[MODEL]
    pl.seed_everything(0, verbose=False)
    model, data = make_model(), make_data()
    stamps = EpochStamps(sync_cuda=args.device == "cuda")
    callbacks = [stamps.opener] + ([probe] if probe is not None else []) + [stamps.closer]
    trainer = Trainer(
        accelerator=args.device,
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=args.log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    result: dict[str, Any] = {"arm": arm, "epochs": stamps.epochs, "loadavg_1min_after": os.getloadavg()[0]}
    if probe is not None:
        result["lyapunov"] = float(probe.lyapunov_exponent)
    return result


def per_step(fit: dict[str, Any], skip_before_step: int) -> dict[str, Any]:
    """Per-step wall and CPU time over the epochs after the first that start at or after ``skip_before_step``."""
    kept = [e for e in fit["epochs"][1:] if e["first_step"] >= skip_before_step and e["steps"] > 0]
    if not kept:
        raise RuntimeError(f"{fit['arm']}: no epoch left to measure; raise --epochs")
    steps = sum(e["steps"] for e in kept)
    return {
        "wall_s": sum(e["wall_s"] for e in kept) / steps,
        "cpu_s": sum(e["cpu_s"] for e in kept) / steps,
        "wall_epoch_median_s": statistics.median(e["wall_s"] / e["steps"] for e in kept),
        "measured_steps": steps,
        "first_measured_step": kept[0]["first_step"],
    }


# -- report ------------------------------------------------------------------------------------------------------------


def lscpu_model_name() -> Optional[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def working_tree_changes() -> dict[str, str]:
    git = ["git", "-C", str(REPO)]
    status = subprocess.run(git + ["status", "--porcelain", PACKAGE], capture_output=True, text=True).stdout
    stat = subprocess.run(git + ["diff", "--stat", "HEAD", "--", PACKAGE], capture_output=True, text=True).stdout
    return {"status": status.strip(), "diff_stat": stat.strip()}


def summarize(fits: list[dict[str, Any]], shadows: list[int]) -> dict[str, Any]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for fit in fits:
        by_round.setdefault(fit["round"], {})[fit["arm"]] = fit["per_step"]
    rounds = sorted(by_round)

    def median_ms(arm: str, stat: str) -> float:
        return statistics.median(by_round[r][arm][stat] for r in rounds) * 1e3

    summary: dict[str, Any] = {}
    for stat in ("wall_s", "cpu_s"):
        plain = median_ms("none", stat)
        rows: dict[str, Any] = {}
        for k in shadows:
            before, after = f"before{k}", f"after{k}"
            over_before = [by_round[r][before][stat] - by_round[r]["none"][stat] for r in rounds]
            over_after = [by_round[r][after][stat] - by_round[r]["none"][stat] for r in rounds]
            ratios = [a / b if b > 0 else float("nan") for a, b in zip(over_after, over_before)]
            share = [a / by_round[r]["none"][stat] for a, r in zip(over_after, rounds)]
            oh_before, oh_after = statistics.median(over_before) * 1e3, statistics.median(over_after) * 1e3
            # contention only adds time: the fastest round of each arm is the least disturbed estimate
            fastest = {arm: min(by_round[r][arm][stat] for r in rounds) for arm in ("none", before, after)}
            min_before, min_after = fastest[before] - fastest["none"], fastest[after] - fastest["none"]
            rows[str(k)] = {
                "plain_ms": plain,
                "before_ms": median_ms(before, stat),
                "after_ms": median_ms(after, stat),
                "before_overhead_ms": oh_before,
                "after_overhead_ms": oh_after,
                "overhead_after_over_before_per_round": ratio_stats(ratios),
                "overhead_after_over_before_of_medians": oh_after / oh_before if oh_before > 0 else float("nan"),
                "fastest_ms": {arm: value * 1e3 for arm, value in fastest.items()},
                "overhead_after_over_before_of_minima": min_after / min_before if min_before > 0 else float("nan"),
                "after_overhead_pct_of_plain_per_round": {k2: 100 * v for k2, v in ratio_stats(share).items()},
                "after_overhead_pct_of_plain_of_medians": 100 * oh_after / plain,
                "before_overhead_pct_of_plain_of_medians": 100 * oh_before / plain,
            }
        summary[stat[: -len("_s")]] = rows
    lyapunov: dict[str, float] = {}
    for arm in sorted({f["arm"] for f in fits} - {"none"}):
        values = [f["lyapunov"] for f in fits if f["arm"] == arm and "lyapunov" in f]
        lyapunov[arm] = statistics.median(values)
    summary["lyapunov_median"] = lyapunov
    return summary


def print_table(summary: dict[str, Any], args: argparse.Namespace, rounds: int) -> None:
    for stat, title in (("wall", "wall time"), ("cpu", "process CPU time")):
        print(f"\nChaosProbe overhead per optimizer step, {title}: medians over {rounds} rounds; overhead = probed step"
              " - plain step of the same round; per-round ratios as median [range]\n")
        print("| K | plain ms/step | before ms/step | after ms/step | before overhead ms | after overhead ms"
              " | after / before overhead, per round | after / before, of medians | after / before, of minima"
              " | after overhead % of plain, per round | after overhead % of plain, of medians |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for k, row in summary[stat].items():
            r = row["overhead_after_over_before_per_round"]
            p = row["after_overhead_pct_of_plain_per_round"]
            print(
                f"| {k} | {row['plain_ms']:.3f} | {row['before_ms']:.3f} | {row['after_ms']:.3f}"
                f" | {row['before_overhead_ms']:.3f} | {row['after_overhead_ms']:.3f}"
                f" | {r['median']:.3f} [{r['min']:.2f}–{r['max']:.2f}]"
                f" | {row['overhead_after_over_before_of_medians']:.3f}"
                f" | {row['overhead_after_over_before_of_minima']:.3f}"
                f" | {p['median']:.1f} [{p['min']:.1f}–{p['max']:.1f}]"
                f" | {row['after_overhead_pct_of_plain_of_medians']:.1f} |"
            )
    print("\nΛ per step (median over rounds): "
          + ", ".join(f"{arm} {value:+.5f}" for arm, value in summary["lyapunov_median"].items()))


def bookkeeping_micro(repeats: int = 20000) -> dict[str, float]:
    """Microseconds per step of what the mirroring adds besides running the shadow's own hooks: following the real
    run from outside (flags, modes, param groups, hyperparameters), each piece called ``repeats`` times in a tight
    loop on an attached probe of the quickstart model (K = 1). Stable where whole-step timings on a shared machine
    are not."""
    timings: dict[str, float] = {}

    class Measure(Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            probe = next(c for c in trainer.callbacks if isinstance(c, lightning_chaos.ChaosProbe))
            ensemble, sync = probe._ensemble, probe._ensemble.optimizer_sync

            def per_call(fn: Any) -> float:
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                return (time.perf_counter() - start) / repeats * 1e6

            timings["batch start: flags, new param groups, changes since"] = per_call(ensemble.capture_outside)
            timings["on_before_optimizer_step: changes during the batch"] = per_call(sync.changes)
            timings["after the real step: its record"] = per_call(sync.rebase)
            timings["batch end: changes since the step, given, record"] = per_call(
                lambda: (ensemble._give(0, ensemble._changes_since_the_batch_began()), ensemble._renew_record([{}])))
            timings["every batch: train/eval flags and optimizer modes"] = per_call(
                lambda: (ensemble.module_sync.apply(ensemble.members[0]), ensemble.sync_optimizer_modes()))

    _, make_model, make_data = MODELS[MODEL]
    trainer = Trainer(max_epochs=1, callbacks=[lightning_chaos.ChaosProbe(num_shadows=1), Measure()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)
    trainer.fit(make_model(), datamodule=make_data())
    timings["total"] = sum(timings.values())
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git revision of the 'before' package (default HEAD)")
    parser.add_argument("--shadows", nargs="+", type=int, default=[4, 1], help="num_shadows of the probes")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each runs every arm once")
    parser.add_argument("--epochs", type=int, default=16, help="epochs per fit (22 steps each); the first is dropped")
    parser.add_argument("--sentinel-steps", type=int, default=None,
                        help="sentinel_steps for each version that accepts it (default: each version's default)")
    parser.add_argument("--log-every-n-steps", type=int, default=5, help="the Trainer's (5: the quickstart's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/mirror_overhead_<device>.json")
    args = parser.parse_args()
    if args.json is None:
        args.json = str(REPO / "benchmarks" / "results" / f"mirror_overhead_{args.device}.json")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="bench_mirror_") as tmpdir:
        before_commit = export_before(args.before, tmpdir)
        before = import_before(tmpdir)
        versions = {"before": before.ChaosProbe, "after": lightning_chaos.ChaosProbe}
        sentinels = {name: sentinel_default(cls) for name, cls in versions.items()}
        window = max([args.sentinel_steps or 0] + [s or 0 for s in sentinels.values()])

        env = environment(args)
        env["lscpu_model_name"] = lscpu_model_name()
        env["loadavg_at_start"] = os.getloadavg()
        env["before"] = {"ref": args.before, "commit": before_commit, "sentinel_steps_default": sentinels["before"]}
        env["after"] = {"working_tree": working_tree_changes(), "sentinel_steps_default": sentinels["after"]}
        print(json.dumps(env))

        arms = ["none"] + [f"{version}{k}" for k in args.shadows for version in ("before", "after")]

        def fit(arm: str, epochs: int) -> dict[str, Any]:
            probe = None
            if arm != "none":
                version, k = re.fullmatch(r"(before|after)(\d+)", arm).groups()
                probe = make_probe(versions[version], int(k), args.sentinel_steps)
            return run_fit(arm, probe, epochs, args)

        for arm in arms:  # untimed: imports, allocator and vmap caches warm
            fit(arm, 2)
        fits: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                result = fit(arm, args.epochs)
                result["round"] = r
                result["per_step"] = per_step(result, window)
                fits.append(result)
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    micro = bookkeeping_micro()
    summary = summarize(fits, args.shadows)
    first = fits[0]["per_step"]
    print(f"\n{MODELS[MODEL][0]}; {args.epochs} epochs per fit, measured from step {first['first_measured_step']}"
          f" ({first['measured_steps']} steps; sentinel window {window} steps);"
          f" {torch.get_num_threads()} torch threads")
    print_table(summary, args, args.rounds)
    print("\nwall ms/step per round: " + "; ".join(
        f"{arm} " + " ".join(f"{f['per_step']['wall_s'] * 1e3:.2f}" for f in fits if f["arm"] == arm) for arm in arms
    ))
    print("\nWhat following the real run from outside costs per step (K = 1, tight loop):")
    for name, microseconds in micro.items():
        print(f"  {name:55s} {microseconds:6.1f} us")
    busiest = max(f["loadavg_1min_after"] for f in fits)
    own = torch.get_num_threads()
    if busiest > max(os.cpu_count() or 1, own) + 0.5:  # this run's own threads count in the load average too
        print(f"\nWARNING: the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores ({own} threads"
              " of them this run's): other processes shared the cores; read the per-round times before the ratios.")
    env["loadavg_at_end"] = os.getloadavg()  # a shared machine's load: wall times under load are not comparable
    output = {"environment": env, "args": vars(args), "arms": arms, "sentinel_window_steps": window,
              "fits": fits, "summary": summary, "bookkeeping_us_per_step": micro}
    write_json(output, args.json)


if __name__ == "__main__":
    main()
