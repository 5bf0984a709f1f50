"""Third-party and unusual optimizers: schedule-free (a train/eval mode that moves the parameters), LBFGS (a closure
re-evaluated several times per step), Prodigy and D-Adaptation (their adaptive step size ``d`` lives in the param
groups and is updated inside ``step()``), and pytorch_optimizer's Lion, Ranger (Lookahead every 6 steps, counted in
the param group) and AdaBelief.

For Prodigy and D-Adaptation ε = 0 cannot tell "the shadow inherits the real ``d``" from "the shadow has its own":
property 2b (ε > 0 against a separate fit) compares every param-group key, ``d`` included.
"""

import importlib

import pytest
import torch

from harness import (
    MLP,
    Case,
    check_shadow_is_an_independent_run,
    check_zero_epsilon_shadow_is_the_real_model,
    group_keys,
    loaders,
)


class ScheduleFree(MLP):
    """The usual schedule-free recipe: the optimizer in train mode for training, in eval mode (the averaged x
    sequence in the parameters) for validation. ``AdamWScheduleFree`` starts in eval mode: ``step`` refuses to run
    before ``train()``."""

    def on_train_epoch_start(self):
        self.optimizers().train()

    def on_validation_epoch_start(self):
        self.optimizers().eval()

    def on_validation_epoch_end(self):
        self.optimizers().train()


def optimizer(module_name, name, **kwargs):
    """``module_name.name(params, **kwargs)``, the module imported only when the optimizer is built: a missing library
    skips its cases only (``Case.requires``), not the file."""

    def make(params):
        return getattr(importlib.import_module(module_name), name)(params, **kwargs)

    return make


def schedule_free(name, **kwargs):
    return lambda: ScheduleFree(optimizer=optimizer("schedulefree", name, **kwargs))


def with_optimizer(module_name, name, **kwargs):
    return lambda: MLP(optimizer=optimizer(module_name, name, **kwargs))


def lbfgs(dropout):
    return lambda: MLP(dropout=dropout,
                       optimizer=lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=4, history_size=5))


with_validation = lambda: loaders(validation=True)  # noqa: E731

FAMILY = "Optimizers"
OWN_D = "Each shadow computes its own `d` (step size), not the real model's."

CASES = [
    Case("schedulefree-AdamWScheduleFree+validation", schedule_free("AdamWScheduleFree", lr=1e-2, warmup_steps=2),
         with_validation, requires=("schedulefree",), status="works",
         setup="`schedulefree.AdamWScheduleFree` + validation: `.train()` in `on_train_epoch_start` and"
               " `on_validation_epoch_end`, `.eval()` in `on_validation_epoch_start`",
         note="The shadows' optimizers follow the train/eval mode switches."),
    Case("schedulefree-SGDScheduleFree+validation", schedule_free("SGDScheduleFree", lr=0.1), with_validation,
         requires=("schedulefree",), status="works",
         setup="`schedulefree.SGDScheduleFree` + validation, the same recipe"),
    Case("LBFGS-closure", lbfgs(dropout=0.0), loaders, status="works",
         setup="`torch.optim.LBFGS(max_iter=4)` (a closure optimizer)"),
    Case("LBFGS-closure+dropout", lbfgs(dropout=0.1), loaders, status="works",
         setup="`torch.optim.LBFGS(max_iter=4)` with dropout"),
    Case("prodigyopt-Prodigy", with_optimizer("prodigyopt", "Prodigy", lr=1.0), loaders, requires=("prodigyopt",),
         status="works", setup="`prodigyopt.Prodigy(lr=1.0)`", note=OWN_D),
    Case("dadaptation-DAdaptAdam", with_optimizer("dadaptation", "DAdaptAdam", lr=1.0), loaders,
         requires=("dadaptation",), status="works", setup="`dadaptation.DAdaptAdam(lr=1.0)`", note=OWN_D),
    Case("pytorch_optimizer-Lion", with_optimizer("pytorch_optimizer", "Lion", lr=1e-3), loaders,
         requires=("pytorch_optimizer",), status="works", setup="`pytorch_optimizer.Lion`"),
    Case("pytorch_optimizer-Ranger", with_optimizer("pytorch_optimizer", "Ranger", lr=1e-2), loaders,
         requires=("pytorch_optimizer",), status="works",
         setup="`pytorch_optimizer.Ranger` (Lookahead every 6 steps, `step_counter` in the param group)"),
    Case("pytorch_optimizer-AdaBelief", with_optimizer("pytorch_optimizer", "AdaBelief", lr=1e-2), loaders,
         requires=("pytorch_optimizer",), status="works", setup="`pytorch_optimizer.AdaBelief`"),
]
ADAPTIVE = {case.name: case for case in CASES if case.name.startswith(("prodigyopt", "dadaptation"))}



@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_an_adaptive_shadow_computes_its_own_step_size(name):
    """The shadow's ``d`` is its own (the separate fit's, bit for bit, checked by property 2b), and it differs from
    the real model's ``d``: a shadow that copied the real ``d`` at every step would fail here."""
    probed, separate = check_shadow_is_an_independent_run(ADAPTIVE[name])
    real_d = group_keys(probed.optimizer_state, "d")
    shadow_d = group_keys(separate.optimizer_state, "d")
    assert real_d and real_d.keys() == shadow_d.keys()
    assert real_d != shadow_d, f"after {probed.trainer.global_step} steps the shadow's d is still the real d: {real_d}"


def test_schedule_free_shadows_are_in_train_mode_when_they_step_and_follow_the_mode_switches():
    """Validation switches the real optimizer to eval (x in the parameters) and back to train (y): the ε = 0 shadow's
    optimizer makes the same round trip, which is not bit-exact, and ends in the same mode."""
    run = check_zero_epsilon_shadow_is_the_real_model(CASES[0])
    shadow_groups = run.probe.shadow_optimizers[0].param_groups
    assert [g["train_mode"] for g in shadow_groups] == [g["train_mode"] for g in run.trainer.optimizers[0].param_groups]
