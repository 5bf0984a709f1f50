"""Lightning callbacks that change the training mid-fit: ``BackboneFinetuning`` (unfreezes a backbone and adds a param
group), ``StochasticWeightAveraging`` (swaps the LR scheduler for ``SWALR``; with BatchNorm, adds an epoch that puts
the averaged weights into the model and only updates the BatchNorm statistics), ``EMAWeightAveraging`` (swaps the
average in for validation and copies it into the model at the end), and ``ModelCheckpoint`` with a resume.

SWA and EMA copy their average into the real model in ``on_train_end``: shadows are compared with the weights as
training left them just before (``Case.training_weights_at_end``).
"""

import dataclasses

import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader

from harness import (
    MLP,
    Case,
    assert_probe_healthy,
    assert_same,
    assert_trusted,
    assert_untrusted_is_said,
    assert_zero_epsilon_agreement,
    check_observation_never_perturbs,
    check_zero_epsilon_shadow_is_the_real_model,
    classification,
    fit,
    loaders,
    named_parameters,
    plain_run,
)
from lightning_chaos import ChaosProbe


class WithBackbone(MLP):
    """A ``backbone`` and a ``head``; the optimizer takes the trainable parameters only, as ``BackboneFinetuning``'s
    documentation asks (the callback freezes the backbone before the optimizer is built)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, 3))
        del self.net

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)


def backbone_finetuning():
    # unfreeze at epoch 1 (adds a param group at lr/10), then the backbone LR grows by 1.5 per epoch
    return [BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5, verbose=False)]


def swa():
    return [StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)]


def ema():
    return [pytest.importorskip("lightning.pytorch.callbacks").EMAWeightAveraging(decay=0.9)]


FAMILY = "Callbacks that change training"

CASES = [
    Case("BackboneFinetuning-unfreeze-at-epoch-1", WithBackbone, loaders, trainer={"max_epochs": 3},
         callbacks=backbone_finetuning, status="works",
         setup="`BackboneFinetuning(unfreeze_backbone_at_epoch=1)`: `requires_grad` flips, `add_param_group` mid-fit",
         note="The shadows get the new param group and the unfrozen backbone too."),
    Case("StochasticWeightAveraging", MLP, loaders, trainer={"max_epochs": 3}, callbacks=swa,
         training_weights_at_end=True, status="works with a note",
         setup="`StochasticWeightAveraging` (no BatchNorm): `SWALR` swapped in from epoch 1",
         note="SWA copies its average into the model at train end: the shadows are compared with the trained weights"
              " before that."),
    Case("EMAWeightAveraging+validation", MLP, lambda: loaders(validation=True), callbacks=ema,
         training_weights_at_end=True, status="works with a note",
         setup="`EMAWeightAveraging(decay=0.9)` + validation (the average is swapped in for validation)",
         note="EMA copies its average into the model at train end: the shadows are compared with the trained weights"
              " before that."),
]



def test_backbone_finetuning_gives_the_shadows_the_new_param_group():
    run = check_zero_epsilon_shadow_is_the_real_model(CASES[0])
    assert len(run.trainer.optimizers[0].param_groups) == 2
    shadow = run.probe.shadow_modules[0]
    assert all(p.requires_grad for p in shadow.backbone.parameters())
    assert len(run.probe.shadow_optimizers[0].param_groups) == 2


# -- SWA with BatchNorm: an extra epoch on the averaged weights -------------------------------------------------------

SWA_BATCHNORM = Case(
    "StochasticWeightAveraging+BatchNorm", lambda: MLP(batchnorm=True), loaders, trainer={"max_epochs": 3},
    callbacks=swa, training_weights_at_end=True, status="works with a note",
    setup="`StochasticWeightAveraging` + BatchNorm: an extra epoch that only updates BatchNorm on the averaged weights",
    note="The probe stops at SWA's BatchNorm epoch with a warning; its results up to there stay.",
)
STEPS_BEFORE_THE_BATCHNORM_EPOCH = 3 * 4  # 3 epochs of 4 batches; SWA then adds a 4th that only updates BatchNorm


def test_swa_batchnorm_observation_never_perturbs():
    check_observation_never_perturbs(SWA_BATCHNORM, require_trusted=False)


def test_swa_batchnorm_epoch_is_measured_correctly_or_said():
    """Until SWA's BatchNorm epoch the ε = 0 shadow is the real model; in that epoch SWA writes its average into the
    model outside any optimizer step: the probe stops measuring there (or its d(t) goes on as the truth), and any
    departure from "every step measured, all exactly 0" comes with a warning."""
    run = fit(SWA_BATCHNORM, ChaosProbe(epsilon=0.0, num_shadows=1, vectorize=False, log_every_n_steps=1))
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    distances = run.probe.distances
    assert distances.shape[0] >= STEPS_BEFORE_THE_BATCHNORM_EPOCH + 1, "the probe stopped before SWA's BatchNorm epoch"
    assert (distances[: STEPS_BEFORE_THE_BATCHNORM_EPOCH + 1] == 0).all(), "the shadow left the real model before it"
    complete = distances.shape[0] == run.trainer.global_step + 1
    if not complete or (distances != 0).any():
        assert run.warned(r"(?i)StochasticWeightAveraging|SWA|BatchNorm|averag|UNTRUSTED|outside the optimizer step"), (
            "the probe's d(t) departs from the real training in SWA's BatchNorm epoch without a warning"
        )


# -- ModelCheckpoint and resume ----------------------------------------------------------------------------------------


def resumable_model():
    # no dropout and no shuffling: Lightning does not restore the global RNG streams on resume
    return MLP(dropout=0.0, optimizer=lambda params: torch.optim.Adam(params, lr=5e-3))


def unshuffled():
    return {"train_dataloaders": DataLoader(classification(), batch_size=16, shuffle=False)}


RESUME = Case(
    "ModelCheckpoint+resume", resumable_model, unshuffled, trainer={"max_epochs": 4}, status="works with a note",
    setup="`ModelCheckpoint(save_last=True)` + resume from `last.ckpt`",
    note="A resumed probe ends as an uninterrupted one where Lightning resumes exactly: an end-of-epoch checkpoint,"
         " and no dropout or shuffling (Lightning does not restore the global RNG streams).",
)


def probes(epsilon):
    return ChaosProbe(epsilon=epsilon, num_shadows=2, log_every_n_steps=1, vectorize=False)


@pytest.mark.parametrize("epsilon", [1e-3, 0.0])
def test_resume_from_model_checkpoint_gives_the_uninterrupted_results(tmp_path, epsilon):
    uninterrupted = fit(RESUME, probes(epsilon))
    assert_trusted(uninterrupted)

    def checkpointing():
        return dict(enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])

    first_half = fit(RESUME, probes(epsilon), max_epochs=2, **checkpointing())
    assert_trusted(first_half)
    assert (tmp_path / "last.ckpt").exists()
    # another seed, so another initialisation: the checkpoint must win
    resumed = fit(dataclasses.replace(RESUME, seed=99), probes(epsilon), ckpt_path=tmp_path / "last.ckpt",
                  **checkpointing())
    assert_trusted(resumed)

    assert_same(resumed.params, plain_run(RESUME).params, "resumed real parameters vs an uninterrupted plain run")
    assert resumed.probe.distances.shape == uninterrupted.probe.distances.shape == (4 * 4 + 1, 2)
    assert torch.equal(resumed.probe.distances, uninterrupted.probe.distances)
    assert_same({"Λ": resumed.probe.local_exponents}, {"Λ": uninterrupted.probe.local_exponents}, "exponents")
    for k, (again, straight) in enumerate(zip(resumed.probe.shadow_modules, uninterrupted.probe.shadow_modules)):
        assert_same(named_parameters(again), named_parameters(straight), f"resumed shadow {k} vs uninterrupted")
    if epsilon == 0:
        assert_zero_epsilon_agreement(resumed, None)
