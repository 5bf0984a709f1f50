"""Quickstart: watch the chaos in a small network's training on real handwritten digits.

Trains an MLP (64-128-10, tanh, dropout) with SGD on scikit-learn's 1797 real 8×8 digits at three learning rates
(gentle, brisk, and at the edge of chaos), each with a ChaosProbe of 4 shadows attached, and writes TensorBoard
logs. Runs in under a minute on 2 CPU cores.

    python examples/quickstart.py
    tensorboard --logdir chaos_logs
"""

import argparse

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_chaos import ChaosProbe
from lightning_chaos.demo import DigitsDataModule, MLPClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.4, 1.2], help="learning rates to compare")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--logdir", default="chaos_logs")
    args = parser.parse_args()

    rows = []
    for lr in args.lrs:
        L.seed_everything(0, verbose=False)
        probe = ChaosProbe(num_shadows=args.shadows, monitor="val_acc", target=0.9)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            callbacks=[probe],
            logger=TensorBoardLogger(args.logdir, name=f"lr={lr:g}"),
            log_every_n_steps=5,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(MLPClassifier(lr=lr, dropout=0.1), datamodule=DigitsDataModule(batch_size=64))
        reached = probe.time_to_target
        rows.append((lr, probe.lyapunov_exponent, probe.local_exponents, reached, trainer.callback_metrics["val_acc"]))

    print("\n  lr    Λ per step (mean)   Λ per shadow                      val_acc   steps to 90 %")
    for lr, mean, per_shadow, reached, acc in rows:
        shadows = " ".join(f"{v:+.4f}" for v in per_shadow.tolist())
        steps = "never" if reached is None else f"{reached['step']} ({reached['seconds']:.1f} s)"
        print(f"{lr:6g}   {mean:+.5f}          {shadows:32s}  {acc.item():.3f}     {steps}")
    print(f"\nView the charts: tensorboard --logdir {args.logdir}   (then open the CUSTOM SCALARS tab)")


if __name__ == "__main__":
    main()
