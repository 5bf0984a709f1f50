"""How much model work the stacked finder does, with diverged candidates leaving the stack, against keeping them.

Counts the rows (model copies) of every batched forward/backward of ``find_chaos_lr`` with its defaults on the
benchmark tasks. "kept" is what the sweep computed before diverged candidates left the stack: every stack's first
size times the steps it ran. The counts are exact and do not depend on the machine.

    python benchmarks/finder_work.py --tasks digits_mlp mnist_mlp digits_cnn
"""

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_chaos.finder as finder_module  # noqa: E402
from bench_finder import _trainer  # noqa: E402
from lightning_chaos import find_chaos_lr  # noqa: E402
from tasks import TASKS  # noqa: E402


def count_rows(task_name: str, seed: int, root: str) -> tuple[int, int]:
    """(rows computed, rows had the stacks kept their first size) over one sweep; a grid's first stack starts it."""
    computed, kept = 0, 0
    grid_size: list[int] = []  # the first stack's size of the grid being trained (coarse, then refinement)
    original_grid = finder_module.ChaosLRFinder._train_stacked
    original_init, original_step = finder_module.StackedShadows.__init__, finder_module.StackedShadows.forward_backward

    def train_grid(self, pl_module, candidates, *args, **kwargs):
        grid_size[:] = []
        return original_grid(self, pl_module, candidates, *args, **kwargs)

    def init(self, shadows, *args, **kwargs):
        if not grid_size:
            grid_size.append(len(shadows))
        original_init(self, shadows, *args, **kwargs)

    def step(self, *args, **kwargs):
        nonlocal computed, kept
        computed += len(self.shadows)
        kept += grid_size[0]
        return original_step(self, *args, **kwargs)

    finder_module.ChaosLRFinder._train_stacked = train_grid
    finder_module.StackedShadows.__init__, finder_module.StackedShadows.forward_backward = init, step
    try:
        task = TASKS[task_name]
        seed_everything(seed, verbose=False)
        find_chaos_lr(_trainer(task.budget, [], root), task.make_model(task.default_lr), datamodule=task.make_datamodule())
    finally:
        finder_module.ChaosLRFinder._train_stacked = original_grid
        finder_module.StackedShadows.__init__, finder_module.StackedShadows.forward_backward = original_init, original_step
    return computed, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    print("| task | model steps computed | with diverged candidates kept | saved |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                counts = [count_rows(name, seed, root) for seed in range(args.seeds)]
            computed, kept = sum(c for c, _ in counts) / len(counts), sum(k for _, k in counts) / len(counts)
            print(f"| {name} | {computed:.0f} | {kept:.0f} | {1 - computed / kept:.0%} |", flush=True)


if __name__ == "__main__":
    main()
