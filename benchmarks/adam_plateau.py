"""Where the Λ ≈ 0.03 plateau of the digits CNN under Adam comes from (FINDER_RESULTS.md, third held-out set).

Runs the finder one candidate at a time on ``digits_cnn_adam`` (or ``--task``; seed 0) over a few η, records the
ln-growth of the separation in every pull-back period, and repeats with a window twice as long. A burst in the first
steps (a fixed total ln-growth after the transient period) halves Λ when the window doubles; a sustained rate does
not.

    python benchmarks/adam_plateau.py
    python benchmarks/adam_plateau.py --task digits_adam --ranges 1e-4 1e-3 0.003 0.03
"""

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings

from lightning.pytorch import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_chaos.shadow as shadow_module  # noqa: E402
from bench_finder import _trainer  # noqa: E402
from lightning_chaos import find_chaos_lr  # noqa: E402
from tasks import TASKS  # noqa: E402


def sweep(task_name: str, lrs: tuple[float, float], steps: int, root: str) -> tuple[object, dict[int, list[float]]]:
    """The finder's result over a 3-point grid from lrs[0] to lrs[1], and ln(d / d_prev) per period per shadow."""
    periods: dict[int, list[float]] = {}
    original = shadow_module.ShadowEnsemble.pull_back

    def recording_pull_back(self, distances):
        if self.perturbation.epsilon > 0:  # the shadows, not the ε = 0 reference
            periods.setdefault(id(self), []).append(math.log(float(distances[0] / self.previous_distance[0])))
        return original(self, distances)

    shadow_module.ShadowEnsemble.pull_back = recording_pull_back
    try:
        task = TASKS[task_name]
        seed_everything(0, verbose=False)
        result = find_chaos_lr(
            _trainer(task.budget, [], root), task.make_model(task.default_lr), datamodule=task.make_datamodule(),
            min_lr=lrs[0], max_lr=lrs[1], num_lrs=3, refine=0, vectorize=False, steps_per_lr=steps,
        )
    finally:
        shadow_module.ShadowEnsemble.pull_back = original
    return result, periods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits_cnn_adam", choices=list(TASKS))
    parser.add_argument("--ranges", type=float, nargs="+", default=[0.05, 0.08, 3e-4, 3e-3],
                        help="pairs of (smallest, largest) η of 3-point grids")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as root:
        for lrs in zip(args.ranges[::2], args.ranges[1::2]):
            for steps in (100, 200):
                result, periods = sweep(args.task, lrs, steps, root)
                print(f"steps_per_lr={steps}")
                for lr, exponent, ratio, growth in zip(
                    result.lrs.tolist(), result.exponents.tolist(), result.loss_ratio.tolist(), periods.values()
                ):
                    kept = growth[1:]  # the first period is the transient the estimate leaves out
                    print(f"  η={lr:.3g}  Λ={exponent:.4f}  loss ratio={ratio:.2f}  Σ ln-growth after the transient"
                          f" {sum(kept):.2f}; per period: " + " ".join(f"{g:.2f}" for g in growth[:12]))


if __name__ == "__main__":
    main()
