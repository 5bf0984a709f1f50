"""Mirroring on setups that once broke it (found in review): each shadow does to itself what the real run does to
itself, takes what others do to the real run, and the probe never writes into the real run. Every case at ε = 0, one
shadow at a time: the shadow ends bit-identical to the real model, the real run ends bit-identical to one without the
probe, and the sentinel stays quiet."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from conftest import DropoutMLP, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe


class TensorLR(DropoutMLP):
    """A tensor learning rate, which torch's schedulers update in place."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=torch.tensor(self.lr), momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5),
                                                         "interval": "step"}}


class DecayInBatchStart(DropoutMLP):
    """Changes the LR itself, not idempotently: replayed from the real optimizer as well, it would apply twice."""

    def on_train_batch_start(self, batch, batch_idx):
        for group in self.optimizers().param_groups:
            group["lr"] *= 0.9


class ReadsScheduler(DropoutMLP):
    """Reads its scheduler and its LR after the step, where a scheduler has just moved it."""

    seen: list = []

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5),
                                                         "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        lr = self.lr_schedulers().get_last_lr()[0]
        assert lr == self.optimizers().param_groups[0]["lr"]
        with torch.no_grad():
            self.net[0].bias.add_(1e-3 * lr)  # the LR read here shapes the trajectory


class WarmUpCallback(Callback):
    """A warm-up set from a callback in on_before_optimizer_step, wherever it sits in the callback list."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.2 * min(1.0, (trainer.global_step + 1) / 5)


class Curriculum(DropoutMLP):
    """Writes through ``self.trainer`` into a shared object in a mirrored epoch hook."""

    def on_train_epoch_end(self):
        self.trainer.difficulty_seen = getattr(self.trainer, "difficulty_seen", 0) + 1
        self.trainer.datamodule.difficulty += 1


class CurriculumData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.difficulty = 0

    def train_dataloader(self):
        x, y = random_classification().tensors
        return DataLoader(torch.utils.data.TensorDataset(x * (1 + self.difficulty), y), batch_size=16, shuffle=True)


def fit(model_class, callbacks=(), datamodule=False, **trainer_kwargs):
    L.seed_everything(11, verbose=False)
    model = model_class()
    trainer = quiet_trainer(max_epochs=3, callbacks=list(callbacks), reload_dataloaders_every_n_epochs=1,
                            **trainer_kwargs)
    if datamodule:
        data = CurriculumData()
        trainer.fit(model, datamodule=data)
        return model, data
    trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    return model, None


@pytest.mark.parametrize(
    "model_class, callbacks, datamodule",
    [
        (TensorLR, [], False),
        (DecayInBatchStart, [], False),
        (ReadsScheduler, [], False),
        (DropoutMLP, ["warm-up after"], False),
        (DropoutMLP, ["warm-up before"], False),
        (Curriculum, [], True),
    ],
    ids=["tensor-lr", "lr-decay-in-own-hook", "hook-reads-scheduler", "callback-after-probe", "callback-before-probe",
         "writes-through-trainer"],
)
def test_the_shadow_is_the_real_run_and_the_real_run_is_untouched(model_class, callbacks, datamodule):
    def callbacks_with(probe):
        warm_up = [WarmUpCallback()] if callbacks else []
        if probe is None:
            return warm_up
        return [probe, *warm_up] if callbacks == ["warm-up after"] else [*warm_up, probe]

    plain, plain_data = fit(model_class, callbacks_with(None), datamodule)
    draws = torch.rand(3)
    probe = ChaosProbe(epsilon=0.0, num_shadows=2, vectorize=False, sentinel_steps=18)
    probed, probed_data = fit(model_class, callbacks_with(probe), datamodule)
    assert torch.equal(draws, torch.rand(3))
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)
    if datamodule:
        assert probed_data.difficulty == plain_data.difficulty == 3
    for shadow in probe.shadow_modules:
        for a, b in zip(probed.parameters(), shadow.parameters()):
            assert torch.equal(a, b)
    assert probe.trusted and probe.sentinel["max_drift"] == 0.0 and not probe._disabled


class KeepsOutputs(DropoutMLP):
    """Lightning 2's pattern: outputs kept in a list during the epoch, a counter, extra keys for on_train_batch_end."""

    def __init__(self):
        super().__init__()
        self.outputs, self.calls = [], 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.outputs.append(loss.detach())
        self.calls += 1
        return {"loss": loss, "calls": self.calls}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        assert outputs["calls"] == self.calls

    def on_train_epoch_end(self):
        with torch.no_grad():
            self.net[0].bias.add_(1e-3 * torch.stack(self.outputs).mean())
        self.outputs.clear()


def test_the_batched_path_leaves_what_training_step_keeps_to_each_shadow():
    plain, _ = fit(KeepsOutputs)
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, vectorize=True)
    probed, _ = fit(KeepsOutputs, [probe])
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)
    assert not probe._disabled and probe.trusted
    for shadow in probe.shadow_modules:
        assert shadow.calls == probed.calls and shadow.outputs == []
        for a, b in zip(probed.parameters(), shadow.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class ShrinkWeights(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.net[0].weight.mul_(0.99)


class SaveAt(Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_an_untrusted_verdict_survives_a_checkpoint_inside_the_sentinels_window(tmp_path):
    path = tmp_path / "inside.ckpt"
    probe = ChaosProbe(num_shadows=1, vectorize=False, sentinel_steps=50)
    L.seed_everything(2, verbose=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[ShrinkWeights(), probe, SaveAt(3, path)])
    trainer.fit(DropoutMLP(), DataLoader(random_classification(), batch_size=16))
    resumed = ChaosProbe(num_shadows=1, vectorize=False, sentinel_steps=50)
    with pytest.warns(UserWarning, match="UNTRUSTED"):  # saved at step 3 of the 50-step window, before any verdict
        quiet_trainer(max_epochs=2, callbacks=[resumed]).fit(
            DropoutMLP(), DataLoader(random_classification(), batch_size=16), ckpt_path=path)
    assert not resumed.trusted and resumed.sentinel["first_drift_step"] == 1 and 1 <= resumed.sentinel["steps"] < 50


class EndsEpochsEarly(DropoutMLP):
    """``on_train_batch_start`` returns -1 at batch 3 (Lightning then ends the epoch), after counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_train_batch_start(self, batch, batch_idx):
        self.calls += 1
        if batch_idx == 3:
            return -1


def test_a_batch_the_module_skips_runs_the_shadows_batch_start_hook_too():
    probe = ChaosProbe(epsilon=0.0, num_shadows=1, vectorize=False)
    real, _ = fit(EndsEpochsEarly, [probe])
    assert real.calls == 3 * 4  # 3 epochs of 4 calls, the last one returning -1
    assert probe.shadow_modules[0].calls == real.calls
    assert probe.trusted and (probe.distances == 0).all()
