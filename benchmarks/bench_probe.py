"""Per-optimizer-step overhead of ChaosProbe, against no probe and against the "physics floor".

What is timed
-------------
The wall time of one optimizer step of a real Lightning ``Trainer.fit``, measured by a ``StepTimer`` callback that
records ``time.perf_counter()`` in ``on_train_batch_start``. The interval between two consecutive batch starts is one
whole training-loop iteration: the batch transfer, ``training_step``, backward, the optimizer step, every callback's
``on_train_batch_end`` (the probe's lockstep shadow steps live there), the loop's own logging and the fetch of the
next batch. Setup (Trainer construction, ``on_fit_start`` deep copies, data module setup) and teardown are outside
the measured window. The first ``--warmup`` steps are discarded; the next ``--steps`` intervals are kept. Validation
is switched off (``limit_val_batches=0``, no sanity check) so that only training steps are timed.

Three statistics per fit:

* ``amortized``: (time of the last batch start − time of the first measured one) / steps. This is the mean step time
  and includes periodic costs (the probe's and Lightning's logging every ``log_every_n_steps``, epoch boundaries). It
  is the headline number: a periodic cost hidden by a median is still a cost.
* ``median``: the median of the individual step intervals (a typical step, insensitive to rare stalls).
* ``CPU amortized``: the same window measured with ``time.process_time()`` (CPU time of this process, all its
  threads). When other processes share the cores, wall time counts the time the scheduler gave to them; CPU time
  does not, so this is the noise-robust number on a shared CPU machine, and with ``--threads 1`` and nothing
  asynchronous it equals the wall time of a quiet machine. It misses time spent waiting (GPU, I/O): on CUDA read the
  wall columns.

On CUDA the timer calls ``torch.cuda.synchronize()`` before each timestamp, so every interval holds the GPU work of
its step (the GPU is otherwise asynchronous and the CPU would run ahead).

Noise handling (a shared 2-core machine drifts by ±30-60 % between minutes): every configuration runs once per
round, in a freshly shuffled order, all in one process, for ``--rounds`` rounds. Ratios are formed *within* a round
(same minute, same machine state) and the report gives the median over rounds of those ratios, with the range.
The multiplexed design (``--mux``) goes further: all arms (``none``, ``floorK``, ``probeK``) run inside ONE fit, and a
forwarding callback hands the per-step hooks to one arm at a time, in segments of ``--segment`` steps (the first
``--drop`` of each not counted), in a fresh random order in each of ``--cycles`` cycles. Ratios are formed per cycle,
between arms a few hundred milliseconds apart, which makes them far tighter on a shared machine. Every arm is set up
at fit start and receives the non-per-step hooks; an inactive arm's shadows simply skip steps, which changes no cost.
Use ``--threads 1`` on a shared machine: with 2 intra-op threads on 2 cores that other processes also use, torch's
thread pool waits on descheduled workers and a step takes several times longer (seen here: 24 s instead of 2 s per
fit); a 64-128-10 MLP gains nothing from a second thread anyway.

Configurations (per model)
--------------------------
* ``none``         plain training, ``logger=False``.
* ``none+tb``      plain training with a ``TensorBoardLogger`` writing into a temporary directory.
* ``floorK``       the physics floor with K copies: a minimal callback that deep-copies the module and builds a fresh
                   optimizer of the same class at fit start, and in ``on_train_batch_end`` runs each copy's
                   ``training_step`` / ``zero_grad`` / ``backward`` / ``optimizer.step`` on the same batch. It measures
                   nothing, replays no RNG, copies no hyperparameters, never clips. Its ``log`` is a no-op, as in the
                   probe's shadows. This is the least any lockstep method must pay.
* ``probeK``       ``ChaosProbe(num_shadows=K)`` with its defaults (``log_every_n_steps`` follows the Trainer's 50),
                   ``logger=False`` (the probe still computes its metrics every 50 steps; it just has nowhere to send
                   them).
* ``probe1+tb``    ``ChaosProbe(num_shadows=1)`` with the TensorBoardLogger.
* ``probeK@logN``  (``--extra``) ``ChaosProbe(num_shadows=K, log_every_n_steps=N)``; the quickstart example logs every
                   5 steps, and every probe log runs the best-R² window fit over the whole recorded history.

Models
------
* ``digits``: the quickstart model, ``MLPClassifier(hidden=(128,), dropout=0.1)`` (64-128-10, tanh, SGD lr 0.1, no
  momentum) on ``DigitsDataModule(batch_size=64)`` (scikit-learn's real 8x8 digits, 21 full batches and one of 4
  per epoch).
* ``mlp784``: ``MLPClassifier(in_features=784, hidden=(100,))`` (784-100-10, tanh, no dropout, SGD, no momentum) on
  4096 random 784-dim inputs with random labels, batch 64, shuffled.
* ``cnn`` (optional, meant for the GPU): the PyTorch MNIST-example network (conv 1→32→64, 3x3, max-pool, dropout,
  9216→128→10, 1.2 M parameters), SGD with momentum 0.9, on 2048 random 1x28x28 inputs, batch 64.

Memory
------
Every copy (the real model and each shadow) holds its parameters, their gradients and the optimizer state, so the
probe's extra memory is K x (parameters + gradients + optimizer state) bytes, the total (1+K) x that (activations of
the shadows' steps are freed before the next shadow runs). The script prints those bytes, checks them against the
tensors the probe actually holds, and, on CUDA, reports ``torch.cuda.max_memory_allocated`` above the pre-fit baseline
per configuration.

Extra modes
-----------
``--breakdown`` times the probe's pieces inside real fits (``digits`` model, K=1) by wrapping its functions in
this process only (the package is not modified): the probe's hooks, the ensemble's ``forward_backward`` /
``optimizer_step`` / ``distances``, the RNG capture and replay, the shadow's ``training_step``, ``zero_grad`` and
``step``, and the same pieces of the floor. ``--cprofile N`` prints the N costliest functions under the probe's
``on_train_batch_end`` (cProfile enabled only inside that hook). ``--micro`` times the per-step pieces in isolation
(RNG capture/replay, the precision context, the hyperparameter copy, the clipping call, ``loss / 1`` before
backward, ``ensemble.distances()`` against a batched one-``foreach`` alternative, ``_log`` with 1000 recorded steps)
on the state a real fit left behind.

Usage
-----
    python benchmarks/bench_probe.py                              # CPU, digits + mlp784, K = 1, 2, 4, 8, 1 thread
    python benchmarks/bench_probe.py --models digits --steps 200 --rounds 9 --json results_cpu.json
    python benchmarks/bench_probe.py --device cuda --models digits mlp784 cnn --json $OUT/results.json
    python benchmarks/bench_probe.py --skip-main --mux --cycles 30 --extra probe1@log5   # multiplexed design
    python benchmarks/bench_probe.py --skip-main --breakdown --micro --cprofile 30 --rounds 5
"""

import argparse
import contextlib
import copy
import cProfile
import datetime
import functools
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning
import lightning.pytorch as pl
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_chaos
import lightning_chaos.shadow as shadow_module
from lightning_chaos import ChaosProbe
from lightning_chaos.demo import DigitsDataModule, MLPClassifier

# -- data and models -------------------------------------------------------------------------------------------------


class RandomDataModule(LightningDataModule):
    """``size`` random inputs of shape ``shape`` with random labels in 10 classes (values do not change the cost)."""

    def __init__(self, shape: tuple[int, ...], size: int = 4096, batch_size: int = 64) -> None:
        super().__init__()
        self.shape, self.size, self.batch_size = shape, size, batch_size

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(self.size, *self.shape, generator=generator)
        y = torch.randint(0, 10, (self.size,), generator=generator)
        self.train_set = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class SmallCNN(LightningModule):
    """The PyTorch MNIST example's network, trained with SGD + momentum; logs ``train_loss`` like MLPClassifier."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(LightningModule):
    """ResNet-18 for 32x32 inputs (CIFAR stem: one 3x3 conv, no max-pool), 11.2 M parameters, BatchNorm in training
    mode; SGD with momentum 0.9 and weight decay 5e-4, as in the usual CIFAR-10 recipe."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


MODELS: dict[str, tuple[str, Callable[[], LightningModule], Callable[[], LightningDataModule]]] = {
    "digits": (
        "quickstart MLP 64-128-10 tanh, dropout 0.1, SGD; sklearn digits, batch 64",
        lambda: MLPClassifier(hidden=(128,), dropout=0.1),
        lambda: DigitsDataModule(batch_size=64),
    ),
    "mlp784": (
        "MLP 784-100-10 tanh, SGD; random 784-dim inputs, batch 64",
        lambda: MLPClassifier(in_features=784, hidden=(100,)),
        lambda: RandomDataModule((784,)),
    ),
    "cnn": (
        "CNN conv32-conv64-fc128 (1.2 M params), SGD momentum 0.9; random 1x28x28 inputs, batch 64",
        lambda: SmallCNN(),
        lambda: RandomDataModule((1, 28, 28), size=2048),
    ),
    "resnet18": (
        "ResNet-18 (11.2 M params, BatchNorm), SGD momentum 0.9, wd 5e-4; random 3x32x32 inputs, batch 128",
        lambda: ResNet18(),
        lambda: RandomDataModule((3, 32, 32), size=4096, batch_size=128),
    ),
}

# -- callbacks -------------------------------------------------------------------------------------------------------


def _no_log(*_: Any, **__: Any) -> None:
    pass


class FloorCallback(Callback):
    """The physics floor: K deep copies stepped on the same batch, measuring nothing (see the module docstring)."""

    def __init__(self, copies: int = 1) -> None:
        self.num_copies = copies
        self.copies: list[tuple[LightningModule, torch.optim.Optimizer]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.copies = []
        for _ in range(self.num_copies):
            module = copy.deepcopy(pl_module)
            module.log = _no_log  # type: ignore[method-assign]
            module.log_dict = _no_log  # type: ignore[method-assign]
            self.copies.append((module, type(optimizer)(module.parameters(), **optimizer.defaults)))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for module, optimizer in self.copies:
            loss = module.training_step(batch, batch_idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


class StepTimer(Callback):
    """Timestamps every batch start (synchronising CUDA first); see the module docstring."""

    def __init__(self, sync_cuda: bool) -> None:
        self.sync_cuda = sync_cuda
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())


# -- one fit ---------------------------------------------------------------------------------------------------------


def config_names(shadows: list[int], floor_for_all: bool, extra: list[str]) -> list[str]:
    names = ["none", "none+tb", "floor1", "probe1", "probe1+tb"] + list(extra)
    for k in shadows:
        if k == 1:
            continue
        if floor_for_all:
            names.append(f"floor{k}")
        names.append(f"probe{k}")
    return names


def make_callback(config: str) -> Optional[Callback]:
    base = config.split("+")[0]
    if base == "none":
        return None
    if base.startswith("floor"):
        return FloorCallback(int(base[len("floor") :]))
    if base.startswith("probe"):  # probeK, probeK@logN (log_every_n_steps=N), probeK@seq / probeK@vec (vectorize)
        shadows, *options = base[len("probe") :].split("@")
        kwargs: dict[str, Any] = {}
        for option in options:
            if option.startswith("log"):
                kwargs["log_every_n_steps"] = int(option[len("log") :])
            elif option in ("seq", "vec"):
                kwargs["vectorize"] = option == "vec"
            else:
                raise ValueError(config)
        return ChaosProbe(num_shadows=int(shadows), **kwargs)
    raise ValueError(config)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, Tensor) and v.dim() > 0
    )


def run_fit(
    model_name: str, config: str, args: argparse.Namespace, tmpdir: str, extra: Optional[list[Callback]] = None
) -> dict[str, Any]:
    _, make_model, make_data = MODELS[model_name]
    cuda = args.device == "cuda"
    gc.collect()
    pl.seed_everything(0, verbose=False)
    model, data = make_model(), make_data()
    timer = StepTimer(sync_cuda=cuda)
    callbacks: list[Callback] = [timer]
    main_cb = make_callback(config)
    if main_cb is not None:
        callbacks.append(main_cb)
    callbacks += extra or []
    logger: Any = False
    if config.endswith("+tb"):
        logger = TensorBoardLogger(tmpdir, name=f"{model_name}_{config}")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.warmup + args.steps + 1,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    starts = timer.starts[args.warmup :]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    assert len(intervals) == args.steps, (len(timer.starts), args.warmup, args.steps)
    cpu_starts = timer.cpu_starts[args.warmup :]
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    per_copy = 2 * param_bytes + state_bytes(trainer.optimizers[0])  # parameters + gradients + optimizer state
    result: dict[str, Any] = {
        "model": model_name,
        "config": config,
        "amortized_s": (starts[-1] - starts[0]) / args.steps,
        "median_s": statistics.median(intervals),
        "cpu_amortized_s": (cpu_starts[-1] - cpu_starts[0]) / args.steps,
        "param_bytes": param_bytes,
        "bytes_per_copy": per_copy,
    }
    if isinstance(main_cb, ChaosProbe) and main_cb._ensemble is not None:
        ensemble = main_cb._ensemble
        held = sum(
            sum(p.numel() * p.element_size() * (1 + (p.grad is not None)) for p in ps) + state_bytes(o)
            for ps, o in zip(ensemble.shadow_params, ensemble.optimizers)
        )
        result["shadow_bytes_held"] = held
        result["shadow_bytes_formula"] = main_cb.num_shadows * per_copy
        result["lyapunov"] = main_cb.lyapunov_exponent
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - baseline
    return result


# -- multiplexed mode --------------------------------------------------------------------------------------------------


class Multiplexer(Callback):
    """Runs several "arms" (None, a floor, a probe, ...) inside ONE fit, switching the active arm every segment.

    Non-per-step hooks (setup, fit start, epoch/validation/train end) reach every arm, so every arm is set up as in its
    own fit. The per-step hooks (``on_train_batch_start``, ``on_before_optimizer_step``, ``on_train_batch_end``) reach
    only the active arm: on its segments an arm does exactly the work it does on every step of a real fit. Inactive
    shadows simply skip steps (they leave lockstep, which changes no cost). Segments rotate in a fresh random order
    every cycle, so noise of more than a few hundred milliseconds hits every arm alike.
    """

    def __init__(self, arms: dict[str, Optional[Callback]], segment: int, cycles: int, seed: int = 0) -> None:
        self.arms = arms
        self.schedule: list[tuple[int, str]] = []  # (cycle, arm) per step; cycle 0 is the warm-up
        rng = random.Random(seed)
        for cycle in range(cycles + 1):
            order = list(arms)
            rng.shuffle(order)
            for name in order:
                self.schedule += [(cycle, name)] * segment
        self.step = -1

    @property
    def max_steps(self) -> int:
        return len(self.schedule) + 1

    def _all(self) -> list[Callback]:
        return [cb for cb in self.arms.values() if cb is not None]

    def _active(self) -> Optional[Callback]:
        return self.arms[self.schedule[min(self.step, len(self.schedule) - 1)][1]]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for cb in self._all():
            cb.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for cb in self._all():
            cb.on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.step += 1
        cb = self._active()
        if cb is not None:
            cb.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        cb = self._active()
        if cb is not None:
            cb.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        cb = self._active()
        if cb is not None:
            cb.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for cb in self._all():
            cb.on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for cb in self._all():
            cb.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for cb in self._all():
            cb.on_train_end(trainer, pl_module)


def run_mux(model_name: str, arm_names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    _, make_model, make_data = MODELS[model_name]
    cuda = args.device == "cuda"
    gc.collect()
    pl.seed_everything(0, verbose=False)
    model, data = make_model(), make_data()
    arms = {name: make_callback(name) for name in arm_names}
    mux = Multiplexer(arms, args.segment, args.cycles)
    timer = StepTimer(sync_cuda=cuda)
    trainer = Trainer(
        accelerator=args.device, devices=1, max_steps=mux.max_steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer, mux],
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - t0
    wall = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    cpu = [b - a for a, b in zip(timer.cpu_starts, timer.cpu_starts[1:])]
    assert len(wall) == len(mux.schedule), (len(wall), len(mux.schedule))
    # per (cycle, arm): the mean of the kept steps of its segment (the first --drop steps of a segment are dropped)
    per: dict[tuple[int, str], dict[str, list[float]]] = {}
    position = 0
    for i, (cycle, arm) in enumerate(mux.schedule):
        position = position + 1 if i > 0 and mux.schedule[i - 1] == (cycle, arm) else 0
        if cycle == 0 or position < args.drop:
            continue
        entry = per.setdefault((cycle, arm), {"wall": [], "cpu": []})
        entry["wall"].append(wall[i])
        entry["cpu"].append(cpu[i])
    table = {}
    for arm in arm_names:
        cells = [v for (c, a), v in per.items() if a == arm]
        table[arm] = {
            "wall_ms": statistics.median(statistics.fmean(v["wall"]) for v in cells) * 1e3,
            "wall_median_step_ms": statistics.median(x for v in cells for x in v["wall"]) * 1e3,
            "cpu_ms": statistics.median(statistics.fmean(v["cpu"]) for v in cells) * 1e3,
        }
    ratios: dict[str, dict[str, dict[str, float]]] = {}

    def add(name: str, num: str, den: str) -> None:
        if num not in arm_names or den not in arm_names:
            return
        for stat in ("wall", "cpu"):
            values = [
                statistics.fmean(per[(c, num)][stat]) / statistics.fmean(per[(c, den)][stat])
                for c in range(1, args.cycles + 1)
            ]
            values.sort()
            q = len(values) // 4
            ratios.setdefault(name, {})[stat] = {
                "median": statistics.median(values), "q25": values[q], "q75": values[-1 - q],
            }

    add("floor1/none", "floor1", "none")
    add("probe1/none", "probe1", "none")
    add("probe1/floor1", "probe1", "floor1")
    for arm in arm_names:
        if arm.startswith("probe") and arm != "probe1":
            k = arm[len("probe") :].split("@")[0]
            if "@" not in arm:
                add(f"floor{k}/none", f"floor{k}", "none")
            add(f"{arm}/none", arm, "none")
            add(f"{arm}/floor{k}", arm, f"floor{k}")
            if "@" in arm:
                add(f"{arm}/probe{k}", arm, f"probe{k}")
    description = MODELS[model_name][0]
    return {"model": model_name, "description": description, "elapsed_s": elapsed, "table": table, "ratios": ratios}


def print_mux(result: dict[str, Any], args: argparse.Namespace) -> None:
    n = args.segment - args.drop
    print(f"\n== multiplexed, {result['model']}: {result['description']}  ({args.device}, {args.cycles} cycles x"
          f" {args.segment}-step segments per arm, {n} kept; one fit of {result['elapsed_s']:.0f} s)")
    print(f"  {'arm':10s} {'wall ms/step':>13s} {'wall median':>12s} {'CPU ms/step':>12s}")
    for arm, e in result["table"].items():
        print(f"  {arm:10s} {e['wall_ms']:13.3f} {e['wall_median_step_ms']:12.3f} {e['cpu_ms']:12.3f}")
    print(f"  {'ratio (per cycle; median [quartiles])':38s} {'wall':>22s} {'CPU':>22s}")
    for name, stats in result["ratios"].items():
        cells = [f"{v['median']:.3f} [{v['q25']:.2f}-{v['q75']:.2f}]" for v in (stats["wall"], stats["cpu"])]
        print(f"  {name:38s} {cells[0]:>22s} {cells[1]:>22s}")


# -- breakdown mode ----------------------------------------------------------------------------------------------------


class Timings:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.enabled = False
        self.sync = False

    def add(self, key: str, seconds: float) -> None:
        if self.enabled:
            self.total[key] = self.total.get(key, 0.0) + seconds
            self.calls[key] = self.calls.get(key, 0) + 1


TIMINGS = Timings()


def timed(key: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        if TIMINGS.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if TIMINGS.sync:
                torch.cuda.synchronize()
            TIMINGS.add(key, time.perf_counter() - t0)

    return wrapper


def timed_cm(key: str, cm_factory: Callable) -> Callable:
    """Times the entry and the exit of a context manager (not its body)."""

    @contextlib.contextmanager
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        cm = cm_factory(*a, **k)
        cm.__enter__()
        t1 = time.perf_counter()
        try:
            yield
        finally:
            t2 = time.perf_counter()
            cm.__exit__(None, None, None)
            TIMINGS.add(key, (t1 - t0) + (time.perf_counter() - t2))

    return wrapper


class InstanceWrapper(Callback):
    """Placed after the probe/floor: wraps the per-instance pieces (shadow training_step, zero_grad, step)."""

    def __init__(self, target: Callback) -> None:
        self.target = target

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(self.target, ChaosProbe):
            pairs = zip(self.target._ensemble.shadows, self.target._ensemble.optimizers)
            prefix = "probe"
        else:
            pairs = self.target.copies
            prefix = "floor"
        for module, optimizer in pairs:
            module.training_step = timed(f"{prefix}: copy.training_step (forward+loss)", module.training_step)
            optimizer.zero_grad = timed(f"{prefix}: optimizer.zero_grad", optimizer.zero_grad)
            optimizer.step = timed(f"{prefix}: optimizer.step", optimizer.step)
        TIMINGS.enabled = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        TIMINGS.enabled = False


def install_class_wrappers() -> None:
    """Wrap, in this process only, the probe's and the floor's functions that run on every step."""
    P, E = ChaosProbe, shadow_module.ShadowEnsemble
    P.on_train_batch_start = timed("probe: on_train_batch_start (capture_rng_state)", P.on_train_batch_start)
    P.on_before_optimizer_step = timed("probe: on_before_optimizer_step (copy hparams)", P.on_before_optimizer_step)
    P.on_train_batch_end = timed("probe: on_train_batch_end (whole lockstep)", P.on_train_batch_end)
    P._log = timed("probe: _log (every log_every_n_steps)", P._log)
    P._flush = timed("probe: _flush", P._flush)
    E.forward_backward = timed("probe: ensemble.forward_backward", E.forward_backward)
    E.optimizer_step = timed("probe: ensemble.optimizer_step", E.optimizer_step)
    E.distances = timed("probe: ensemble.distances", E.distances)
    shadow_module._preserved_rng = timed_cm("probe: _preserved_rng enter+exit", shadow_module._preserved_rng)
    FloorCallback.on_train_batch_end = timed("floor: on_train_batch_end (whole)", FloorCallback.on_train_batch_end)
    # Tensor.backward counts the real model's backward and the copies' (both go through Tensor.backward)
    Tensor.backward = timed("both: Tensor.backward (real model + copy)", Tensor.backward)


def run_breakdown(args: argparse.Namespace, tmpdir: str) -> dict[str, Any]:
    install_class_wrappers()
    TIMINGS.sync = args.device == "cuda"
    per_config: dict[str, list[dict[str, float]]] = {"probe1": [], "floor1": []}
    for r in range(args.rounds):
        order = ["probe1", "floor1"]
        random.Random(1000 + r).shuffle(order)
        for config in order:
            TIMINGS.total.clear()
            TIMINGS.calls.clear()
            cb = make_callback(config)
            _, make_model, make_data = MODELS[args.breakdown_model]
            pl.seed_everything(0, verbose=False)
            model, data = make_model(), make_data()
            timer = StepTimer(sync_cuda=args.device == "cuda")
            steps = args.warmup + args.steps + 1
            trainer = Trainer(
                accelerator=args.device, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
                num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[timer, cb, InstanceWrapper(cb)],
            )  # fmt: skip
            trainer.fit(model, datamodule=data)
            starts = timer.starts[args.warmup :]
            row = {k: v / steps * 1e6 for k, v in TIMINGS.total.items()}  # µs per optimizer step
            row["(step, amortized)"] = (starts[-1] - starts[0]) / args.steps * 1e6
            per_config[config].append(row)
    summary: dict[str, dict[str, float]] = {}
    for config, rows in per_config.items():
        keys = sorted({k for row in rows for k in row})
        summary[config] = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
    print(f"\nBreakdown ({args.breakdown_model}, K=1, µs per optimizer step, median of {args.rounds} fits each;")
    print("wrappers add ~1 µs per wrapped call; Tensor.backward counts the real model's backward and the copy's):")
    for config, row in summary.items():
        print(f"  [{config}]")
        for key, value in row.items():
            print(f"    {key:70s} {value:9.1f}")
    return summary


def run_cprofile(args: argparse.Namespace, tmpdir: str) -> str:
    """cProfile only inside ChaosProbe.on_train_batch_end, over one fit of the breakdown model with K=1."""
    profiler = cProfile.Profile()
    original = ChaosProbe.on_train_batch_end

    def profiled(self: ChaosProbe, *a: Any, **k: Any) -> None:
        profiler.enable()
        try:
            original(self, *a, **k)
        finally:
            profiler.disable()

    ChaosProbe.on_train_batch_end = profiled
    try:
        run_fit(args.breakdown_model, "probe1", args, tmpdir)
    finally:
        ChaosProbe.on_train_batch_end = original
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
    stats.print_stats(args.cprofile)
    text = stream.getvalue()
    steps = args.warmup + args.steps + 1
    print(f"\ncProfile of ChaosProbe.on_train_batch_end ({args.breakdown_model}, K=1, {steps} steps),"
          " sorted by own time:")
    print(text)
    return text


# -- micro mode --------------------------------------------------------------------------------------------------------


class _AtTrainEnd(Callback):
    """Runs ``fn(trainer)`` in on_train_end: the model is still on its device (teardown moves it back to the CPU)."""

    def __init__(self, fn: Callable[[Trainer], None]) -> None:
        self.fn = fn

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fn(trainer)


def _per_call_us(fn: Callable[[], Any], number: int, repeat: int = 7) -> float:
    """Median over ``repeat`` batches of ``number`` calls, in µs per call."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times) * 1e6


def batched_distances(real: list[Tensor], shadows: list[list[Tensor]], norm: str) -> Tensor:
    """A candidate for ShadowEnsemble.distances: one foreach over all K shadows, O(1) ops in K (same result)."""
    order = 2 if norm == "l2" else 1
    k, n = len(shadows), len(real)
    diffs = torch._foreach_sub([p for ps in shadows for p in ps], real * k)
    norms = torch.stack(torch._foreach_norm(diffs, order)).view(k, n)
    return torch.linalg.vector_norm(norms, order, dim=1)


def run_micro(args: argparse.Namespace, tmpdir: str) -> dict[str, float]:
    """Isolated per-call costs of the probe's per-step pieces, on the state left by a real fit."""
    from lightning_chaos.functional.distance import parameter_distance

    out: dict[str, float] = {}
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in (1, 8):
        probe = ChaosProbe(num_shadows=k)
        pl.seed_everything(0, verbose=False)
        _, make_model, make_data = MODELS[args.breakdown_model]
        model, data = make_model(), make_data()

        def measure(trainer: Trainer, k: int = k, probe: ChaosProbe = probe) -> None:
            ensemble = probe._ensemble
            n = 2000 if device.type == "cpu" else 500

            def timed_sync(fn: Callable[[], Any]) -> Callable[[], Any]:
                def g() -> Any:
                    fn()
                    sync()

                return g

            out[f"K={k} ensemble.distances()"] = _per_call_us(timed_sync(ensemble.distances), n)
            out[f"K={k} batched_distances (candidate)"] = _per_call_us(
                timed_sync(lambda: batched_distances(ensemble.real_params, ensemble.shadow_params, ensemble.norm)), n
            )
            ref = ensemble.distances()
            alt = batched_distances(ensemble.real_params, ensemble.shadow_params, ensemble.norm)
            out[f"K={k} max |batched - current| / current"] = float(((alt - ref).abs() / ref).max())
            if k == 1:
                out["K=1 parameter_distance (one shadow)"] = _per_call_us(
                    timed_sync(lambda: parameter_distance(ensemble.real_params, ensemble.shadow_params[0], "l2")), n
                )
                out["capture_rng_state"] = _per_call_us(lambda: shadow_module.capture_rng_state(device), n)
                state = shadow_module.capture_rng_state(device)

                def replay() -> None:
                    with shadow_module.replayed_rng(state, device):
                        pass

                out["replayed_rng enter+exit"] = _per_call_us(replay, n)
                plugin = trainer.precision_plugin

                def ctx() -> None:
                    with plugin.train_step_context():
                        pass

                out["precision_plugin.train_step_context enter+exit (per shadow)"] = _per_call_us(ctx, n)
                optimizer = trainer.optimizers[0]
                out["on_before_optimizer_step hparam copy"] = _per_call_us(
                    lambda: [{kk: v for kk, v in g.items() if kk != "params"} for g in optimizer.param_groups], n
                )
                hparams = [{kk: v for kk, v in g.items() if kk != "params"} for g in optimizer.param_groups]
                shadow, shadow_opt = ensemble.shadows[0], ensemble.optimizers[0]

                def update() -> None:
                    for group, values in zip(shadow_opt.param_groups, hparams):
                        group.update(values)

                out["param_group.update (per shadow)"] = _per_call_us(update, n)

                def clip() -> None:
                    s_ = ensemble.shadows[ensemble.optimizers.index(shadow_opt)]
                    s_.configure_gradient_clipping(
                        shadow_opt,
                        gradient_clip_val=trainer.gradient_clip_val,
                        gradient_clip_algorithm=trainer.gradient_clip_algorithm,
                    )

                out["clip closure, clipping off (per shadow)"] = _per_call_us(clip, n)
                batch = next(iter(trainer.train_dataloader))
                batch = [t.to(device) for t in batch]
                shadow_opt.zero_grad(set_to_none=True)

                def fwd_bwd(divide: bool) -> Callable[[], None]:
                    def g() -> None:
                        loss = shadow.training_step(batch, 0)
                        (loss / 1 if divide else loss).backward()
                        sync()

                    return g

                plain, divided = [], []
                for _ in range(5):  # interleaved
                    plain.append(_per_call_us(fwd_bwd(False), n // 4, repeat=1))
                    divided.append(_per_call_us(fwd_bwd(True), n // 4, repeat=1))
                out["shadow training_step + backward"] = statistics.median(plain)
                out["  same with loss / accumulate_grad_batches (=1)"] = statistics.median(divided)
                shadow_opt.zero_grad(set_to_none=True)
                # _log with a history of 1000 steps, as every log_every_n_steps
                probe._history = [torch.rand(1000, k, dtype=torch.float64) + 1.0]
                out["probe._log, 1000 recorded steps, no logger (per call)"] = _per_call_us(
                    lambda: probe._log(trainer), 50
                )
                out["probe.window_fit, 1000 recorded steps (per call)"] = _per_call_us(lambda: probe.window_fit, 50)

        trainer = Trainer(
            accelerator=args.device, devices=1, max_steps=60, max_epochs=-1, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[probe, _AtTrainEnd(measure)],
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
    print(f"\nMicro-benchmarks ({args.breakdown_model}, {args.device}, µs per call, median of 7 batches):")
    for key, value in out.items():
        print(f"  {key:62s} {value:10.2f}" if "max |" not in key else f"  {key:62s} {value:10.2e}")
    return out


# -- report ------------------------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightning_chaos": lightning_chaos.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
    }
    try:  # the package version measured: commit, and whether its files differ from it
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(lightning_chaos.__file__)))
        git = ["git", "-C", root]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        env["commit"] = head.stdout.strip()
        status = git + ["status", "--porcelain", "lightning_chaos"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout
        env["package_modified_since_commit"] = bool(dirty.strip())
    except OSError:
        pass
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


STATS = ("amortized_s", "median_s", "cpu_amortized_s")


def ratio_stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v == v]  # an incremental ratio is NaN when the floor added nothing that round
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


def summarize(
    results: list[dict[str, Any]], models: list[str], configs: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for model in models:
        rows = [r for r in results if r["model"] == model]
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in rows:
            by_round.setdefault(r["round"], {})[r["config"]] = r
        table = {}
        for config in configs:
            runs = [r for r in rows if r["config"] == config]
            entry = {
                "amortized_ms": statistics.median(r["amortized_s"] for r in runs) * 1e3,
                "median_ms": statistics.median(r["median_s"] for r in runs) * 1e3,
                "cpu_amortized_ms": statistics.median(r["cpu_amortized_s"] for r in runs) * 1e3,
                "amortized_ms_all_rounds": [round(r["amortized_s"] * 1e3, 4) for r in runs],
            }
            if "cuda_peak_bytes" in runs[0]:
                entry["cuda_peak_MiB"] = statistics.median(r["cuda_peak_bytes"] for r in runs) / 2**20
            table[config] = entry
        ratios: dict[str, Any] = {}

        def add_ratio(name: str, num: str, den: str, base: Optional[str] = None) -> None:
            for stat in STATS:
                values = []
                for cfgs in by_round.values():
                    if num in cfgs and den in cfgs and (base is None or base in cfgs):
                        if base is None:
                            values.append(cfgs[num][stat] / cfgs[den][stat])
                        else:
                            added = cfgs[den][stat] - cfgs[base][stat]
                            values.append((cfgs[num][stat] - cfgs[base][stat]) / added if added > 0 else float("nan"))
                if values:
                    ratios.setdefault(name, {})[stat[: -len("_s")]] = ratio_stats(values)

        add_ratio("floor1/none", "floor1", "none")
        add_ratio("probe1/none", "probe1", "none")
        add_ratio("probe1/floor1", "probe1", "floor1")
        add_ratio("(probe1-none)/(floor1-none)", "probe1", "floor1", base="none")
        add_ratio("none+tb/none", "none+tb", "none")
        add_ratio("probe1+tb/none+tb", "probe1+tb", "none+tb")
        for config in configs:
            if config.startswith("probe") and "+" not in config and config != "probe1":
                k = config[len("probe") :].split("@")[0]
                add_ratio(f"{config}/none", config, "none")
                reference = f"probe{k}" if "@" in config else "probe1"
                add_ratio(f"{config}/{reference}", config, reference)
                if "@" in config:
                    continue
                if f"floor{k}" in configs:
                    add_ratio(f"floor{k}/none", f"floor{k}", "none")
                    add_ratio(f"probe{k}/floor{k}", config, f"floor{k}")
                    add_ratio(f"(probe{k}-none)/(floor{k}-none)", config, f"floor{k}", base="none")
        first = rows[0]
        memory = {"param_bytes": first["param_bytes"], "bytes_per_copy": first["bytes_per_copy"]}
        for r in rows:
            if "shadow_bytes_held" in r:
                key = f"{r['config']}: shadow bytes held / formula K*per_copy"
                memory[key] = [r["shadow_bytes_held"], r["shadow_bytes_formula"]]
        summary[model] = {"description": MODELS[model][0], "table": table, "ratios": ratios, "memory": memory}
    return summary


def print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    for model, s in summary.items():
        print(f"\n== {model}: {s['description']}  ({args.device}, {args.rounds} rounds x {args.steps} steps)")
        cuda = any("cuda_peak_MiB" in e for e in s["table"].values())
        head = f"  {'config':12s} {'wall amortized':>14s} {'wall median':>12s} {'CPU amortized':>14s}"
        print(head + (f" {'CUDA peak MiB':>14s}" if cuda else "") + "   wall amortized per round (ms/step)")
        for config, e in s["table"].items():
            line = f"  {config:12s} {e['amortized_ms']:14.3f} {e['median_ms']:12.3f} {e['cpu_amortized_ms']:14.3f}"
            if cuda:
                line += f" {e.get('cuda_peak_MiB', float('nan')):14.1f}"
            print(line + "   " + " ".join(f"{v:.3f}" for v in e["amortized_ms_all_rounds"]))
        title = "ratio (per round, then median [min-max])"
        print(f"  {title:34s} {'wall amortized':>22s} {'wall median':>22s} {'CPU amortized':>22s}")
        for name, stats in s["ratios"].items():
            cells = []
            for stat in STATS:
                v = stats.get(stat[: -len("_s")])
                cells.append(f"{v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]" if v else "")
            print(f"  {name:34s} {cells[0]:>22s} {cells[1]:>22s} {cells[2]:>22s}")
        m = s["memory"]
        print(f"  memory: parameters {m['param_bytes']} B;"
              f" per copy (params + grads + optimizer state) {m['bytes_per_copy']} B;"
              f" probe with K shadows holds K x {m['bytes_per_copy']} B extra, (1+K) x in all")
        for key, value in m.items():
            if key.startswith("probe"):
                print(f"    {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits", "mlp784"])
    parser.add_argument("--shadows", nargs="+", type=int, default=[1, 2, 4, 8], help="K values for probeK")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="extra configurations, e.g. probe1@log5 (probe logging every 5 steps)"
    )
    parser.add_argument("--no-floor-k", action="store_true", help="run the floor for K=1 only (not for every K)")
    parser.add_argument("--steps", type=int, default=300, help="measured optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=30, help="discarded optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every configuration once)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--json", default=None, help="write the raw results and the summary to this file")
    parser.add_argument("--breakdown", action="store_true", help="also time the probe's pieces against the floor's")
    parser.add_argument("--breakdown-model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--skip-main", action="store_true", help="skip the separate-fits design (only the modes asked)")
    parser.add_argument("--mux", action="store_true", help="also run the multiplexed design (all arms in one fit)")
    parser.add_argument("--segment", type=int, default=32, help="--mux: steps per arm segment")
    parser.add_argument("--drop", type=int, default=2, help="--mux: first steps of each segment not counted")
    parser.add_argument("--cycles", type=int, default=30, help="--mux: cycles (each runs every arm for one segment)")
    parser.add_argument("--micro", action="store_true", help="also time the probe's per-step pieces in isolation")
    parser.add_argument("--cprofile", type=int, default=0, help="print the N costliest functions in the probe hook")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    env = environment(args)
    print(json.dumps(env))
    configs = config_names(args.shadows, floor_for_all=not args.no_floor_k, extra=args.extra)
    output: dict[str, Any] = {"environment": env, "args": vars(args), "configs": configs}
    with tempfile.TemporaryDirectory() as tmpdir:
        if args.mux:
            mux_arms = [c for c in configs if "+" not in c]
            output["mux"] = []
            for model in args.models:
                result = run_mux(model, mux_arms, args)
                print_mux(result, args)
                output["mux"].append(result)
        if not args.skip_main:
            # one untimed fit per model first: imports, allocator and kernel caches warm
            for model in args.models:
                run_fit(model, "probe1", argparse.Namespace(**{**vars(args), "steps": 5, "warmup": 5}), tmpdir)
            results = []
            t0 = time.perf_counter()
            for r in range(args.rounds):
                jobs = [(m, c) for m in args.models for c in configs]
                random.Random(r).shuffle(jobs)
                for model, config in jobs:
                    result = run_fit(model, config, args, tmpdir)
                    result["round"] = r
                    results.append(result)
                print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            summary = summarize(results, args.models, configs, args)
            print_summary(summary, args)
            output["results"] = results
            output["summary"] = summary
        if args.cprofile:  # before --breakdown installs its timing wrappers
            output["cprofile"] = run_cprofile(args, tmpdir)
        if args.micro:
            output["micro"] = run_micro(args, tmpdir)
        if args.breakdown:
            output["breakdown"] = run_breakdown(args, tmpdir)
    if args.json:
        write_json(output, args.json)


def write_json(output: dict, path: str) -> None:
    """Write a benchmark's results (folders made as needed; anything json cannot encode as its str) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(output, f, indent=1, default=str)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
