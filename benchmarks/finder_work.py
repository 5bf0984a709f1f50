"""How much model work the stacked finder does, with diverged candidates leaving the stack, against keeping them.

Counts the rows (model copies) of every batched forward/backward of ``find_chaos_lr`` with its defaults on the
benchmark tasks. "kept" is what the sweep computed before diverged candidates left the stack: every stack's first
size times the steps it ran. The counts are exact and do not depend on the machine.

``--timing`` also times the sweep both ways in one process, interleaved: as it is, and with the earlier
``_train_stacked`` (below, without its fallback to one candidate at a time, which these tasks never need), which kept
diverged candidates' rows in the vmap.

    python benchmarks/finder_work.py --tasks digits_mlp mnist_mlp digits_cnn
    python benchmarks/finder_work.py --tasks digits_mlp mnist_mlp --timing 7
"""

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_chaos.sweep as sweep_module  # noqa: E402
from bench_finder import _trainer  # noqa: E402
from lightning_chaos import find_chaos_lr  # noqa: E402
from tasks import TASKS  # noqa: E402


def count_rows(task_name: str, seed: int, root: str) -> tuple[int, int]:
    """(rows computed, rows had the stacks kept their first size) over one sweep; a grid's first stack starts it."""
    computed, kept = 0, 0
    grid_size: list[int] = []  # the first stack's size of the grid being trained (coarse, then refinement)
    original_grid = sweep_module.LRSweep._train_stacked
    original_init, original_step = sweep_module.StackedShadows.__init__, sweep_module.StackedShadows.forward_backward

    def train_grid(self, candidates):
        grid_size[:] = []
        return original_grid(self, candidates)

    def init(self, shadows, *args, **kwargs):
        if not grid_size:
            grid_size.append(len(shadows))
        original_init(self, shadows, *args, **kwargs)

    def step(self, *args, **kwargs):
        nonlocal computed, kept
        computed += len(self.shadows)
        kept += grid_size[0]
        return original_step(self, *args, **kwargs)

    sweep_module.LRSweep._train_stacked = train_grid
    sweep_module.StackedShadows.__init__, sweep_module.StackedShadows.forward_backward = init, step
    try:
        task = TASKS[task_name]
        seed_everything(seed, verbose=False)
        find_chaos_lr(_trainer(task.budget, [], root), task.make_model(task.default_lr), datamodule=task.make_datamodule())
    finally:
        sweep_module.LRSweep._train_stacked = original_grid
        sweep_module.StackedShadows.__init__, sweep_module.StackedShadows.forward_backward = original_init, original_step
    return computed, kept


def _train_stacked_keeping_diverged(self, candidates):
    """The finder's ``_train_stacked`` before diverged candidates left the stack (commit 'One check for the vectorize
    argument ...'): one stack for the whole grid; a diverged candidate's rows are still computed, then ignored."""
    device, batches, step_context = self.module.device, self.batches, self.step_context
    names = [n for n, p in self.module.named_parameters() if p.requires_grad]
    stacked = self._stack_candidates(candidates, names)
    width = 1 + self.num_shadows
    for batch_idx, (batch, rng_state) in enumerate(batches):
        if all(c.done for c in candidates):
            break
        losses = None
        if stacked is not None:
            with sweep_module.replayed_rng(rng_state, device):
                losses, grads = stacked.forward_backward(batch, batch_idx, step_context)
        for index, candidate in enumerate(candidates):
            if candidate.done:
                continue
            offset = index * width
            candidate.reference.take_gradients(grads, [offset], zero_grad=True)
            candidate.shadows.take_gradients(grads, range(offset + 1, offset + width), zero_grad=True)
            candidate.step(losses[offset], self.renormalize_every)


def time_both(task_name: str, reps: int, root: str) -> tuple[float, bool]:
    """Median over ``reps`` interleaved pairs of (seconds keeping diverged rows) / (seconds as it is), and whether
    every pair gave the same suggestion."""
    task, current = TASKS[task_name], sweep_module.LRSweep._train_stacked
    ratios, same = [], True
    for rep in range(reps + 1):  # the first pair warms up
        seconds, suggestions = {}, {}
        for arm in (("pruned", "kept") if rep % 2 else ("kept", "pruned")):
            sweep_module.LRSweep._train_stacked = current if arm == "pruned" else _train_stacked_keeping_diverged
            try:
                seed_everything(rep, verbose=False)
                model, dm = task.make_model(task.default_lr), task.make_datamodule()
                trainer = _trainer(task.budget, [], root)
                started = time.perf_counter()
                suggestions[arm] = find_chaos_lr(trainer, model, datamodule=dm).suggestion
                seconds[arm] = time.perf_counter() - started
            finally:
                sweep_module.LRSweep._train_stacked = current
        if rep:
            ratios.append(seconds["kept"] / seconds["pruned"])
            same &= suggestions["kept"] == suggestions["pruned"]
    return statistics.median(ratios), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--timing", type=int, default=0, help="also time both ways, this many interleaved pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    timed = " kept / pruned, wall (median) | same suggestion |" if args.timing else ""
    print("| task | model steps computed | with diverged candidates kept | saved |" + timed)
    print("|---|---:|---:|---:|" + ("---:|---|" if args.timing else ""))
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                counts = [count_rows(name, seed, root) for seed in range(args.seeds)]
                timing = time_both(name, args.timing, root) if args.timing else None
            computed, kept = sum(c for c, _ in counts) / len(counts), sum(k for _, k in counts) / len(counts)
            row = f"| {name} | {computed:.0f} | {kept:.0f} | {1 - computed / kept:.0%} |"
            if timing is not None:
                row += f" {timing[0]:.2f} | {timing[1]} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
