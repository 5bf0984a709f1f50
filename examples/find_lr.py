"""Find a learning rate with ChaosLRFinder, see the evidence, and check it against the default and Lightning's lr_find.

Sweeps the learning rate of an MLP on scikit-learn's real 8×8 digits (the quickstart's data), saves the sweep's
figure, and then trains three times from the same initial weights, at the finder's suggestion, at the module's
default and at Lightning's ``lr_find`` suggestion, counting the optimizer steps to a target validation accuracy.
About 15 s on 2 CPU cores.

    python examples/find_lr.py                      # tanh MLP: the onset of chaos and the band's top coincide
    python examples/find_lr.py --activation relu    # ReLU MLP: chaotic from η ≈ 0.1, learns well up to η ≈ 1
    python examples/find_lr.py --anchor onset       # the seed paper's rule instead of the default
"""

import argparse
import logging
import warnings
from typing import Optional

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.tuner import Tuner

from lightning_chaos import find_chaos_lr
from lightning_chaos.demo import DigitsDataModule, MLPClassifier


class StepsToTarget(Callback):
    """The first optimizer step after which the validation accuracy reached ``target`` (checked at every validation)."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.step: Optional[int] = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val_acc")
        if self.step is None and not trainer.sanity_checking and accuracy is not None and accuracy >= self.target:
            self.step = trainer.global_step


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def model(activation: str, lr: float = 0.1, seed: int = 0) -> MLPClassifier:
    L.seed_everything(seed, verbose=False)  # the same initial weights every time
    return MLPClassifier(hidden=(128,), activation=activation, lr=lr)


def steps_to_target(activation: str, lr: float, epochs: int, target: float) -> tuple[Optional[int], float]:
    timer = StepsToTarget(target)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[timer], num_sanity_val_steps=0, val_check_interval=5,
                            check_val_every_n_epoch=None)  # every 5 optimizer steps, across epoch boundaries
    datamodule = DigitsDataModule(batch_size=64)
    trained = model(activation, lr)
    trainer.fit(trained, datamodule=datamodule)
    final = trainer.validate(trained, datamodule=datamodule, verbose=False)[0]["val_acc"]
    return timer.step, float(final)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--anchor", choices=["trainability", "onset"], default="trainability")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each comparison run (22 steps each)")
    parser.add_argument("--target", type=float, default=0.95, help="validation accuracy that stops the clock")
    parser.add_argument("--figure", default="chaos_lr.png", help="where to save the sweep's figure ('' to skip)")
    args = parser.parse_args(argv)

    # 1. The sweep: on clones, before training; the model keeps its weights and gets the suggested lr.
    swept = model(args.activation)
    result = find_chaos_lr(quiet_trainer(max_epochs=1), swept, datamodule=DigitsDataModule(batch_size=64),
                           anchor=args.anchor)
    def show(lr: Optional[float]) -> str:
        return "none" if lr is None else f"{lr:.3g}"

    print(f"\nChaosLRFinder ({args.anchor} anchor): onset of chaos at lr={show(result.onset)}, top of the learning"
          f" band at lr={show(result.trainability_edge)}, suggestion lr={show(result.suggestion)}"
          + (f" ({result.reason})" if result.reason else ""))
    if args.figure:
        result.plot().savefig(args.figure)
        print(f"The sweep's figure: {args.figure}")

    # 2. Lightning's own finder on the same initial model, for comparison.
    # (lr_find runs up to 100 steps inside the Trainer's own limits: give it room for all of them.)
    lr_find = Tuner(quiet_trainer(max_epochs=10)).lr_find(model(args.activation),
                                                          datamodule=DigitsDataModule(batch_size=64))
    lr_find_lr = lr_find.suggestion() if lr_find is not None else None

    # 3. Train from the same initial weights at each learning rate and count the steps to the target accuracy.
    rows = {"ChaosLRFinder": result.suggestion, "default": 0.1, "Lightning lr_find": lr_find_lr}
    measured = {}
    print(f"\n  learning rate from      lr         steps to {args.target:.0%}   final val_acc")
    for name, lr in rows.items():
        if lr is None:
            print(f"  {name:20s}  (no suggestion)")
            continue
        steps, accuracy = steps_to_target(args.activation, lr, args.epochs, args.target)
        measured[name] = (lr, steps, accuracy)
        reached = "never" if steps is None else str(steps)
        print(f"  {name:20s}  {lr:<9.3g}  {reached:>14s}   {accuracy:.3f}")
    print("\nOne seed, one task: benchmarks/FINDER_RESULTS.md has 15 tasks, 3-5 seeds each, and a dense grid of η.")
    return {"result": result, "model_lr": swept.lr, "measured": measured}


if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the results, not Lightning's chatter
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    main()
