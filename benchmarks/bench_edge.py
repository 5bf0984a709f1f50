"""What EdgeOfChaosMonitor costs: nothing between records, and the price of one record.

Model: seed paper 2's network (Zhang et al. 2021), 784 → Linear(784, 784, no bias) + tanh → Linear(784, 10), SGD with
momentum 0.5, batch 32, on the first ``--samples`` Fashion-MNIST training images (Debian's ``dataset-fashion-mnist``;
without it, random images of the same shape, said in the output). One epoch = samples / 32 optimizer steps.

Arms, each its own ``Trainer.fit`` of ``--epochs`` epochs (logger off, no checkpointing, no progress bar):

* ``none``: plain training;
* ``monitor``: ``EdgeOfChaosMonitor(every_n_epochs=10**6)``: the fit-start record, then no record (the steady state
  between records).

Timed: whole training epochs, by callbacks stamping ``time.perf_counter()`` at ``on_train_epoch_start`` (listed first)
and ``on_train_epoch_end`` (listed last); the first epoch (which holds the fit-start record) is dropped. Rounds
alternate the arms' order; the per-step overhead is formed within a round and summarised by the median over rounds.

Between records, also the monitor's hooks called directly, 100 000 times: their own cost per batch, free of the noise
of whole epochs.

Per record: the wall time of ``EdgeOfChaosMonitor._record`` on the 784-wide layer, at the papers' defaults
(``num_inputs=100, steps=500``) and at a lighter setting (``num_inputs=32, steps=200, transient=40``), each the median
of ``--record-repeats`` calls on the trained fit's weights and captured inputs.

Usage:
    python benchmarks/bench_edge.py                      # 5 rounds, 4 epochs of 6 400 samples
    python benchmarks/bench_edge.py --rounds 2 --epochs 3 --samples 3200 --json /tmp/edge.json

Writes ``benchmarks/results/edge_monitor_cpu.json`` by default.
"""

import argparse
import gzip
import logging
import os
import platform
import statistics
import sys
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_probe import write_json  # noqa: E402

from lightning_chaos import EdgeOfChaosMonitor  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def images(samples: int) -> tuple[torch.Tensor, str]:
    if os.path.exists(FASHION):
        with gzip.open(FASHION) as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)[:samples]
        return torch.tensor(raw / 255.0, dtype=torch.float32), "Fashion-MNIST"
    return torch.rand(samples, 784, generator=torch.Generator().manual_seed(0)), "random images (no Fashion-MNIST)"


class Paper2(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(784, 784, bias=False)
        nn.init.normal_(self.hidden.weight, std=1 / (2 * 784**0.5))
        self.act = nn.Tanh()
        self.out = nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.out(self.act(self.hidden(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.5)


class EpochClock(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.steps: list[int] = []

    def start(self, trainer) -> None:
        self._t, self._s = time.perf_counter(), trainer.global_step

    def stop(self, trainer) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.steps.append(trainer.global_step - self._s)


class Start(L.Callback):
    def __init__(self, clock: EpochClock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.clock.start(trainer)


class Stop(L.Callback):
    def __init__(self, clock: EpochClock) -> None:
        self.clock = clock

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.clock.stop(trainer)


def run(arm: str, data: TensorDataset, epochs: int) -> tuple[float, EdgeOfChaosMonitor, L.LightningModule]:
    clock = EpochClock()
    monitor = EdgeOfChaosMonitor(every_n_epochs=10**6) if arm == "monitor" else None
    callbacks = [Start(clock), *([monitor] if monitor else []), Stop(clock)]
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=callbacks)
    model = Paper2()
    trainer.fit(model, DataLoader(data, batch_size=32))
    per_step = sum(clock.times[1:]) / sum(clock.steps[1:])
    return per_step, monitor, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6400)
    parser.add_argument("--record-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "edge_monitor_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    x, source = images(args.samples)
    labels = torch.randint(10, (len(x),), generator=torch.Generator().manual_seed(1))
    if source == "Fashion-MNIST":
        with gzip.open(FASHION.replace("images-idx3", "labels-idx1")) as f:
            labels = torch.tensor(np.frombuffer(f.read(), dtype=np.uint8, offset=8)[: len(x)].astype(np.int64))
    data = TensorDataset(x, labels)

    rounds = []
    monitor = model = None
    for index in range(args.rounds):
        order = ["none", "monitor"] if index % 2 == 0 else ["monitor", "none"]
        times = {}
        for arm in order:
            times[arm], found, trained = run(arm, data, args.epochs)
            if found is not None:
                monitor, model = found, trained
        rounds.append(times)
        print(f"round {index}: none {times['none'] * 1e3:.3f} ms/step, monitor {times['monitor'] * 1e3:.3f} ms/step")
    overheads = [r["monitor"] - r["none"] for r in rounds]
    ratios = [r["monitor"] / r["none"] for r in rounds]

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    records = {}
    for label, settings in (("papers' defaults (100 inputs, 500 iterations)", dict(num_inputs=100, steps=500)),
                            ("light (32 inputs, 200 iterations)", dict(num_inputs=32, steps=200, transient=40))):
        monitor.num_inputs, monitor.steps, monitor.transient = settings["num_inputs"], settings["steps"], \
            settings.get("transient", 100)
        layer = monitor._layers["hidden"]
        layer.inputs = x[: settings["num_inputs"]]
        seconds = []
        for _ in range(args.record_repeats):
            start = time.perf_counter()
            monitor._record(trainer, model, 0)
            seconds.append(time.perf_counter() - start)
        records[label] = statistics.median(seconds)
        print(f"one record, {label}: {records[label]:.2f} s (median of {args.record_repeats})")

    # The monitor's own work on a batch between records: its hooks, called directly (no training around them).
    hooks = (lambda: monitor.on_train_batch_start(trainer, model, None, 0),
             lambda: monitor.on_before_backward(trainer, model, None),
             lambda: monitor.on_train_batch_end(trainer, model, None, None, 0))
    calls = 100_000
    start = time.perf_counter()
    for _ in range(calls):
        for hook in hooks:
            hook()
    hook_us = (time.perf_counter() - start) / calls * 1e6
    print(f"the monitor's hooks on a batch between records: {hook_us:.2f} µs")

    steps_per_epoch = args.samples // 32
    output = {
        "benchmark": "bench_edge.py",
        "date": time.strftime("%Y-%m-%d"),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "data": source,
        "args": vars(args),
        "rounds": rounds,
        "per_step_none_ms_median": statistics.median(r["none"] for r in rounds) * 1e3,
        "per_step_overhead_us_median": statistics.median(overheads) * 1e6,
        "per_step_overhead_us_range": [min(overheads) * 1e6, max(overheads) * 1e6],
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "record_seconds": records,
        "hooks_per_batch_us": hook_us,
        "record_in_steps_of_training": {k: v / statistics.median(r["none"] for r in rounds) for k, v in records.items()},
        "steps_per_epoch": steps_per_epoch,
    }
    print(f"between records: {output['ratio_median']:.3f}x plain (range {output['ratio_range'][0]:.3f}–"
          f"{output['ratio_range'][1]:.3f}), overhead {output['per_step_overhead_us_median']:.0f} µs/step")
    write_json(output, args.json)


if __name__ == "__main__":
    main()
