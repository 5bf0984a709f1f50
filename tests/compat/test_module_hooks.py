"""LightningModule hooks with side effects: the Trainer calls them on the real module only, yet each shapes training.

A shadow that skips them is no longer an independent run of the same program: ε = 0 shadows drift off the real model,
and an ε > 0 shadow ends away from the separate fit started from its initial state.
"""

import torch

from harness import (
    MLP,
    Case,
    TinyLightningLSTM,
    loaders,
)

# -- hooks on a small MLP ----------------------------------------------------------------------------------------------


class GradientMask(MLP):
    """Freezes the weights from the first two inputs by zeroing their gradients in ``on_after_backward``."""

    def on_after_backward(self) -> None:
        self.net[0].weight.grad[:, :2] = 0


class MaxNormConstraint(MLP):
    """A max-norm constraint on the first layer's rows, applied after each optimizer step in ``on_train_batch_end``
    (the rows start at norm ≈ 0.57, so it binds)."""

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            weight = self.net[0].weight
            weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=0.5))


class ManualWarmUp(MLP):
    """The LR warm-up of ``LightningModule.optimizer_step``'s docstring: step, then set the next step's LR by hand."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure) -> None:
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 5:
            lr_scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
            for group in optimizer.param_groups:
                group["lr"] = lr_scale * 0.1


class EveryOtherSchedulerStep(MLP):
    """A step-interval scheduler that an ``lr_scheduler_step`` override steps on every other call only."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if self.trainer.global_step % 2 == 0:
            scheduler.step()


class ClipFromEpochOne(MLP):
    """``configure_gradient_clipping`` as in its docstring: clip with the Trainer's value, from epoch 1 on only."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.current_epoch >= 1:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)


class OwnClipping(MLP):
    """``configure_gradient_clipping`` clipping with its own value while the Trainer has none: Lightning calls the hook
    at every step regardless of ``Trainer(gradient_clip_val=...)``."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="norm")


FAMILY = "LightningModule hooks"

CASES = [
    Case("LightningLSTM-demo", TinyLightningLSTM, dict, trainer={"gradient_clip_val": 0.25}, status="works",
         setup="Lightning's LSTM demo (`lightning.pytorch.demos.lstm.LightningLSTM`): `self.hidden` carried between"
               " batches, reset in `on_train_epoch_end`, `SequenceSampler`, gradient clipping 0.25"),
    Case("on_after_backward-gradient-mask", GradientMask, loaders, status="works",
         setup="gradient mask in `on_after_backward`"),
    Case("on_train_batch_end-max-norm", MaxNormConstraint, loaders, status="works",
         setup="max-norm weight constraint in `on_train_batch_end`"),
    Case("optimizer_step-manual-warm-up", ManualWarmUp, loaders, status="works",
         setup="`optimizer_step` override: manual LR warm-up (its docstring's recipe)"),
    Case("lr_scheduler_step-override", EveryOtherSchedulerStep, loaders, status="works",
         setup="`lr_scheduler_step` override that steps the scheduler every other call"),
    Case("configure_gradient_clipping-docstring", ClipFromEpochOne, loaders, trainer={"gradient_clip_val": 0.05},
         status="works", setup="`configure_gradient_clipping` override, its docstring's recipe (the Trainer's value,"
                               " from epoch 1 on)"),
    Case("configure_gradient_clipping-own-value", OwnClipping, loaders, status="works",
         setup="`configure_gradient_clipping` override with its own value, no Trainer `gradient_clip_val`"),
]

