"""Run by test_ddp.py in a subprocess: a probed fit on 1 process (whole batches) or 2 DDP processes (halves).

    python tests/ddp_probe_run.py OUT_DIR NUM_PROCESSES
"""

import sys
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from conftest import DropoutMLP, random_classification  # noqa: E402

from lightning_chaos import ChaosProbe, TangentProbe, find_chaos_lr  # noqa: E402


class HalvesDataModule(L.LightningDataModule):
    """Every other sample per rank, in order: Lightning's injected DistributedSampler would shuffle."""

    def __init__(self, num_processes: int, rank: Optional[int] = None) -> None:
        super().__init__()
        self.num_processes, self.rank = num_processes, rank

    def train_dataloader(self) -> DataLoader:
        data = random_classification()
        sampler = None
        if self.rank is not None:  # one process given one rank's half, as that rank would see it
            sampler = DistributedSampler(data, num_replicas=self.num_processes, rank=self.rank, shuffle=False)
        elif self.num_processes > 1:
            sampler = DistributedSampler(data, shuffle=False)
        return DataLoader(data, batch_size=32 // self.num_processes, sampler=sampler, shuffle=False)


def main(out: Path, num_processes: int) -> None:
    L.seed_everything(17, verbose=False)
    model = DropoutMLP(dropout=0.0, scheduler="step")
    probe = ChaosProbe(num_shadows=2, renormalize_every=3, log_every_n_steps=1)
    # 96 samples, 32 per step: one process sees whole batches; with 2, the DistributedSampler (shuffle=False) gives
    # each rank every other sample, 16 per step, and the averaged gradients equal the whole batch's.
    trainer = L.Trainer(
        accelerator="cpu",
        devices=num_processes,
        strategy="ddp" if num_processes > 1 else "auto",
        max_epochs=3,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        precision="64-true",  # so that the summation order of the all-reduce stays far below d(t)
    )
    trainer.fit(model, datamodule=HalvesDataModule(num_processes))
    shadows = [torch.cat([p.detach().flatten() for p in s.parameters()]) for s in probe._ensemble.shadows]
    torch.save(
        {"distances": probe.distances, "shadows": shadows, "real": torch.cat([p.detach().flatten() for p in model.parameters()])},
        out / f"procs{num_processes}_rank{trainer.global_rank}.pt",
    )


def finder(out: Path, num_processes: int) -> None:
    """The chaos LR sweep split across DDP processes, stacked and one candidate at a time; with one process, the same
    sweeps on the batches rank 0 of two would see (the split sweep trains every candidate on rank 0's batches)."""
    import lightning_chaos.sweep as sweep_module

    trained: list[float] = []
    train = sweep_module.LRSweep._train

    def recording(self, lrs):  # type: ignore[no-untyped-def]
        trained.extend(lrs)
        return train(self, lrs)

    sweep_module.LRSweep._train = recording  # type: ignore[method-assign]
    saved = {}
    for vectorize in (True, False):
        trained.clear()
        L.seed_everything(17, verbose=False)
        model = DropoutMLP(dropout=0.1)
        trainer = L.Trainer(accelerator="cpu", devices=num_processes, strategy="ddp" if num_processes > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, precision="64-true")
        datamodule = HalvesDataModule(2, rank=None if num_processes > 1 else 0)
        result = find_chaos_lr(trainer, model, datamodule=datamodule, min_lr=0.01, max_lr=100.0, num_lrs=7,
                               steps_per_lr=12, refine=3, vectorize=vectorize)
        saved[vectorize] = {"result": result, "lr": model.lr, "trained": list(trained)}
    torch.save(saved, out / f"finder{num_processes}_rank{trainer.global_rank}.pt")


def tangent(out: Path, num_processes: int) -> None:
    """TangentProbe under DDP (halves of each batch per rank) against one process on whole batches."""
    L.seed_everything(17, verbose=False)
    model = DropoutMLP(dropout=0.0, scheduler="step")
    probe = TangentProbe(num_exponents=3, sharpness=True, sharpness_every=4)
    trainer = L.Trainer(accelerator="cpu", devices=num_processes, strategy="ddp" if num_processes > 1 else "auto",
                        max_epochs=3, callbacks=[probe], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        precision="64-true")
    trainer.fit(model, datamodule=HalvesDataModule(num_processes))
    torch.save({"spectrum": probe.spectrum_history, "sharpness": probe.sharpness_history, "trusted": probe.trusted},
               out / f"tangent{num_processes}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    modes = {"finder": finder, "tangent": tangent}
    modes.get(sys.argv[3] if sys.argv[3:] else "", main)(Path(sys.argv[1]), int(sys.argv[2]))
