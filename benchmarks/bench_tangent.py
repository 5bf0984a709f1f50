"""Per-step cost of TangentProbe(k = 1, 4, 16) against ChaosProbe(num_shadows = 1, 4, 16) and no probe.

The quickstart MLP (64-128-10 tanh, SGD, batch 64 on sklearn digits) on the CPU, one thread. The machine is noisy, so
every configuration runs once per round, rounds interleaved, and the medians of per-step times are compared in one
process. A probe's *cost* is its median step time minus the unprobed one.

Formula: a tangent costs one Hessian-vector product of the step's loss plus the optimizer's linearised update — the
step's forward and a backward that keeps its graph (about one training step), then one more backward for all k
tangents at once (``is_grads_batched``) — and holds one copy of the parameters and optimizer state per tangent, plus a
QR of a [D, k] matrix per re-orthonormalisation (O(D k²); a norm for k = 1).

Arithmetic (``--flops``): each configuration trains once under ``torch.utils.flop_counter.FlopCounterMode``, which
counts the floating-point operations of matrix products and convolutions (forward, backward and double backward)
after the warm-up steps; the probe's arithmetic is that per step minus the plain run's. Unlike times these counts are
exact and the same on any machine: they give the floor the time ratios tend to once arithmetic, not per-operation
overhead, dominates (larger models, the GPU).

Peak memory (``--memory``): each configuration trains in its own process and reports its peak resident set size
(``ru_maxrss``); the probe's memory is that minus the plain run's.

Models (``--model``): ``mlp``, the quickstart MLP; ``cnn``, ``lightning_chaos.demo.SmallCNN`` (two 3×3 convolutions,
8 and 16 channels) on the same 8×8 digits.

Clock (``--clock``): ``wall``, wall time between batch starts; ``cpu``, the main thread's CPU time over the same span
(``time.thread_time``; with one torch thread and no loader workers all the work runs there), which leaves out the time
the process waits for a core while other jobs share the machine.

Run: ``python benchmarks/bench_tangent.py [--rounds 5] [--steps 60] [--model cnn] [--clock cpu] [--memory] [--flops]``;
writes benchmarks/results/tangent_cpu.json (``tangent_<model>_cpu.json`` for another model, ``..._memory`` for memory,
``..._flops`` for arithmetic).
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from lightning_chaos import ChaosProbe
from lightning_chaos.demo import DigitsDataModule, MLPClassifier, SmallCNN
from lightning_chaos.tangent import TangentProbe

RESULTS = Path(__file__).resolve().parent / "results" / "tangent_cpu.json"
WARMUP = 10


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class StepTimer(Callback):
    """Time between consecutive batch starts: everything a training step costs, the probes' work included."""

    def __init__(self, clock: str = "wall") -> None:
        self.starts: list[float] = []
        self.clock = CLOCKS[clock]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self.clock())


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None) -> int:
    """Each gradient of a convolution (input, weight) costs what its forward does.

    torch's own formula counts the weight gradient of a grouped convolution as if it were dense (``groups`` times too
    many), which is what vmap makes of the batched shadows' convolutions.
    """
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


class FlopCounter(Callback):
    """Floating-point operations of every step after the warm-up (FlopCounterMode: products and convolutions)."""

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            self.mode.__enter__()
        self.steps += trainer.global_step >= WARMUP

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)

    @property
    def per_step(self) -> float:
        return self.mode.get_total_flops() / self.steps


def configurations() -> dict:
    configs: dict = {"none": list}
    for k in (1, 4, 16):
        configs[f"tangent_k{k}"] = lambda k=k: [TangentProbe(num_exponents=k)]
    for k in (1, 4, 16):
        configs[f"chaos_k{k}"] = lambda k=k: [ChaosProbe(num_shadows=k, sentinel_steps=0)]
    return configs


MODELS = {"mlp": (MLPClassifier, "MLPClassifier 64-128-10 tanh, SGD, batch 64, sklearn digits"),
          "cnn": (SmallCNN, "SmallCNN conv(1→8)-conv(8→16)-linear, ReLU, SGD, batch 64, sklearn digits 8×8")}


def run_once(probes: list, steps: int, model: str = "mlp", clock: str = "wall", flops: bool = False) -> float:
    """Median time per step (``clock``), or with ``flops`` the floating-point operations per step."""
    L.seed_everything(0, verbose=False)
    timer = FlopCounter() if flops else StepTimer(clock)
    trainer = L.Trainer(max_steps=steps + WARMUP + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer, *probes])
    trainer.fit(MODELS[model][0](), DigitsDataModule(batch_size=64))
    if isinstance(timer, FlopCounter):
        return timer.per_step
    deltas = [b - a for a, b in zip(timer.starts, timer.starts[1:])][WARMUP:]
    return statistics.median(deltas)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--configs", help="comma-separated subset of the configurations (no file written)")
    parser.add_argument("--memory", action="store_true", help="peak memory per configuration, one process each")
    parser.add_argument("--flops", action="store_true", help="floating-point operations per step, exact")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its peak RSS
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    configs = configurations()
    if args.configs:
        configs = {name: configs[name] for name in ["none", *args.configs.split(",")] if name in configs}
    if args.one:
        run_once(configs[args.one](), args.steps, args.model)
        print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return {}
    suffix = "" if args.model == "mlp" else f"_{args.model}"
    if args.memory:
        peak = {}
        for name in configs:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--model",
                                  args.model], capture_output=True, text=True, check=True).stdout
            peak[name] = int(out.split("PEAK_RSS_KB")[-1].split()[0]) / 1024
        extra = {name: peak[name] - peak["none"] for name in configs if name != "none"}
        result = {"model": MODELS[args.model][1], "peak_rss_mb": peak, "probe_extra_mb": extra,
                  "parameters": sum(p.numel() for p in MODELS[args.model][0]().parameters())}
        (RESULTS.parent / f"tangent{suffix}_memory_cpu.json").write_text(json.dumps(result, indent=2))
        print(f"{'configuration':<14} {'peak MB':>8} {'extra MB':>9}")
        for name in configs:
            print(f"{name:<14} {peak[name]:8.1f} {extra.get(name, 0.0):9.1f}")
        return result
    pairs = {"tangent_k1_over_one_shadow": ("tangent_k1", "chaos_k1"),
             "tangent_k16_over_tangent_k1": ("tangent_k16", "tangent_k1"),
             "tangent_k4_over_tangent_k1": ("tangent_k4", "tangent_k1")}
    if args.flops:
        count = {name: run_once(make(), args.steps, args.model, flops=True) for name, make in configs.items()}
        extra = {name: count[name] - count["none"] for name in configs if name != "none"}
        ratios = {name: extra[a] / extra[b] for name, (a, b) in pairs.items() if a in extra and b in extra}
        result = {"model": MODELS[args.model][1], "torch": torch.__version__, "steps": args.steps,
                  "flops_per_step": count, "probe_extra_flops": extra, "ratios": ratios}
        if not args.configs:
            (RESULTS.parent / f"tangent{suffix}_flops.json").write_text(json.dumps(result, indent=2))
        print(f"{'configuration':<14} {'MFLOP/step':>11} {'probe':>8} {'× plain':>8}")
        for name in configs:
            print(f"{name:<14} {count[name] / 1e6:11.2f} {extra.get(name, 0.0) / 1e6:8.2f}"
                  f" {extra.get(name, 0.0) / count['none']:8.2f}")
        for name, value in ratios.items():
            print(f"{name}: {value:.2f}")
        return result
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, make in configs.items():
            times[name].append(run_once(make(), args.steps, args.model, args.clock))
    median = {name: statistics.median(values) for name, values in times.items()}
    cost = {name: median[name] - median["none"] for name in configs if name != "none"}
    ratios = {name: cost[a] / cost[b] for name, (a, b) in pairs.items() if a in cost and b in cost}
    result = {
        "model": MODELS[args.model][1],
        "device": "cpu, 1 thread",
        "clock": args.clock,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_step_ms": {k: 1e3 * v for k, v in median.items()},
        "probe_cost_ms": {k: 1e3 * v for k, v in cost.items()},
        "ratios": ratios,
        "targets": {"tangent_k1_over_one_shadow": 1.5, "tangent_k16_over_tangent_k1": 4.0},
    }
    if not args.configs:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.with_name(f"tangent{suffix}_cpu.json").write_text(json.dumps(result, indent=2))
    print(f"{'configuration':<14} {'step ms':>8} {'cost ms':>8}")
    for name in configs:
        print(f"{name:<14} {1e3 * median[name]:8.2f} {1e3 * cost.get(name, 0.0):8.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
