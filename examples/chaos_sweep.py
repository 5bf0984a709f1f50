"""The seed paper's η sweep for any LightningModule and data module: Λ(η), ρ(η) and τ(η) with ChaosProbe.

The model and data are given LightningCLI-style (a YAML config and/or --model/--data arguments); the model must take
its learning rate as ``lr``. For every η and initialisation the script trains a fresh model with a ChaosProbe
attached and records the local exponent Λ (best-R² window fit before saturation), whether the run is chaotic (the
separation grew by at least one e-fold over the run), and τ, the optimizer steps to the target validation accuracy.

    python examples/chaos_sweep.py --config examples/configs/deep_mlp.yaml
    python examples/chaos_sweep.py --config examples/configs/small_cnn.yaml --sweep.lrs "[0.03, 0.3, 3]"

The ready configurations use Fashion-MNIST when Debian's ``dataset-fashion-mnist`` package is installed
(/usr/share/datasets/fashion-mnist), scikit-learn's digits otherwise.
"""

import csv
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_chaos import ChaosProbe
from lightning_chaos.functional import network_mle
from lightning_chaos.functional.onset import regime


class SweepCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--sweep.lrs", type=list[float], default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
        parser.add_argument("--sweep.inits", type=int, default=3, help="initialisations per η")
        parser.add_argument("--sweep.steps", type=int, default=300, help="optimizer steps per run")
        parser.add_argument("--sweep.shadows", type=int, default=2)
        parser.add_argument("--sweep.target", type=float, default=0.8, help="validation accuracy for τ")
        parser.add_argument("--sweep.val_every", type=int, default=10, help="validate every N steps (τ resolution)")
        parser.add_argument("--sweep.out", type=str, default="chaos_sweep.csv")


def run(args=None) -> list[dict]:
    cli = SweepCLI(run=False, args=args, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_callback=None, trainer_defaults={"logger": False})
    sweep = cli.config.sweep
    model_class = type(cli.model)
    model_kwargs = dict(cli.config.model.init_args)
    datamodule = cli.datamodule
    if "in_features" in model_kwargs and hasattr(datamodule, "num_features"):
        model_kwargs["in_features"] = datamodule.num_features
    rows = []
    started = time.monotonic()
    for lr in sweep.lrs:
        for init in range(sweep.inits):
            L.seed_everything(init, verbose=False)
            model = model_class(**{**model_kwargs, "lr": lr})
            probe = ChaosProbe(num_shadows=sweep.shadows, monitor="val_acc", target=sweep.target)
            trainer = L.Trainer(
                max_steps=sweep.steps, callbacks=[probe], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                val_check_interval=sweep.val_every, check_val_every_n_epoch=None,
            )
            trainer.fit(model, datamodule=datamodule)
            fit = probe.window_fit
            exponent = probe.lyapunov_exponent
            reached = probe.time_to_target
            rows.append({
                "lr": lr, "init": init, "exponent": exponent,
                "r2": float(fit.r2.nanmean()) if fit is not None else float("nan"),
                "regime": regime(exponent, probe.distances.shape[0] - 1),
                "tau": reached["step"] if reached else None,
                "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
            })
    seconds = time.monotonic() - started
    report(rows, sweep, seconds)
    return rows


def report(rows: list[dict], sweep, seconds: float) -> None:
    with open(sweep.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n| η | ρ (chaotic share) | mean Λ per step | λ_nMLE (R²>0.9, Λ>1/steps) | reached {sweep.target:g} | ⟨τ⟩ steps |")
    print("|---|---|---|---|---|---|")
    for lr in sweep.lrs:
        runs = [r for r in rows if r["lr"] == lr]
        exponents = [r["exponent"] for r in runs]
        rho = sum(r["regime"] == "chaotic" for r in runs) / len(runs)
        mean, std, kept = network_mle(
            torch.tensor(exponents), torch.tensor([r["r2"] for r in runs]), min_exponent=1.0 / sweep.steps
        )
        taus = [r["tau"] for r in runs if r["tau"] is not None]
        tau = f"{sum(taus) / len(taus):.0f}" if taus else "never"
        nmle = f"{mean:.4f} ± {std:.4f} ({kept})" if kept else "–"
        print(f"| {lr:g} | {rho:.2f} | {sum(exponents) / len(exponents):+.4f} | {nmle} | {len(taus)}/{len(runs)} | {tau} |")
    print(f"\n{len(rows)} runs in {seconds:.0f} s; per-run rows in {Path(sweep.out).resolve()}")


if __name__ == "__main__":
    run()
