"""The stacked optimizer step of the finder: what it changes in the suggestions, and what it saves in wall time.

For each task and seed, ``find_chaos_lr`` with its defaults runs twice on fresh copies of the same seeded model, in one
process, interleaved (the order alternates with the seed): as it is, with every candidate's optimizer step made at
once (:class:`~lightning_chaos.vectorized.StackedOptimizer`), and with one optimizer step per candidate (the finder
before it). The stacked step rounds differently (the update is formed at η = 1 and scaled), so the two sweeps agree
to rounding where the trajectory is ordered and part where it is chaotic; the suggestion is what counts. Reported per
task: how many seeds give the same suggestion, and the wall-time ratio (median over seeds).

    python benchmarks/stacked_optimizer.py --tasks digits_adam digits_mlp --seeds 10 --json /tmp/stacked_opt.json
"""

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_chaos.sweep as sweep_module  # noqa: E402
from bench_finder import default_finder  # noqa: E402
from tasks import TASKS  # noqa: E402


def sweep(task_name: str, seed: int, root: str, stacked_optimizer: bool) -> dict:
    task = TASKS[task_name]
    original = sweep_module.LRSweep._stacked_optimizer
    if not stacked_optimizer:
        sweep_module.LRSweep._stacked_optimizer = lambda self, stacked, candidates: None
    try:
        result, seconds = default_finder(task, seed, root)
    finally:
        sweep_module.LRSweep._stacked_optimizer = original
    return {
        "seconds": seconds,
        "suggestion": result.suggestion,
        "trainability_edge": result.trainability_edge,
        "onset": result.onset,
        "lrs": result.lrs.tolist(),
        "exponents": result.exponents.tolist(),
        "loss_ratio": result.loss_ratio.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_chaos").setLevel(logging.ERROR)
    report: dict = {"torch": torch.__version__, "tasks": {}}
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    order = (True, False) if seed % 2 == 0 else (False, True)
                    pair = {flag: sweep(name, seed, root, flag) for flag in order}
                runs.append({"seed": seed, "stacked": pair[True], "per_candidate": pair[False]})
            report["tasks"][name] = runs
            same = sum(r["stacked"]["suggestion"] == r["per_candidate"]["suggestion"] for r in runs)
            ratio = statistics.median(r["per_candidate"]["seconds"] / r["stacked"]["seconds"] for r in runs)
            changed = [
                f"seed {r['seed']}: {r['per_candidate']['suggestion']:.3g} -> {r['stacked']['suggestion']:.3g}"
                for r in runs
                if r["stacked"]["suggestion"] != r["per_candidate"]["suggestion"]
                and None not in (r["stacked"]["suggestion"], r["per_candidate"]["suggestion"])
            ]
            print(f"[{name}] same suggestion on {same}/{len(runs)} seeds; per-candidate/stacked wall time"
                  f" {ratio:.2f}x; {'; '.join(changed)}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main()
