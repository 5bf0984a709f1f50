"""Reproduce Danovski, Soriano & Lacasa (arXiv 2404.05782, 2024) on Iris with ChaosProbe.

The paper's protocol, measured with the package's callback (no separate lockstep code):

* Iris, 120 training / 30 test samples (a seeded shuffle of scikit-learn's 150), unscaled features;
* a 4-10-3 MLP, sigmoid hidden layer, softmax output (cross-entropy on the logits), float64 throughout;
* weights N(0, 1), biases 0; full-batch gradient descent without momentum, 200 steps;
* ``ChaosProbe(epsilon=ε, relative=False, distribution="uniform", perturb_biases=False, norm="l1", num_shadows=5)``
  in free evolution: five copies displaced by U(−ε, ε) on every weight, d(t) the L1 distance over all parameters;
* per initial condition: d(t) averaged over its 5 shadows, a line fitted to ln d̄(t) on every window
  t₁ = 0, 5, …, 100, w = 30, 35, …, 100 (``default_fit_windows(201)``), the best R² kept;
* λ_nMLE = mean of the kept local exponents (R² > 0.9 and Λ > 0.05 per step, ``network_mle``), error bar their std.

Every initial condition is trained once per learning rate in one minimal Trainer; at the ε-sweep learning rate one
ChaosProbe per ε rides on the same Trainer (the same real trajectory, as in the paper, which perturbs the same
initial weights with every ε; here every ε of an initial condition also draws the same δ pattern, scaled). Writes
``iris_runs.csv`` (one row per initial condition and setting), ``iris_summary.csv``/``iris_summary.md`` and
``iris_reproduction.png`` into ``--out``.

    python examples/reproduce_iris.py                      # 100 inits: about 15-20 min on one CPU core
    python examples/reproduce_iris.py --inits 10 --out /tmp/iris
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
from dataclasses import asdict, dataclass
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_chaos import ChaosProbe
from lightning_chaos.functional import best_window_fit, default_fit_windows, network_mle

DEFAULT_LRS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0)
DEFAULT_EPSILONS = (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
PAPER_EPSILON = 1e-8
SWEEP_LR = 1.0


# -- data and model -----------------------------------------------------------------------------------------------


def load_iris_split(split_seed: int = 0, num_train: int = 120) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's Iris (150 samples, unscaled) shuffled with ``split_seed``: the first ``num_train`` train."""
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    x = torch.tensor(features[order], dtype=torch.float64)
    y = torch.tensor(labels[order], dtype=torch.long)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


class RepeatedFullBatch(Dataset):
    """``num_steps`` items, each the whole training set: full-batch GD as one epoch of ``num_steps`` steps.

    One epoch of many identical batches instead of many one-batch epochs skips Lightning's per-epoch overhead (about
    a third of a bare Trainer's time here); the optimizer steps are the same.
    """

    def __init__(self, x: Tensor, y: Tensor, num_steps: int) -> None:
        self.x, self.y, self.num_steps = x, y, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


def init_paper_weights(module: nn.Module, seed: int) -> None:
    """Weights N(0, 1) drawn in float64 from a generator seeded with ``seed``; biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64))
                layer.bias.zero_()


class IrisMLP(L.LightningModule):
    """4-10-3, sigmoid hidden layer, logits out (softmax inside the cross-entropy), float64, plain SGD."""

    def __init__(self, lr: float, init_seed: int, hidden: int = 10) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Sigmoid(), nn.Linear(hidden, 3)).double()
        init_paper_weights(self.net, init_seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)


class LossRecorder(L.Callback):
    """The real model's training loss at every step (the loss Lightning computed; nothing is recomputed)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def minimal_trainer(max_steps: int, callbacks: list, **overrides) -> L.Trainer:  # noqa: ANN003
    """A Trainer with everything that costs time and is not needed here switched off."""
    settings = dict(
        max_steps=max_steps,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def quiet_lightning() -> None:
    """Silence per-fit chatter (no-logger warnings, probe summaries) when thousands of fits run."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_chaos"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*ChaosProbe: the Trainer has no logger.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`max_epochs`.*")


# -- the measurement ----------------------------------------------------------------------------------------------


@dataclass
class ExponentFit:
    """Best-R² window fit of ln d̄(t), d̄ the mean over one initial condition's shadows."""

    exponent: float
    r2: float
    start: int
    width: int
    shadows_alive: int


def fit_mean_distance(distances: Tensor) -> ExponentFit:
    """The paper's per-initial-condition fit: average d(t) over the shadows, then the best-R² window on ln d̄.

    Shadows whose trajectory turned non-finite are left out of the average (the probe retires them).
    """
    alive = torch.isfinite(distances).all(0)
    if not alive.any():
        return ExponentFit(math.nan, math.nan, -1, -1, 0)
    mean_distance = distances[:, alive].mean(1)
    log_d = torch.where(mean_distance > 0, mean_distance.log(), torch.nan)
    starts, widths = default_fit_windows(len(log_d))
    fit = best_window_fit(log_d, starts, widths)
    return ExponentFit(fit.exponent.item(), fit.r2.item(), int(fit.start), int(fit.width), int(alive.sum()))


@dataclass
class InitResult:
    """Everything measured for one initial condition at one learning rate (all probes of that fit)."""

    lr: float
    init: int
    fits: dict  # epsilon -> ExponentFit
    log_mean_distance: dict  # epsilon -> list[float], ln d̄(t)
    losses: list
    train_acc: float
    test_acc: float
    seconds: float


def run_init(
    lr: float,
    init: int,
    epsilons: Sequence[float],
    steps: int,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    num_shadows: int = 5,
    hidden: int = 10,
) -> InitResult:
    """Train one initial condition for ``steps`` full-batch GD steps with one ChaosProbe per ε attached."""
    x_train, y_train, x_test, y_test = data
    start = time.perf_counter()
    model = IrisMLP(lr, init_seed=init, hidden=hidden)
    probes = [
        ChaosProbe(
            epsilon=eps,
            num_shadows=num_shadows,
            distribution="uniform",
            relative=False,
            perturb_biases=False,
            norm="l1",
            renormalize_every=None,
            seed=init,  # the same δ pattern for every ε of this init, scaled: the ε sweep changes only its size
            log_every_n_steps=10**9,  # nothing is logged (no logger); skip the periodic bookkeeping
        )
        for eps in epsilons
    ]
    recorder = LossRecorder()
    trainer = minimal_trainer(steps, probes + [recorder])
    trainer.fit(model, DataLoader(RepeatedFullBatch(x_train, y_train, steps), batch_size=None))
    with torch.no_grad():
        train_acc = (model(x_train).argmax(1) == y_train).double().mean().item()
        test_acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    fits, curves = {}, {}
    for eps, probe in zip(epsilons, probes):
        distances = probe.distances
        fits[eps] = fit_mean_distance(distances)
        mean_d = distances[:, torch.isfinite(distances).all(0)].mean(1)
        curves[eps] = mean_d.log().tolist()
    return InitResult(lr, init, fits, curves, recorder.losses, train_acc, test_acc, time.perf_counter() - start)


@dataclass
class Summary:
    lr: float
    epsilon: float
    inits: int
    kept: int
    lambda_nmle: float
    lambda_std: float
    median_exponent_all: float
    median_r2_all: float
    loss_increase_fraction: float
    final_train_acc: float
    final_test_acc: float
    seconds_per_init: float


def summarise(results: Sequence[InitResult], eps: float) -> Summary:
    fits = [r.fits[eps] for r in results]
    exponents = torch.tensor([f.exponent for f in fits], dtype=torch.float64)
    r2 = torch.tensor([f.r2 for f in fits], dtype=torch.float64)
    mean, std, kept = network_mle(exponents, torch.nan_to_num(r2, nan=-1.0), min_r2=0.9, min_exponent=0.05)
    increases = [np.mean(np.diff(r.losses) > 0) for r in results]
    return Summary(
        lr=results[0].lr,
        epsilon=eps,
        inits=len(results),
        kept=kept,
        lambda_nmle=mean,
        lambda_std=std,
        median_exponent_all=float(np.nanmedian(exponents.numpy())),
        median_r2_all=float(np.nanmedian(r2.numpy())) if torch.isfinite(r2).any() else math.nan,
        loss_increase_fraction=float(np.mean(increases)),
        final_train_acc=float(np.mean([r.train_acc for r in results])),
        final_test_acc=float(np.mean([r.test_acc for r in results])),
        seconds_per_init=float(np.mean([r.seconds for r in results])),
    )


def run_experiment(
    inits: int = 100,
    steps: int = 200,
    lrs: Sequence[float] = DEFAULT_LRS,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    sweep_lr: float = SWEEP_LR,
    paper_epsilon: float = PAPER_EPSILON,
    split_seed: int = 0,
    first_init: int = 0,
    verbose: bool = True,
) -> tuple[list[Summary], dict]:
    """All settings: every ``lrs`` at ``paper_epsilon``, and every ``epsilons`` at ``sweep_lr``.

    Returns the summaries and the raw per-init results ``{lr: [InitResult, ...]}``.
    """
    quiet_lightning()
    data = load_iris_split(split_seed)
    settings = {lr: [paper_epsilon] for lr in lrs}
    if sweep_lr is not None and epsilons:
        settings[sweep_lr] = sorted(set(settings.get(sweep_lr, [])) | set(epsilons))
    raw: dict = {}
    summaries: list[Summary] = []
    for lr in sorted(settings):
        start = time.perf_counter()
        raw[lr] = [run_init(lr, i, settings[lr], steps, data) for i in range(first_init, first_init + inits)]
        for eps in settings[lr]:
            summaries.append(summarise(raw[lr], eps))
        if verbose:
            print(
                f"η = {lr:g}: {inits} inits × {len(settings[lr])} ε in {time.perf_counter() - start:.1f} s"
                f" ({np.mean([r.seconds for r in raw[lr]]):.2f} s per init)",
                flush=True,
            )
    return summaries, raw


# -- output -------------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    lines = [
        "| η | ε | inits | kept (R²>0.9, Λ>0.05) | λ_nMLE ± std (per step) | median Λ (all) | median R² (all) |"
        " loss rises (share of steps) | train acc | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lam = "no kept fit" if s.kept == 0 else f"{s.lambda_nmle:.4f} ± {s.lambda_std:.4f}"
        lines.append(
            f"| {s.lr:g} | {s.epsilon:.0e} | {s.inits} | {s.kept} | {lam} | {_fmt(s.median_exponent_all, 4)} |"
            f" {_fmt(s.median_r2_all)} | {s.loss_increase_fraction:.2f} | {s.final_train_acc:.3f} |"
            f" {s.final_test_acc:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(summaries: Sequence[Summary], raw: dict, out: str, wall_seconds: float) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "iris_summary.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(summaries[0])))
        writer.writeheader()
        for s in summaries:
            writer.writerow(asdict(s))
    with open(os.path.join(out, "iris_runs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "epsilon", "init", "exponent", "r2", "window_start", "window_width", "shadows_alive",
                         "train_acc", "test_acc", "seconds"])
        for lr, results in raw.items():
            for r in results:
                for eps, f in r.fits.items():
                    writer.writerow([lr, eps, r.init, f.exponent, f.r2, f.start, f.width, f.shadows_alive,
                                     r.train_acc, r.test_acc, r.seconds])
    with open(os.path.join(out, "iris_summary.md"), "w") as handle:
        handle.write(markdown_table(summaries))
        handle.write(f"\nWall time: {wall_seconds:.0f} s.\n")


def save_raw(raw: dict, path: str, meta: dict) -> None:
    """Every initial condition's result (curves included) as gzipped JSON, for ``--from-raw``."""
    rows = []
    for results in raw.values():
        for r in results:
            row = asdict(r)
            row["fits"] = [[eps, asdict(f)] for eps, f in r.fits.items()]
            row["log_mean_distance"] = [[eps, curve] for eps, curve in r.log_mean_distance.items()]
            rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with gzip.open(path, "wt") as handle:
        json.dump({"meta": meta, "runs": rows}, handle)


def load_raw(path: str) -> tuple[list[Summary], dict, dict]:
    """Summaries, per-init results and the metadata saved by :func:`save_raw`."""
    with gzip.open(path, "rt") as handle:
        content = json.load(handle)
    raw: dict = {}
    for row in content["runs"]:
        row["fits"] = {eps: ExponentFit(**f) for eps, f in row["fits"]}
        row["log_mean_distance"] = {eps: curve for eps, curve in row["log_mean_distance"]}
        raw.setdefault(row["lr"], []).append(InitResult(**row))
    summaries = [summarise(raw[lr], eps) for lr in sorted(raw) for eps in sorted(raw[lr][0].fits)]
    return summaries, raw, content["meta"]


def plot(summaries: Sequence[Summary], raw: dict, path: str, paper_epsilon: float = PAPER_EPSILON,
         sweep_lr: float = SWEEP_LR) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    shown = [lr for lr in (0.01, sweep_lr, 5.0) if lr in raw] or sorted(raw)[:3]
    colors = dict(zip(shown, ("tab:blue", "tab:red", "tab:green")))
    for lr in shown:
        for k, r in enumerate(raw[lr][:8]):
            ax.plot(r.log_mean_distance[paper_epsilon], color=colors[lr], alpha=0.6, lw=1,
                    label=f"η = {lr:g}" if k == 0 else None)
    ax.set_xlabel("step t")
    ax.set_ylabel("ln d̄(t)  (L1, mean of 5 shadows)")
    ax.set_title(f"(a) separation, ε = {paper_epsilon:g}, 8 initial conditions each")
    ax.legend()

    ax = axes[0, 1]
    for lr in shown:
        for k, r in enumerate(raw[lr][:8]):
            ax.plot(r.losses, color=colors[lr], alpha=0.6, lw=1, label=f"η = {lr:g}" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("training loss")
    ax.set_title("(b) training loss of the same runs")
    ax.legend()

    ax = axes[1, 0]
    sweep = [s for s in summaries if s.lr == sweep_lr]
    if sweep:
        eps = [s.epsilon for s in sweep]
        ax.errorbar(eps, [s.lambda_nmle for s in sweep], yerr=[s.lambda_std for s in sweep], marker="o", capsize=4)
        for s in sweep:
            ax.annotate(f"{s.kept}/{s.inits}", (s.epsilon, s.lambda_nmle), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
        ax.set_xscale("log")
    ax.set_xlabel("ε")
    ax.set_ylabel("λ_nMLE (per step)")
    ax.set_title(f"(c) λ_nMLE vs ε at η = {sweep_lr:g} (labels: kept / inits)")

    ax = axes[1, 1]
    rng = np.random.default_rng(0)
    labelled = False
    for lr in sorted(raw):
        if paper_epsilon not in raw[lr][0].fits:
            continue
        fits = [r.fits[paper_epsilon] for r in raw[lr]]
        exps = np.array([f.exponent for f in fits])
        kept = (np.nan_to_num(np.array([f.r2 for f in fits]), nan=-1) > 0.9) & (exps > 0.05)
        x = lr * np.exp(rng.uniform(-0.12, 0.12, len(exps)))
        first = lr == sorted(raw)[0]
        ax.scatter(x[kept], exps[kept], s=10, color="tab:blue", label="kept (R² > 0.9, Λ > 0.05)" if first else None)
        ax.scatter(x[~kept], exps[~kept], s=10, facecolors="none", edgecolors="tab:gray",
                   label="rejected" if first else None)
        summary = next((s for s in summaries if s.lr == lr and s.epsilon == paper_epsilon), None)
        if summary is not None and summary.kept:
            ax.errorbar([lr], [summary.lambda_nmle], yerr=[summary.lambda_std], color="tab:red", marker="_", ms=18,
                        capsize=5, lw=2, label=None if labelled else "λ_nMLE ± std of the kept")
            labelled = True
    ax.axhline(0.05, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("local exponent Λ (best window, per step)")
    ax.set_title(f"(d) Λ of every initial condition, ε = {paper_epsilon:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_overhead(steps: int = 200, repeats: int = 5, lr: float = 1.0) -> list[tuple[str, float]]:
    """Median wall time of one initial condition's training, with and without Lightning and the probe.

    Interleaved rounds, medians (the machine is noisy). "plain PyTorch" is the real model alone in a bare loop (a
    floor, not a reproduction); the Trainer variants are what the experiment runs.
    """
    quiet_lightning()
    x_train, y_train, _, _ = load_iris_split(0)

    def plain() -> None:
        model = IrisMLP(lr, init_seed=0)
        optimizer = model.configure_optimizers()
        for _ in range(steps):
            optimizer.zero_grad()
            model.training_step((x_train, y_train), 0).backward()
            optimizer.step()

    def trainer(num_probes: int, one_batch_epochs: bool, vectorize: bool = True) -> None:
        probes = [ChaosProbe(epsilon=1e-8, num_shadows=5, relative=False, norm="l1", seed=k, log_every_n_steps=10**9,
                             vectorize=vectorize) for k in range(num_probes)]
        if one_batch_epochs:
            fit_trainer = minimal_trainer(-1, probes, max_epochs=steps)
            loader = DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=len(y_train))
        else:
            fit_trainer = minimal_trainer(steps, probes)
            loader = DataLoader(RepeatedFullBatch(x_train, y_train, steps), batch_size=None)
        fit_trainer.fit(IrisMLP(lr, init_seed=0), loader)

    variants = [
        ("plain PyTorch loop, real model only", plain),
        ("Trainer, no probe, 1 epoch of 200 full batches", lambda: trainer(0, False)),
        ("Trainer, no probe, 200 one-batch epochs", lambda: trainer(0, True)),
        ("Trainer + ChaosProbe (5 shadows, batched), 1 epoch of 200 batches", lambda: trainer(1, False)),
        ("Trainer + ChaosProbe (5 shadows, one at a time), 1 epoch of 200 batches", lambda: trainer(1, False, False)),
        ("Trainer + ChaosProbe (5 shadows, batched), 200 one-batch epochs", lambda: trainer(1, True)),
        ("Trainer + 7 ChaosProbes (35 shadows, the ε sweep), batched", lambda: trainer(7, False)),
        ("Trainer + 7 ChaosProbes (35 shadows, the ε sweep), one at a time", lambda: trainer(7, False, False)),
    ]
    times: dict = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, run in variants:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return [(name, float(np.median(values))) for name, values in times.items()]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", type=int, default=100, help="initial conditions per setting")
    parser.add_argument("--steps", type=int, default=200, help="full-batch GD steps (d(t) has steps + 1 points)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning rates at ε = 1e-8")
    parser.add_argument("--epsilons", type=float, nargs="*", default=list(DEFAULT_EPSILONS),
                        help="ε values swept at --sweep-lr")
    parser.add_argument("--sweep-lr", type=float, default=SWEEP_LR, help="learning rate of the ε sweep")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1 is fastest)")
    parser.add_argument("--out", default="docs", help="folder for the CSV, markdown table and figure")
    parser.add_argument("--save-raw", default=None, metavar="FILE",
                        help="also save every run (curves included) as gzipped JSON")
    parser.add_argument("--from-raw", default=None, metavar="FILE",
                        help="no training: write the tables and figure from a file of --save-raw")
    parser.add_argument("--timing", action="store_true",
                        help="only measure the cost of one fit with and without Lightning and the probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        print(f"one initial condition, {args.steps} full-batch steps, median of 5 interleaved rounds:")
        for name, seconds in measure_overhead(args.steps):
            print(f"  {seconds * 1000:8.0f} ms  {name}")
        return
    if args.from_raw:
        summaries, raw, meta = load_raw(args.from_raw)
        wall = meta["wall_s"]
    else:
        start = time.perf_counter()
        summaries, raw = run_experiment(args.inits, args.steps, args.lrs, args.epsilons, args.sweep_lr,
                                        split_seed=args.split_seed)
        wall = time.perf_counter() - start
        if args.save_raw:
            save_raw(raw, args.save_raw, {"args": vars(args), "wall_s": wall})
    write_outputs(summaries, raw, args.out, wall)
    plot(summaries, raw, os.path.join(args.out, "iris_reproduction.png"), sweep_lr=args.sweep_lr)
    print()
    print(markdown_table(summaries))
    print(f"Wall time: {wall:.1f} s ({torch.get_num_threads()} torch thread(s)); outputs in {args.out}/")


if __name__ == "__main__":
    main()
