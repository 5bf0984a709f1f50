"""Reproduce the edge-of-chaos training papers (seed 004) on Fashion-MNIST, scaled down to a 2-core CPU.

Paper 2: Zhang, Feng, Chen & Lai, *Edge of chaos as a guiding principle for modern neural network training*,
arXiv 2107.09437 (2021); protocol from their released code (zhanglin010/Edge_of_Chaos_Training):

* 784 → Linear(784, 784, no bias) + tanh → Linear(784, 10), softmax cross-entropy, pixels / 255, the 60 000 / 10 000
  split; hidden weight N(0, (1/(2√784))²), so J0 = 0 and J = 0.5 (J² = 0.25) at the start; output layer Glorot-uniform
  with zero bias (Keras's default);
* heavy-ball SGD with learning rate η, momentum α, batch B, and an L2 penalty λ‖W‖² on both weight matrices (Keras
  ``l2(λ)``: the gradient gains 2λW, i.e. torch ``weight_decay=2λ``; torch's and Keras's heavy ball agree at constant
  η); defaults η = 0.02, B = 32, α = 0.5, λ = 0, 501 epochs;
* order parameters of the hidden weight, J0 = N·mean(W), J = √N·std(W) (``order_parameters``), in the plane
  (J0/J, 1/J) with the mean-field edge ``edge_of_chaos_boundary``.

Claims tested: (1) in the ordered phase J²(t) ≈ 0.25 + A·t with A ≈ 11·η/((1 − α)B) per epoch (exponents ≈ 1), and
J² and the loss collapse against epoch·η/((1 − α)B), not in the chaotic phase; (2) weight decay pushes the path toward
order, λ ≈ 9e-5 holds it at the edge, test accuracy ≈ 0.90 there; (3) the guideline: pick λ to balance the growth,
tested on a second task (scikit-learn's 8×8 digits, 64 → 64 tanh → 10).

Paper 1: Feng, Zhang & Lai, *Optimal machine intelligence at the edge of chaos*, arXiv 1909.05176 (2019); protocol from
zhanglin010/Edge_of_Chaos_Optimality: an MLP whose code is Dense(784, ReLU) → Dense(100, ReLU) → Dense(784, ReLU) →
Dense(10) (its README calls it 784-100-784-10), Adam (lr 1e-3, batch 32), Keras initialisation; the square map F =
input → output of the third Dense layer (784 → 784, with its ReLU), iterated 500 times from test images; the order
parameter is the asymptotic Jacobian norm (1/√N)‖∂F/∂x‖_F (``asymptotic_jacobian_norm``), edge at 1. Claim: training
moves it toward 1 and the test loss is lowest near it.

How it is scaled. The unit of time that makes J² collapse is τ = Σ_steps η/(1 − α) (the time of the gradient flow
heavy ball follows); an epoch of S = 60 000 samples lasts τ_epoch = S·η/((1 − α)B), and the authors' rescaled epoch is
epoch·η/((1 − α)B) = τ/S. Their defaults run τ_epoch = 75, so J reaches 1 near τ ≈ 3 750 (their epoch 50) and their
501 epochs are τ ≈ 37 600. Here the runs use s = η/((1 − α)B) up to 0.005, four times the defaults' 0.00125 (at 0.01
gradient noise adds its own growth, and η/(1 − α) = 0.64 at α = 0.5 diverges with this initialisation), so that a unit
of τ costs fewer samples: six scaling configurations run to τ = 750 (ten default epochs), two long ones to
τ = 9 000 and 6 000, and the weight-decay sweep to τ = 9 000 at (η, B, α) = (0.064, 128, 0.9), i.e. 30 epochs of 469
steps: 120 default epochs, a quarter of the authors' 501. Everything is reported per epoch of 60 000 samples and per
τ. Paper 1 runs 3 seeds for 10 epochs (the authors: 10 for 51), from 20 test images (theirs: 100).

Writes into ``--out`` (default docs/): ``edge_of_chaos_collapse.png`` (J² and loss vs epoch and vs
epoch·η/((1 − α)B)), ``edge_of_chaos_phase.png`` (the phase diagram with the weight-decay paths, J² and test accuracy
vs λ), ``edge_of_chaos_jacobian.png`` (paper 1; the guideline on digits), ``edge_of_chaos_summary.md`` and
``edge_of_chaos_runs.csv``.

    python examples/reproduce_edge_of_chaos.py            # the full protocol, ~20 min on one CPU thread
    python examples/reproduce_edge_of_chaos.py --quick    # a CI-sized version, < 1 min
    python examples/reproduce_edge_of_chaos.py --save-raw /tmp/eoc.json && \\
        python examples/reproduce_edge_of_chaos.py --from-raw /tmp/eoc.json   # figures and tables again
"""

import argparse
import csv
import gzip
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from lightning_chaos.functional import (
    asymptotic_jacobian_norm,
    edge_of_chaos_boundary,
    mean_field_chi,
    order_parameters,
)
from lightning_chaos.functional.guideline import edge_of_chaos_guideline

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
PAPER_SAMPLES = 60_000
PAPER_K = 11.0
"""A·(1 − α)B/η from the authors' recorded slopes (coefficient(figure3).py): A = 0.00342 at η = 0.01, B = 32, α = 0,
so k = 10.9."""
PAPER_EXPONENTS = {"eta": 1.00, "momentum": 1.03, "batch": 1.01}
PAPER_LAMBDAS = (0.0, 1e-5, 5e-5, 9e-5, 1.5e-4, 3e-4, 5e-4, 1e-3)
PAPER_LAMBDA_EDGE = 9e-5
PAPER_ACCURACY_AT_EDGE = 0.90
PAPER_SLOPE_WINDOW_TAU = 3600.0
"""The authors fit J² = a·epoch + b over epochs 0–48 at the defaults (plot_figure2.py): τ ∈ [0, 3 600]."""


# -- data ---------------------------------------------------------------------------------------------------------


def fashion_mnist_available(root: str = FASHION_DIR) -> bool:
    return all(os.path.exists(os.path.join(root, name)) for name in FASHION_FILES)


def load_fashion_mnist(root: str = FASHION_DIR) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_test, y_test``: float32 pixels / 255 flattened to 784, int64 labels (idx .gz files)."""

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(os.path.join(root, name)) as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    out = []
    for images, labels in (FASHION_FILES[:2], FASHION_FILES[2:]):
        x = torch.from_numpy(read(images, 16).reshape(-1, 784).astype(np.float32) / 255.0)
        y = torch.from_numpy(read(labels, 8).astype(np.int64))
        out += [x, y]
    return tuple(out)  # type: ignore[return-value]


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1797 8×8 digits / 16, shuffled, 1347 train / 450 test (the second task of the guideline)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    x = torch.tensor(images[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[order], dtype=torch.long)
    return x[:1347], y[:1347], x[1347:], y[1347:]


def batch_loader(x: Tensor, y: Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled minibatches of a tensor data set, one indexing per batch (no per-sample collation)."""
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), batch_size, True)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`max_epochs`.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")


def make_trainer(max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )


# -- paper 2: the model and its record ----------------------------------------------------------------------------


class EdgeMLP(L.LightningModule):
    """N → Linear(N, N, no bias) + tanh → Linear(N, 10): the paper's model, heavy-ball SGD with an L2 penalty.

    ``weight_decay`` is λ of the penalty λ‖W‖² on both weight matrices (Keras ``l2(λ)``); torch gets 2λ.
    """

    def __init__(self, lr: float, momentum: float, weight_decay: float = 0.0, in_features: int = 784,
                 seed: int = 0) -> None:
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.hidden = nn.Linear(in_features, in_features, bias=False)
        self.out = nn.Linear(in_features, 10)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hidden.weight.normal_(0.0, 1.0 / (2.0 * math.sqrt(in_features)), generator=generator)
            bound = math.sqrt(6.0 / (in_features + 10))  # Glorot uniform, Keras's default kernel initialiser
            self.out.weight.uniform_(-bound, bound, generator=generator)
            self.out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": [self.hidden.weight, self.out.weight], "weight_decay": 2.0 * self.weight_decay},
                  {"params": [self.out.bias], "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) on a whole set, in chunks."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), 5000):
            logits = model(x[start:start + 5000])
            loss += float(nn.functional.cross_entropy(logits, y[start:start + 5000], reduction="sum"))
            correct += int((logits.argmax(1) == y[start:start + 5000]).sum())
    return loss / len(y), correct / len(y)


class OrderParameterRecorder(L.Callback):
    """J0 and J of the hidden weight (``order_parameters``) every ``every_n_steps`` steps and after every epoch, the
    training loss averaged over the steps since the previous record, and the test loss and accuracy after every epoch.
    """

    def __init__(self, every_n_steps: int, x_test: Tensor, y_test: Tensor) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.x_test, self.y_test = x_test, y_test
        self.steps: list[int] = []
        self.j0: list[float] = []
        self.j: list[float] = []
        self.loss: list[float] = []
        self.eval_steps: list[int] = []
        self.test_loss: list[float] = []
        self.test_acc: list[float] = []
        self._loss_sum, self._loss_count = 0.0, 0

    def _record(self, trainer: L.Trainer, module: EdgeMLP) -> None:
        step = trainer.global_step
        if self.steps and self.steps[-1] == step:
            return
        j0, j = order_parameters(module.hidden.weight)
        self.steps.append(step)
        self.j0.append(j0)
        self.j.append(j)
        if self._loss_count >= max(1, self.every_n_steps // 2):
            self.loss.append(self._loss_sum / self._loss_count)
            self._loss_sum, self._loss_count = 0.0, 0
        else:  # an epoch-end record right after a step record: too few steps, the average goes to the next record
            self.loss.append(math.nan)

    def _evaluate(self, trainer: L.Trainer, module: EdgeMLP) -> None:
        if self.eval_steps and self.eval_steps[-1] == trainer.global_step:
            return
        loss, accuracy = evaluate(module, self.x_test, self.y_test)
        self.eval_steps.append(trainer.global_step)
        self.test_loss.append(loss)
        self.test_acc.append(accuracy)

    def on_train_start(self, trainer: L.Trainer, pl_module: EdgeMLP) -> None:
        self._record(trainer, pl_module)
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EdgeMLP, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._loss_sum += float(outputs["loss"])
        self._loss_count += 1
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: EdgeMLP) -> None:
        self._record(trainer, pl_module)
        self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: EdgeMLP) -> None:
        self._record(trainer, pl_module)
        self._evaluate(trainer, pl_module)


@dataclass
class EdgeRun:
    """One training run of the paper-2 model: its hyperparameters and the recorded curves."""

    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    tau_max: float
    num_samples: int
    task: str = "fashion"
    seed: int = 0
    seconds: float = 0.0
    steps: list = field(default_factory=list)
    j0: list = field(default_factory=list)
    j: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    monitor: dict = field(default_factory=dict)
    """EdgeOfChaosMonitor's history of the hidden layer (J, edge distance, the layer map's exponent and asymptotic
    Jacobian norm from real inputs), when the run had one."""

    @property
    def eff_lr(self) -> float:
        """η/(1 − α): the gradient-flow time τ one step advances."""
        return self.lr / (1.0 - self.momentum)

    @property
    def scale(self) -> float:
        """η/((1 − α)B), the authors' rescaling of the epoch."""
        return self.eff_lr / self.batch_size

    @property
    def tau_per_epoch(self) -> float:
        return self.num_samples * self.scale

    @property
    def label(self) -> str:
        text = f"η={self.lr:g}, B={self.batch_size}, α={self.momentum:g}"
        return text + (f", λ={self.weight_decay:g}" if self.weight_decay else "")

    def tau(self, steps: Optional[Sequence[int]] = None) -> np.ndarray:
        return np.asarray(self.steps if steps is None else steps, dtype=float) * self.eff_lr

    def epochs(self, steps: Optional[Sequence[int]] = None) -> np.ndarray:
        """Epochs of ``num_samples`` samples (the authors' unit)."""
        return np.asarray(self.steps if steps is None else steps, dtype=float) * self.batch_size / self.num_samples

    @property
    def j2(self) -> np.ndarray:
        return np.asarray(self.j) ** 2


def train_edge(lr: float, batch_size: int, momentum: float, weight_decay: float, tau_max: float,
               data: tuple[Tensor, Tensor, Tensor, Tensor], task: str = "fashion", seed: int = 0,
               records: int = 60, verbose: bool = True, monitor_every: int = 0) -> EdgeRun:
    """Train the paper-2 model for τ = ``tau_max`` (steps = τ/(η/(1 − α))) and record J0, J, losses, accuracy.

    ``monitor_every`` > 0 adds the package's ``EdgeOfChaosMonitor`` on the hidden layer every that many epochs (32
    inputs of the epoch's first batch, the papers' 500 iterations, 100 left out), kept in ``run.monitor``.
    """
    x_train, y_train, x_test, y_test = data
    run = EdgeRun(lr, batch_size, momentum, weight_decay, tau_max, len(y_train), task, seed)
    steps = max(1, round(tau_max / run.eff_lr))
    start = time.perf_counter()
    model = EdgeMLP(lr, momentum, weight_decay, in_features=x_train.shape[1], seed=seed)
    recorder = OrderParameterRecorder(steps // records, x_test, y_test)
    callbacks: list = [recorder]
    if monitor_every:
        from lightning_chaos import EdgeOfChaosMonitor

        callbacks.append(EdgeOfChaosMonitor(layers={"hidden": "tanh"}, every_n_epochs=monitor_every, num_inputs=32,
                                            log_figure=False))
    make_trainer(steps, callbacks).fit(model, train_dataloaders=batch_loader(x_train, y_train, batch_size, seed))
    run.seconds = time.perf_counter() - start
    if monitor_every:
        run.monitor = {k: list(v) for k, v in callbacks[1].history.get("hidden", {}).items()}
    for name in ("steps", "j0", "j", "loss", "eval_steps", "test_loss", "test_acc"):
        setattr(run, name, list(getattr(recorder, name)))
    if verbose:
        print(f"  [{task}] {run.label:<38} τ={tau_max:>6g} ({steps:>6} steps, {run.epochs([steps])[0]:5.1f} epochs):"
              f" J² {run.j2[0]:.3f} → {run.j2[-1]:.3f}, test acc {run.test_acc[-1]:.3f}  [{run.seconds:.0f} s]",
              flush=True)
    return run


# -- fits ---------------------------------------------------------------------------------------------------------


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``(slope, intercept, r2)`` of y against x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return float(slope), float(intercept), float(1.0 - (residual ** 2).sum() / total) if total > 0 else math.nan


def j2_slope(run: EdgeRun, tau_lo: float, tau_hi: float) -> tuple[float, float]:
    """(slope of J² per unit τ, R²) over the records with τ in [tau_lo, tau_hi]."""
    tau = run.tau()
    keep = (tau >= tau_lo - 1e-9) & (tau <= tau_hi + 1e-9)
    slope, _, r2 = fit_line(tau[keep], run.j2[keep])
    return slope, r2


@dataclass
class SlopeRow:
    lr: float
    batch_size: int
    momentum: float
    scale: float
    tau_lo: float
    tau_hi: float
    slope_per_tau: float
    slope_per_epoch: float
    k: float
    r2: float
    seconds: float
    j2_end: float = math.nan
    loss_end: float = math.nan


def slope_row(run: EdgeRun, tau_lo: float, tau_hi: float) -> SlopeRow:
    """The slope over [tau_lo, tau_hi], with J² at tau_hi and the training loss over its last fifth."""
    slope, r2 = j2_slope(run, tau_lo, tau_hi)
    tau = run.tau()
    losses = np.asarray(run.loss, dtype=float)
    near = (tau > 0.8 * tau_hi) & (tau <= tau_hi + 1e-9) & np.isfinite(losses)
    return SlopeRow(run.lr, run.batch_size, run.momentum, run.scale, tau_lo, tau_hi, slope,
                    slope * run.tau_per_epoch, slope * run.num_samples, r2, run.seconds,
                    float(np.interp(tau_hi, tau, run.j2)), float(losses[near].mean()) if near.any() else math.nan)


def fit_exponents(rows: Sequence[SlopeRow]) -> dict[str, float]:
    """ln A = ln k + a·ln η + b·ln(1/(1 − α)) + c·ln(1/B) by least squares; the papers find a, b, c ≈ 1, k ≈ 11.

    With fewer than four distinct configurations (or a degenerate design) only k is fitted, exponents fixed at 1.
    """
    a = np.array([r.slope_per_epoch for r in rows])
    design = np.array([[1.0, math.log(r.lr), -math.log(1 - r.momentum), -math.log(r.batch_size)] for r in rows])
    # k with the exponents fixed at 1: the geometric mean of A·(1 − α)B/η, per epoch of 60 000 samples
    out = {"k_fixed_exponents": float(np.exp(np.mean(np.log([r.k for r in rows]))))}
    if len(rows) >= 4 and np.linalg.matrix_rank(design) == 4:
        coef, *_ = np.linalg.lstsq(design, np.log(a), rcond=None)
        out.update(k=float(np.exp(coef[0])), eta=float(coef[1]), momentum=float(coef[2]), batch=float(coef[3]))
    return out


def collapse_spread(runs: Sequence[EdgeRun], tau_grid: Sequence[float]) -> np.ndarray:
    """Relative spread (max − min)/mean of J²(τ) across runs at each τ of the grid (linear interpolation)."""
    values = np.array([np.interp(tau_grid, run.tau(), run.j2) for run in runs])
    return (values.max(0) - values.min(0)) / values.mean(0)


@dataclass
class DecayRow:
    weight_decay: float
    j_final: float
    j0_final: float
    j2_late: float
    slope_late: float
    j2_balance: float
    growth_late: float
    test_acc_final: float
    test_acc_best: float
    test_loss_final: float
    test_loss_best: float


def decay_row(run: EdgeRun) -> DecayRow:
    """The end of a weight-decay run and its balance: over the last third, the mean J², the slope s of J² and the
    growth g = s + 4λJ² that the decay balances; J²_∞ = J² + s/(4λ) if g stays as it is (NaN for λ = 0)."""
    tau = run.tau()
    late = tau >= tau[-1] * 2 / 3
    slope, _ = j2_slope(run, tau[-1] * 2 / 3, tau[-1])
    j2_late = float(run.j2[late].mean())
    lam = run.weight_decay
    growth = slope + 4 * lam * j2_late
    balance = j2_late + slope / (4 * lam) if lam > 0 else math.nan
    return DecayRow(lam, run.j[-1], run.j0[-1], j2_late, slope, balance, growth, run.test_acc[-1],
                    max(run.test_acc), run.test_loss[-1], min(run.test_loss))


def crossing(xs: Sequence[float], ys: Sequence[float], level: float = 1.0) -> float:
    """The x where y crosses ``level`` (linear in ln x and ln y), from the first bracketing pair; NaN if none."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 > 0 and x1 > 0 and y0 > 0 and y1 > 0 and (y0 - level) * (y1 - level) <= 0 and y0 != y1:
            t = (math.log(level) - math.log(y0)) / (math.log(y1) - math.log(y0))
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return math.nan


# -- paper 1: the asymptotic Jacobian norm under Adam -------------------------------------------------------------


class Paper1MLP(L.LightningModule):
    """Dense(784, ReLU) → Dense(100, ReLU) → Dense(784, ReLU) → Dense(10), Keras initialisation, Adam (the authors'
    ``models.mlp``); ``square_map`` is F = input → output of the third Dense layer, 784 → 784."""

    def __init__(self, seed: int = 0, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.layers = nn.ModuleList([nn.Linear(784, 784), nn.Linear(784, 100), nn.Linear(100, 784),
                                     nn.Linear(784, 10)])
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()

    def square_map(self, x: Tensor) -> Tensor:
        for layer in self.layers[:3]:
            x = torch.relu(layer(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[3](self.square_map(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, eps=1e-7)  # Keras's Adam defaults


class JacobianNormRecorder(L.Callback):
    """At the given global steps: the asymptotic Jacobian norm of F from ``probe`` images, the test loss/accuracy and
    the training loss averaged since the previous record."""

    def __init__(self, at_steps: Sequence[int], probe: Tensor, x_test: Tensor, y_test: Tensor,
                 iterations: int = 500) -> None:
        self.at_steps = set(at_steps)
        self.probe, self.x_test, self.y_test, self.iterations = probe, x_test, y_test, iterations
        self.rows: list[dict[str, float]] = []
        self._loss_sum, self._loss_count = 0.0, 0

    def _record(self, trainer: L.Trainer, module: Paper1MLP) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            norm = asymptotic_jacobian_norm(module.square_map, self.probe, steps=self.iterations)
        escaped = any("escaped" in str(w.message) or "non-finite" in str(w.message) for w in caught)
        loss, accuracy = evaluate(module, self.x_test, self.y_test)
        self.rows.append({"step": trainer.global_step, "jacobian_norm": norm, "escaped": float(escaped),
                          "test_loss": loss, "test_acc": accuracy,
                          "train_loss": self._loss_sum / self._loss_count if self._loss_count else math.nan})
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Paper1MLP) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Paper1MLP, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._loss_sum += float(outputs["loss"])
        self._loss_count += 1
        if trainer.global_step in self.at_steps:
            self._record(trainer, pl_module)


@dataclass
class JacobianRun:
    seed: int
    steps_per_epoch: int
    seconds: float
    rows: list


def train_paper1(seed: int, epochs: float, data: tuple[Tensor, Tensor, Tensor, Tensor], at_epochs: Sequence[float],
                 num_probe: int = 20, iterations: int = 500, verbose: bool = True) -> JacobianRun:
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = len(y_train) // 32
    start = time.perf_counter()
    model = Paper1MLP(seed)
    at_steps = sorted({max(1, round(e * steps_per_epoch)) for e in at_epochs if 0 < e <= epochs})
    recorder = JacobianNormRecorder(at_steps, x_test[:num_probe], x_test, y_test, iterations)
    make_trainer(round(epochs * steps_per_epoch), [recorder]).fit(
        model, train_dataloaders=batch_loader(x_train, y_train, 32, seed))
    run = JacobianRun(seed, steps_per_epoch, time.perf_counter() - start, recorder.rows)
    if verbose:
        norms = " ".join(f"{r['jacobian_norm']:.2f}" for r in run.rows)
        print(f"  [paper 1] seed {seed}: ‖J*‖/√N = {norms}; best test loss {min(r['test_loss'] for r in run.rows):.3f}"
              f"  [{run.seconds:.0f} s]", flush=True)
    return run


# -- the protocol -------------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    """What one invocation runs (the full protocol, or the quick one)."""

    long_configs: tuple            # (η, B, α, τ_max): long λ = 0 runs, past J = 1
    short_configs: tuple           # (η, B, α): the scaling configurations, to τ = short_tau
    short_tau: float
    slope_window: tuple            # (τ_lo, τ_hi) common to every configuration
    decay_config: tuple            # (η, B, α) of the weight-decay sweep
    decays: tuple                  # λ values (0 is taken from the long run with the decay config)
    decay_tau: float
    guideline_probe_tau: float     # the short λ = 0 run of the guideline (on Fashion-MNIST: the first τ of the
    digits_config: tuple           # λ = 0 long run); (η, B, α) on digits
    digits_probe_tau: float
    digits_tau: float
    digits_rounds: int
    paper1_seeds: tuple
    paper1_epochs: float
    paper1_at: tuple
    paper1_probe: int
    paper1_iterations: int
    records: int
    monitor_every: int = 0         # EdgeOfChaosMonitor on the decay configuration's λ = 0 long run, every N epochs


FULL = Protocol(
    long_configs=((0.064, 128, 0.9, 9000.0), (0.16, 64, 0.5, 6000.0)),
    short_configs=((0.16, 128, 0.5), (0.08, 32, 0.5), (0.16, 32, 0.0), (0.08, 64, 0.75), (0.04, 32, 0.5),
                   (0.02, 32, 0.5)),
    short_tau=750.0,
    slope_window=(250.0, 750.0),
    decay_config=(0.064, 128, 0.9),
    decays=(0.0, 5e-5, 9e-5, 1.5e-4, 3e-4, 1e-3),
    decay_tau=9000.0,
    guideline_probe_tau=900.0,
    digits_config=(0.08, 32, 0.5),
    digits_probe_tau=300.0,
    digits_tau=2000.0,
    digits_rounds=2,
    paper1_seeds=(0, 1, 2),
    paper1_epochs=10.0,
    paper1_at=(0.1, 0.25, 0.5) + tuple(float(e) for e in range(1, 11)),
    paper1_probe=20,
    paper1_iterations=500,
    records=60,
    monitor_every=2,
)

QUICK = Protocol(
    long_configs=((0.064, 128, 0.9, 450.0),),
    short_configs=((0.16, 128, 0.5),),
    short_tau=450.0,
    slope_window=(150.0, 450.0),
    decay_config=(0.064, 128, 0.9),
    decays=(0.0, 1e-3),
    decay_tau=450.0,
    guideline_probe_tau=450.0,
    digits_config=(0.16, 32, 0.5),
    digits_probe_tau=300.0,
    digits_tau=1000.0,
    digits_rounds=1,
    paper1_seeds=(0,),
    paper1_epochs=0.2,
    paper1_at=(0.05, 0.2),
    paper1_probe=8,
    paper1_iterations=200,
    records=30,
    monitor_every=1,
)


@dataclass
class Results:
    protocol: dict
    long_runs: list
    short_runs: list
    decay_runs: list
    digits_runs: list
    paper1_runs: list
    seconds: float = 0.0


def run_protocol(protocol: Protocol, fashion: tuple, digits: Optional[tuple], verbose: bool = True,
                 parts: Sequence[str] = ("scaling", "decay", "guideline", "paper1")) -> Results:
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    results = Results(asdict(protocol), [], [], [], [], [])
    if "scaling" in parts or "decay" in parts:
        say("Paper 2, scaling: long runs past J = 1, then the scaling configurations", flush=True)
        for lr, batch, momentum, tau in protocol.long_configs:
            watch = protocol.monitor_every if (lr, batch, momentum) == tuple(protocol.decay_config) else 0
            results.long_runs.append(train_edge(lr, batch, momentum, 0.0, tau, fashion, records=protocol.records,
                                                verbose=verbose, monitor_every=watch))
    if "scaling" in parts:
        for lr, batch, momentum in protocol.short_configs:
            results.short_runs.append(train_edge(lr, batch, momentum, 0.0, protocol.short_tau, fashion,
                                                 records=protocol.records // 2, verbose=verbose))
    if "decay" in parts:
        say("Paper 2, weight decay", flush=True)
        lr, batch, momentum = protocol.decay_config
        for lam in protocol.decays:
            reuse = [r for r in results.long_runs if (r.lr, r.batch_size, r.momentum) == (lr, batch, momentum)
                     and r.tau_max >= protocol.decay_tau] if lam == 0 else []
            results.decay_runs.append(reuse[0] if reuse else train_edge(
                lr, batch, momentum, lam, protocol.decay_tau, fashion, records=protocol.records, verbose=verbose))
    if "guideline" in parts and digits is not None:
        say("Guideline on the second task (digits, 64 → 64 tanh → 10)", flush=True)
        lr, batch, momentum = protocol.digits_config
        probe = train_edge(lr, batch, momentum, 0.0, protocol.digits_probe_tau, digits, task="digits",
                           records=protocol.records, verbose=verbose)
        results.digits_runs.append(probe)
        for _ in range(protocol.digits_rounds):
            advice = guideline_from_run(results.digits_runs[-1])
            results.digits_runs.append(train_edge(lr, batch, momentum, advice.weight_decay, protocol.digits_tau, digits,
                                                  task="digits", records=protocol.records, verbose=verbose))
    if "paper1" in parts:
        say("Paper 1: asymptotic Jacobian norm of F = input → third layer, Adam", flush=True)
        for seed in protocol.paper1_seeds:
            results.paper1_runs.append(train_paper1(seed, protocol.paper1_epochs, fashion, protocol.paper1_at,
                                                    protocol.paper1_probe, protocol.paper1_iterations, verbose))
    results.seconds = time.perf_counter() - start
    return results


def guideline_from_run(run: EdgeRun, tau_lo: Optional[float] = None, tau_hi: Optional[float] = None):
    """Apply ``edge_of_chaos_guideline`` to a run: a plain run's slope over its whole length (the papers' recipe), or
    a run with decay over its last third (its slope and mean J² there)."""
    tau = run.tau()
    if tau_lo is None:
        tau_lo = 0.0 if run.weight_decay == 0 else tau[-1] * 2 / 3
    if tau_hi is None:
        tau_hi = tau[-1]
    slope, _ = j2_slope(run, tau_lo, tau_hi)
    keep = (tau >= tau_lo) & (tau <= tau_hi)
    return edge_of_chaos_guideline(slope * run.tau_per_epoch, run.lr, run.batch_size, run.num_samples,
                                   run.momentum, weight_decay=run.weight_decay,
                                   j2=float(run.j2[keep].mean()) if run.weight_decay else 0.0)


# -- analysis -----------------------------------------------------------------------------------------------------


def analyse(results: Results) -> dict[str, Any]:
    """Every number of the summary, from the recorded runs."""
    protocol = Protocol(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                           for k, v in results.protocol.items()})
    out: dict[str, Any] = {"protocol": protocol}
    scaling_runs = results.long_runs + results.short_runs
    if scaling_runs:
        lo, hi = protocol.slope_window
        rows = [slope_row(run, lo, hi) for run in scaling_runs]
        out["slope_rows"] = rows
        out["exponents"] = fit_exponents(rows)
        if len({r.scale for r in rows}) >= 2:  # k against s = η/((1 − α)B): the gradient noise's share grows with s
            slope, intercept, _ = fit_line([r.scale for r in rows], [r.k for r in rows])
            out["k_vs_scale"] = (intercept, slope)
        long_rows = [slope_row(run, 0.0, PAPER_SLOPE_WINDOW_TAU) for run in results.long_runs
                     if run.tau()[-1] >= PAPER_SLOPE_WINDOW_TAU]
        out["paper_window_rows"] = long_rows
        late = [slope_row(run, 1000.0, 3600.0) for run in results.long_runs if run.tau()[-1] >= 3600.0]
        out["late_rows"] = late
        for run in results.long_runs:  # τ (and epochs at the authors' defaults, 75 τ each) where J first reaches 1
            above = np.nonzero(run.j2 >= 1.0)[0]
            run_tau = float(run.tau()[above[0]]) if len(above) else math.nan
            out.setdefault("tau_at_edge", []).append((run.label, run_tau))
        if len(results.long_runs) >= 2:
            overlap = min(run.tau()[-1] for run in results.long_runs)
            grid = np.linspace(0, overlap, 61)[1:]
            spread = collapse_spread(results.long_runs, grid)
            j2_mean = np.mean([np.interp(grid, r.tau(), r.j2) for r in results.long_runs], 0)
            out["collapse_long"] = {"ordered": float(spread[j2_mean < 1].max()) if (j2_mean < 1).any() else math.nan,
                                    "chaotic": float(spread[j2_mean >= 1].max()) if (j2_mean >= 1).any() else math.nan,
                                    "tau_max": float(overlap)}
        grid = np.linspace(0, protocol.short_tau, 31)[1:]
        out["collapse_short"] = float(collapse_spread(scaling_runs, grid).max())
    watched = [run for run in results.long_runs if run.monitor.get("J")]
    if watched:
        out["monitor"] = analyse_monitor(watched[0])
    if results.decay_runs:
        rows = [decay_row(run) for run in results.decay_runs]
        out["decay_rows"] = rows
        with_decay = [r for r in rows if r.weight_decay > 0]
        lams = [r.weight_decay for r in with_decay]
        out["lambda_edge_final"] = crossing(lams, [r.j_final for r in with_decay])
        out["lambda_edge_balance"] = crossing(lams, [r.j2_balance for r in with_decay])
        best = max(rows, key=lambda r: r.test_acc_final)
        out["best_accuracy"] = (best.weight_decay, best.test_acc_final)
        # the guideline on the main task: round 1 from the plain run's first τ, round 2 from each decay run
        plain = [r for r in results.decay_runs if r.weight_decay == 0]
        if plain:
            out["guideline_round1"] = guideline_from_run(plain[0], 0.0, protocol.guideline_probe_tau)
        out["guideline_round2"] = [(run.weight_decay, guideline_from_run(run)) for run in results.decay_runs
                                   if run.weight_decay > 0]
        out["naive_balance"] = {"k_over_4S": PAPER_K / (4 * PAPER_SAMPLES), "k_over_2S": PAPER_K / (2 * PAPER_SAMPLES)}
    if results.digits_runs:
        digits = []
        for index, run in enumerate(results.digits_runs):
            advice = guideline_from_run(run)
            tau = run.tau()
            late = tau >= tau[-1] * 2 / 3
            digits.append({"round": index, "weight_decay": run.weight_decay,
                           "j_late": float(np.sqrt(run.j2[late].mean())),
                           "j_final": run.j[-1], "j0_final": run.j0[-1], "test_acc": run.test_acc[-1],
                           "suggested": advice.weight_decay, "slope_per_epoch": j2_slope(run, 0, tau[-1])[0]
                           * run.tau_per_epoch})
        out["digits"] = digits
    if results.paper1_runs:
        out["paper1"] = analyse_paper1(results.paper1_runs)
    return out


def iid_prediction(j: float) -> tuple[float, float]:
    """(exponent, asymptotic Jacobian norm) of x ↦ tanh(Wx) for i.i.d. W with spread J (J0 = 0), N → ∞: ln J and J
    below the edge, ½ ln χ₁ and √χ₁ above it."""
    if j <= 1.0:
        return math.log(j), j
    chi = mean_field_chi(j)
    return 0.5 * math.log(chi), math.sqrt(chi)


def analyse_monitor(run: EdgeRun) -> dict[str, Any]:
    """The monitor's records of the hidden layer beside the i.i.d. mean-field prediction at the same J."""
    history = run.monitor
    rows = []
    for index, step in enumerate(history["step"]):
        j = history["J"][index]
        exponent, norm = iid_prediction(j)
        rows.append({"epoch": step * run.batch_size / run.num_samples, "tau": step * run.eff_lr, "J": j,
                     "J0": history["J0"][index],
                     "edge_distance": history["edge_distance"][index], "lyapunov": history["lyapunov"][index],
                     "jacobian_norm": history["jacobian_norm"][index], "iid_lyapunov": exponent,
                     "iid_jacobian_norm": norm})
    taus = [r["tau"] for r in rows]
    exponents = [r["lyapunov"] for r in rows]
    zero = math.nan
    for (t0, y0), (t1, y1) in zip(zip(taus, exponents), zip(taus[1:], exponents[1:])):
        if y0 < 0 <= y1:
            zero = t0 + (t1 - t0) * (-y0) / (y1 - y0)
            break
    edge = math.nan
    for (t0, j0), (t1, j1) in zip(zip(taus, [r["J"] for r in rows]), zip(taus[1:], [r["J"] for r in rows][1:])):
        if j0 < 1 <= j1:
            edge = t0 + (t1 - t0) * (1 - j0) / (j1 - j0)
            break
    return {"rows": rows, "tau_exponent_zero": zero, "tau_j_one": edge, "label": run.label,
            "tau_per_epoch": run.tau_per_epoch}


def analyse_paper1(runs: Sequence[JacobianRun]) -> dict[str, Any]:
    steps = sorted({row["step"] for run in runs for row in run.rows})
    table = []
    for step in steps:
        rows = [row for run in runs for row in run.rows if row["step"] == step]
        norms = np.array([r["jacobian_norm"] for r in rows])
        losses = np.array([r["test_loss"] for r in rows])
        table.append({"epoch": step / runs[0].steps_per_epoch, "norm_mean": float(norms.mean()),
                      "norm_std": float(norms.std()), "test_loss_mean": float(losses.mean()),
                      "test_loss_std": float(losses.std()),
                      "test_acc_mean": float(np.mean([r["test_acc"] for r in rows])),
                      "escaped": int(sum(r["escaped"] for r in rows)), "n": len(rows)})
    per_seed = []
    for run in runs:
        trained = run.rows[1:] or run.rows
        best = min(trained, key=lambda r: r["test_loss"])
        closest = min(trained, key=lambda r: abs(math.log(max(r["jacobian_norm"], 1e-12))))
        crossed = [r for r in trained if r["jacobian_norm"] >= 1.0]
        per_seed.append({"seed": run.seed, "initial_norm": run.rows[0]["jacobian_norm"],
                         "best_epoch": best["step"] / run.steps_per_epoch, "norm_at_best": best["jacobian_norm"],
                         "best_test_loss": best["test_loss"],
                         "closest_epoch": closest["step"] / run.steps_per_epoch,
                         "closest_norm": closest["jacobian_norm"], "loss_at_closest": closest["test_loss"],
                         "final_norm": run.rows[-1]["jacobian_norm"],
                         "cross_epoch": crossed[0]["step"] / run.steps_per_epoch if crossed else math.nan,
                         "final_test_loss": run.rows[-1]["test_loss"]})
    return {"table": table, "per_seed": per_seed}


# -- report -------------------------------------------------------------------------------------------------------


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def write_report(results: Results, analysis: dict[str, Any], out_dir: str, title: str = "") -> None:
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Seed 004: the edge of chaos, reproduced {title}".rstrip(), ""]
    lines.append(f"Total wall time {results.seconds:.0f} s (one CPU thread). All numbers written by "
                 "`examples/reproduce_edge_of_chaos.py`; τ = Σ η/(1 − α) over the steps, an epoch is 60 000 samples.")
    lines.append("")
    if "slope_rows" in analysis:
        ex = analysis["exponents"]
        lo, hi = analysis["protocol"].slope_window
        lines += ["## 1. Growth of J² in the ordered phase", "",
                  f"Slopes over the common window τ ∈ [{lo:g}, {hi:g}] (k = A·(1 − α)B/η per epoch of 60 000 samples"
                  " = slope per τ × 60 000):", "",
                  f"| η | B | α | η/((1−α)B) | A per epoch | k | R² | J² at τ = {hi:g} |"
                  f" training loss near τ = {hi:g} | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in analysis["slope_rows"]:
            lines.append(f"| {r.lr:g} | {r.batch_size} | {r.momentum:g} | {r.scale:.5f} | {r.slope_per_epoch:.5f} |"
                         f" {r.k:.2f} | {r.r2:.4f} | {r.j2_end:.3f} | {r.loss_end:.3f} | {r.seconds:.0f} |")
        lines += ["", "| quantity | measured | paper |", "|---|---|---|"]
        lines.append(f"| k (exponents fixed at 1), window [{lo:g}, {hi:g}] | {fmt(ex['k_fixed_exponents'])} |"
                     f" {PAPER_K:g} |")
        for row in analysis["paper_window_rows"]:
            lines.append(f"| k on the authors' window τ ∈ [0, 3600] (their epochs 0–48), {row.lr:g}/{row.batch_size}/"
                         f"{row.momentum:g} | {row.k:.2f} (R² {row.r2:.4f}) | {PAPER_K:g} |")
        for row in analysis["late_rows"]:
            lines.append(f"| k past the transient, τ ∈ [1000, 3600], {row.lr:g}/{row.batch_size}/{row.momentum:g} |"
                         f" {row.k:.2f} | – |")
        if "k_vs_scale" in analysis:
            k0, c = analysis["k_vs_scale"]
            lines.append(f"| k = k₀ + c·η/((1−α)B) over the window: k₀ (the s → 0 limit), c | {k0:.2f}, {c:.0f} |"
                         " – |")
        if "eta" in ex:
            lines.append(f"| k (free exponents) | {fmt(ex['k'])} | {PAPER_K:g} |")
            for key, name in (("eta", "η"), ("momentum", "1/(1 − α)"), ("batch", "1/B")):
                lines.append(f"| exponent of {name} | {ex[key]:.3f} | {PAPER_EXPONENTS[key]:.2f} |")
        for label, tau in analysis.get("tau_at_edge", []):
            lines.append(f"| τ where J² first reaches 1 ({label}) | {fmt(tau, 4)} (= {fmt(tau / 75, 3)} epochs at the"
                         " defaults) | ≈ 50 epochs |")
        if "collapse_long" in analysis:
            c = analysis["collapse_long"]
            lines.append(f"| largest relative spread of J²(τ) between the long runs, ordered (J < 1) / chaotic"
                         f" (J ≥ 1, up to τ = {c['tau_max']:g}) | {fmt(c['ordered'], 2)} / {fmt(c['chaotic'], 2)} |"
                         " collapse / no collapse |")
        lines.append(f"| largest relative spread of J²(τ) over all configurations, τ ≤ "
                     f"{analysis['protocol'].short_tau:g} | {fmt(analysis['collapse_short'], 2)} | collapse |")
        lines.append("")
    if "monitor" in analysis:
        m = analysis["monitor"]
        lines += [f"EdgeOfChaosMonitor on the hidden layer of the long run {m['label']} (32 training images, 500"
                  " iterations, 100 left out), beside the i.i.d. mean-field prediction at the same J:", "",
                  "| epoch | τ | J | J0 | ln(J/J_c) | map exponent | i.i.d. exponent | Jacobian norm | i.i.d. norm |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['epoch']:.2f} | {r['tau']:.0f} | {r['J']:.3f} | {r['J0']:+.3f} |"
                         f" {r['edge_distance']:+.3f} |"
                         f" {r['lyapunov']:+.3f} | {r['iid_lyapunov']:+.3f} | {r['jacobian_norm']:.3f} |"
                         f" {r['iid_jacobian_norm']:.3f} |")
        lines += ["", f"The measured exponent crosses 0 at τ ≈ {fmt(m['tau_exponent_zero'], 4)}; J crosses 1 at"
                  f" τ ≈ {fmt(m['tau_j_one'], 4)}.", ""]
    if "decay_rows" in analysis:
        lines += ["## 2. Weight decay", "",
                  f"(η, B, α) = {analysis['protocol'].decay_config}, τ = {analysis['protocol'].decay_tau:g}. λ is the"
                  " Keras L2 coefficient (torch weight_decay = 2λ). Late = last third of the run; J²_∞ = J² + s/(4λ)"
                  " extrapolates with the growth g = s + 4λJ² held fixed.", "",
                  "| λ | J final | J0 final | J² late | slope s per τ | g per τ | J²_∞ | test acc final | best |"
                  " test loss final |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in analysis["decay_rows"]:
            lines.append(f"| {r.weight_decay:g} | {r.j_final:.3f} | {r.j0_final:+.3f} | {r.j2_late:.3f} |"
                         f" {r.slope_late:.2e} | {r.growth_late:.2e} | {fmt(r.j2_balance)} | {r.test_acc_final:.4f} |"
                         f" {r.test_acc_best:.4f} | {r.test_loss_final:.4f} |")
        best_lam, best_acc = analysis["best_accuracy"]
        lines += ["", "| quantity | measured | paper |", "|---|---|---|",
                  f"| λ where the final J crosses 1 | {fmt(analysis['lambda_edge_final'])} | {PAPER_LAMBDA_EDGE:g} |",
                  f"| λ where the extrapolated J_∞ crosses 1 | {fmt(analysis['lambda_edge_balance'])} |"
                  f" {PAPER_LAMBDA_EDGE:g} |",
                  f"| balance k/(4λS) with k = 11 (decay 4λ per τ on J²) |"
                  f" λ = {analysis['naive_balance']['k_over_4S']:.3g} | – |",
                  f"| balance counting the decay as 2ηλ | λ = {analysis['naive_balance']['k_over_2S']:.3g} | – |",
                  f"| best final test accuracy | {best_acc:.4f} at λ = {best_lam:g} | ≈ {PAPER_ACCURACY_AT_EDGE} at"
                  f" λ = {PAPER_LAMBDA_EDGE:g} |"]
        if "guideline_round1" in analysis:
            g1 = analysis["guideline_round1"]
            lines.append(f"| guideline round 1 (plain run, τ ≤ {analysis['protocol'].guideline_probe_tau:g}) |"
                         f" λ = {g1.weight_decay:.3g} (k = {g1.coefficient:.1f}) | – |")
        for lam, g in analysis["guideline_round2"]:
            lines.append(f"| guideline round 2 from the run at λ = {lam:g} | λ = {g.weight_decay:.3g} | – |")
        lines.append("")
    if "digits" in analysis:
        lines += ["## 3. The guideline on a second task (digits, 64 → 64 tanh → 10)", "",
                  "| round | λ trained | J late | J final | J0 final | test acc | λ suggested from this run |",
                  "|---|---|---|---|---|---|---|"]
        for d in analysis["digits"]:
            lines.append(f"| {d['round']} | {d['weight_decay']:.3g} | {d['j_late']:.3f} | {d['j_final']:.3f} |"
                         f" {d['j0_final']:+.3f} | {d['test_acc']:.4f} | {d['suggested']:.3g} |")
        lines.append("")
    if "paper1" in analysis:
        p = analysis["paper1"]
        lines += ["## 4. Paper 1: asymptotic Jacobian norm of F under Adam", "",
                  "| epoch | (1/√N)‖J*‖_F mean ± std | test loss mean ± std | test acc | runs escaped |",
                  "|---|---|---|---|---|"]
        for t in p["table"]:
            lines.append(f"| {t['epoch']:.2f} | {t['norm_mean']:.3f} ± {t['norm_std']:.3f} | {t['test_loss_mean']:.4f}"
                         f" ± {t['test_loss_std']:.4f} | {t['test_acc_mean']:.4f} | {t['escaped']}/{t['n']} |")
        lines += ["", "| seed | norm at start | first epoch with norm ≥ 1 | epoch of lowest test loss | norm there |"
                  " lowest test loss | epoch closest to 1 | norm | test loss there | final norm | final test loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in p["per_seed"]:
            lines.append(f"| {s['seed']} | {s['initial_norm']:.3f} | {fmt(s['cross_epoch'])} | {s['best_epoch']:.2f} |"
                         f" {s['norm_at_best']:.3f} | {s['best_test_loss']:.4f} | {s['closest_epoch']:.2f} |"
                         f" {s['closest_norm']:.3f} | {s['loss_at_closest']:.4f} | {s['final_norm']:.3f} |"
                         f" {s['final_test_loss']:.4f} |")
        lines.append("")
    with open(os.path.join(out_dir, "edge_of_chaos_summary.md"), "w") as handle:
        handle.write("\n".join(lines))
    with open(os.path.join(out_dir, "edge_of_chaos_runs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["part", "task", "lr", "batch_size", "momentum", "weight_decay", "tau_max", "epochs",
                         "j2_start", "j2_final", "j0_final", "slope_per_tau_window", "k_window", "test_acc_final",
                         "test_loss_final", "seconds"])
        lo, hi = analysis["protocol"].slope_window
        for part, runs in (("long", results.long_runs), ("scaling", results.short_runs),
                           ("decay", results.decay_runs), ("guideline", results.digits_runs)):
            for run in runs:
                slope = j2_slope(run, lo, hi)[0] if run.task == "fashion" else math.nan
                writer.writerow([part, run.task, run.lr, run.batch_size, run.momentum, run.weight_decay, run.tau_max,
                                 f"{run.epochs()[-1]:.3f}", f"{run.j2[0]:.5f}", f"{run.j2[-1]:.5f}",
                                 f"{run.j0[-1]:.5f}", f"{slope:.6g}", f"{slope * run.num_samples:.4g}",
                                 f"{run.test_acc[-1]:.4f}", f"{run.test_loss[-1]:.4f}", f"{run.seconds:.1f}"])
        for run in results.paper1_runs:
            for row in run.rows:
                writer.writerow(["paper1", "fashion", 1e-3, 32, "adam", 0.0, "",
                                 f"{row['step'] / run.steps_per_epoch:.3f}",
                                 "", "", "", "", "", f"{row['test_acc']:.4f}", f"{row['test_loss']:.4f}",
                                 f"{run.seconds:.1f}"])


def make_figures(results: Results, analysis: dict[str, Any], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    scaling_runs = results.long_runs + results.short_runs
    if scaling_runs:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        short_end = max([r.epochs()[-1] * r.scale for r in results.short_runs] or [0.0])
        inset = axes[0, 1].inset_axes([0.56, 0.07, 0.41, 0.4]) if short_end else None
        for index, run in enumerate(scaling_runs):
            color = f"C{index}"
            epochs = run.epochs()
            rescaled = epochs * run.scale
            keep = np.isfinite(run.loss)
            axes[0, 0].plot(epochs[1:], run.j2[1:], "-", color=color, label=run.label)
            axes[0, 1].plot(rescaled, run.j2, "-", color=color, label=run.label)
            axes[1, 0].plot(epochs[keep], np.asarray(run.loss)[keep], "-", color=color, lw=1)
            axes[1, 1].plot(rescaled[keep], np.asarray(run.loss)[keep], "-", color=color, lw=1)
            if inset is not None:
                near = rescaled <= short_end * 1.001
                inset.plot(rescaled[near], run.j2[near], "-", color=color, lw=1)
        x = np.linspace(0, max(r.epochs()[-1] * r.scale for r in scaling_runs), 50)
        axes[0, 1].plot(x, 0.25 + PAPER_K * x, "k:", label="paper: 0.25 + 11·epoch·η/((1−α)B)")
        if inset is not None:
            inset.plot(x[x <= short_end], 0.25 + PAPER_K * x[x <= short_end], "k:")
            inset.set_title("the short runs (zoom)", fontsize=8)
            inset.tick_params(labelsize=7)
        for ax in axes[0]:
            ax.axhline(1.0, color="grey", ls="--", lw=1)
            ax.set_ylabel("J²  (J = √N·std W)")
        for ax in axes[1]:
            ax.set_ylabel("training loss (mean since the last record)")
            ax.set_yscale("log")
        for ax in axes[:, 0]:
            ax.set_xlabel("epoch (60 000 samples)")
            ax.set_xscale("log")
        for ax in axes[:, 1]:
            ax.set_xlabel("epoch · η/((1 − α)B)   (= τ / 60 000)")
        axes[0, 1].legend(fontsize=7, loc="upper left")
        axes[0, 0].set_title("(a) J² against epochs: the configurations spread")
        axes[0, 1].set_title("(b) against epoch·η/((1−α)B): one curve (dashed: J = 1)")
        axes[1, 0].set_title("(c) training loss against epochs")
        axes[1, 1].set_title("(d) training loss, rescaled")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "edge_of_chaos_collapse.png"), dpi=110)
        plt.close(fig)
    if results.decay_runs:
        watched = analysis.get("monitor")
        fig, axes = plt.subplots(1, 4 if watched else 3, figsize=(22 if watched else 17, 5.2),
                                 gridspec_kw={"width_ratios": [1.4, 1, 1, 1] if watched else [1.4, 1, 1]})
        ax = axes[0]
        # J_c = 1 for |J0/J| <= 1; beyond, it rises steeply (like a square root at 1+): a few points suffice, and
        # J0 < 0 mirrors J0 > 0
        beyond = np.concatenate([[1.0, 1.003, 1.01, 1.03], np.linspace(1.06, 1.5, 9)])
        j_c = edge_of_chaos_boundary(torch.tensor(beyond)).numpy()
        ratios = np.concatenate([-beyond[::-1], beyond])
        boundary = 1.0 / np.concatenate([j_c[::-1], j_c])
        ax.fill_between(ratios, 0, boundary, color="0.92", label="chaotic (mean field)")
        ax.plot(ratios, boundary, "k-", label="edge of chaos, tanh (edge_of_chaos_boundary)")
        top = 2.2
        for index, run in enumerate(results.decay_runs):
            x, y = np.asarray(run.j0) / np.asarray(run.j), 1.0 / np.asarray(run.j)
            top = max(top, float(y.max()) * 1.05)
            ax.plot(x, y, "-", color=f"C{index}", marker=".", ms=3, label=f"λ = {run.weight_decay:g}")
            ax.plot(x[-1], y[-1], "*", ms=12, color=f"C{index}")
        ax.plot(0, 2, "ko", ms=6)
        ax.annotate("start (J = 0.5)", (0, 2), (0.25, 2.0))
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(0.0, top)
        ax.set_xlabel("J0 / J")
        ax.set_ylabel("1 / J")
        ax.set_title("(a) training paths in the phase diagram (star: end)")
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[1]
        for index, run in enumerate(results.decay_runs):
            ax.plot(run.epochs(), run.j2, "-", color=f"C{index}", label=f"λ = {run.weight_decay:g}")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xlabel(f"epoch (60 000 samples; ×{results.decay_runs[0].tau_per_epoch / 75:g} at the authors' defaults)")
        ax.set_ylabel("J²")
        ax.set_title("(b) J² under weight decay (dashed: the edge)")
        ax.legend(fontsize=7)
        ax = axes[2]
        rows = analysis["decay_rows"]
        decayed = [r for r in rows if r.weight_decay > 0]
        lams = [r.weight_decay for r in decayed]
        ax.plot(lams, [r.test_acc_final for r in decayed], "o-", color="C0", label="final test accuracy")
        ax.plot(lams, [r.test_acc_best for r in decayed], "s--", color="C1", ms=4,
                label="best test accuracy along the run")
        for r in rows:
            if r.weight_decay == 0:
                ax.axhline(r.test_acc_final, color="C0", ls=":", lw=1, label="λ = 0, final")
                ax.axhline(r.test_acc_best, color="C1", ls=":", lw=1, label="λ = 0, best")
        ax.axvline(PAPER_LAMBDA_EDGE, color="k", ls="--", lw=1, label=f"paper's edge λ = {PAPER_LAMBDA_EDGE:g}")
        for key, style, name in (("lambda_edge_final", ":", "final J = 1"), ("lambda_edge_balance", "-.",
                                                                             "extrapolated J_∞ = 1")):
            if math.isfinite(analysis.get(key, math.nan)):
                ax.axvline(analysis[key], color="C3", ls=style, lw=1.2, label=f"{name}: λ = {analysis[key]:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("λ (Keras L2; torch weight_decay = 2λ)")
        ax.set_ylabel("test accuracy")
        ax.set_title("(c) test accuracy against λ")
        ax.legend(fontsize=7)
        if watched:
            ax = axes[3]
            rows = watched["rows"]
            epochs = [r["epoch"] for r in rows]
            ax.plot(epochs, [r["lyapunov"] for r in rows], "o-", color="C3", label="map exponent (measured)")
            ax.plot(epochs, [r["iid_lyapunov"] for r in rows], "--", color="C3", label="i.i.d. W at the same J")
            ax.plot(epochs, [r["jacobian_norm"] - 1 for r in rows], "s-", color="C0", ms=4,
                    label="Jacobian norm − 1 (measured)")
            ax.plot(epochs, [r["iid_jacobian_norm"] - 1 for r in rows], "--", color="C0", label="i.i.d., − 1")
            ax.axhline(0.0, color="k", lw=1)
            if math.isfinite(watched["tau_j_one"]):
                ax.axvline(watched["tau_j_one"] / watched["tau_per_epoch"], color="grey", ls=":",
                           label="J = 1")
            ax.set_xlabel("epoch (60 000 samples)")
            ax.set_ylabel("per iteration of x ↦ tanh(Wx)")
            ax.set_title(f"(d) EdgeOfChaosMonitor, λ = 0 ({watched['label']})", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "edge_of_chaos_phase.png"), dpi=110)
        plt.close(fig)
    if results.paper1_runs or results.digits_runs:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        if results.paper1_runs:
            ax = axes[0]
            twin = ax.twinx()
            losses = []
            for index, run in enumerate(results.paper1_runs):
                epochs = [r["step"] / run.steps_per_epoch for r in run.rows]
                ax.plot(epochs, [r["jacobian_norm"] for r in run.rows], "o-", color="C3", ms=3, alpha=0.8,
                        label="(1/√N)‖J*‖_F of F" if index == 0 else None)
                twin.plot(epochs[1:], [r["test_loss"] for r in run.rows[1:]], "s--", color="0.45", ms=3, alpha=0.8,
                          label="test loss" if index == 0 else None)
                best = min(run.rows[1:] or run.rows, key=lambda r: r["test_loss"])
                twin.plot(best["step"] / run.steps_per_epoch, best["test_loss"], "v", color="k", ms=8,
                          label="lowest test loss" if index == 0 else None)
                losses += [r["test_loss"] for r in run.rows[1:]]
            ax.axhline(1.0, color="k", ls="--", lw=1)
            if losses:
                twin.set_ylim(min(losses) * 0.97, min(max(losses), 2 * min(losses)))
            ax.set_xlabel("epoch (Adam, batch 32)")
            ax.set_ylabel("asymptotic Jacobian norm of F", color="C3")
            twin.set_ylabel("test loss", color="0.45")
            ax.set_title("(a) paper 1: F = input → 3rd layer (seeds overlaid)")
            ax.legend(loc="upper left", fontsize=8)
            twin.legend(loc="upper center", fontsize=8)
            ax = axes[1]
            for index, run in enumerate(results.paper1_runs):
                rows = run.rows[1:]
                ax.plot([r["jacobian_norm"] for r in rows], [r["test_loss"] for r in rows], "o-", ms=4,
                        label=f"seed {run.seed}")
            ax.axvline(1.0, color="k", ls="--", lw=1)
            if losses:
                ax.set_ylim(min(losses) * 0.97, min(max(losses), 2 * min(losses)))
            ax.set_xlabel("asymptotic Jacobian norm of F")
            ax.set_ylabel("test loss")
            ax.set_title("(b) test loss against the order parameter")
            ax.legend(fontsize=8)
        if results.digits_runs:
            ax = axes[2]
            for index, run in enumerate(results.digits_runs):
                name = "plain probe" if index == 0 else f"round {index}: λ = {run.weight_decay:.3g}"
                ax.plot(run.tau(), run.j, "-", color=f"C{index}", label=name)
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_xlabel("τ = Σ η/(1 − α)")
            ax.set_ylabel("J of the 64 × 64 hidden weight")
            ax.set_title("(c) the guideline on digits: λ from the previous run")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "edge_of_chaos_jacobian.png"), dpi=110)
        plt.close(fig)


# -- raw results --------------------------------------------------------------------------------------------------


def save_raw(results: Results, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(asdict(results), handle)


def load_raw(path: str) -> Results:
    with open(path) as handle:
        raw = json.load(handle)
    return Results(
        protocol=raw["protocol"],
        long_runs=[EdgeRun(**r) for r in raw["long_runs"]],
        short_runs=[EdgeRun(**r) for r in raw["short_runs"]],
        decay_runs=[EdgeRun(**r) for r in raw["decay_runs"]],
        digits_runs=[EdgeRun(**r) for r in raw["digits_runs"]],
        paper1_runs=[JacobianRun(**r) for r in raw["paper1_runs"]],
        seconds=raw["seconds"],
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a CI-sized version (< 1 min)")
    parser.add_argument("--parts", nargs="+", default=["scaling", "decay", "guideline", "paper1"],
                        choices=["scaling", "decay", "guideline", "paper1"])
    parser.add_argument("--data-dir", default=FASHION_DIR, help="folder of the Fashion-MNIST idx .gz files")
    parser.add_argument("--decays", type=float, nargs="+", default=None, help="λ values of the weight-decay sweep")
    parser.add_argument("--out", default="docs", help="folder for the figures and tables")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--save-raw", default=None, metavar="FILE", help="also save every recorded curve as JSON")
    parser.add_argument("--from-raw", default=None, metavar="FILE", help="tables and figures from a saved run")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.from_raw:
        results = load_raw(args.from_raw)
    else:
        if not fashion_mnist_available(args.data_dir):
            raise SystemExit(f"Fashion-MNIST not found in {args.data_dir} (Debian: apt install dataset-fashion-mnist)")
        protocol = QUICK if args.quick else FULL
        if args.decays is not None:
            protocol = Protocol(**{**asdict(protocol), "decays": tuple(args.decays)})
        fashion = load_fashion_mnist(args.data_dir)
        digits = load_digits_split() if "guideline" in args.parts else None
        results = run_protocol(protocol, fashion, digits, parts=args.parts)
        if args.save_raw:
            save_raw(results, args.save_raw)
    analysis = analyse(results)
    write_report(results, analysis, args.out, "(quick)" if results.protocol["short_tau"] < 600 else "")
    if not args.no_figures:
        make_figures(results, analysis, args.out)
    with open(os.path.join(args.out, "edge_of_chaos_summary.md")) as handle:
        print(handle.read())


if __name__ == "__main__":
    main()
