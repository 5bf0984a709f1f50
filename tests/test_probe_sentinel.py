"""The sentinel: an unperturbed twin, stepped like the shadows, must follow the real model; when something outside the
mirrored path changes the real training, the probe says so and marks its numbers untrusted."""

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from conftest import DropoutMLP, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe


class ShrinkWeights(Callback):
    """Writes the real weights after every step: what no shadow repeats."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.net[0].weight.mul_(0.99)


def fit(probe, callbacks=(), **trainer_kwargs):
    L.seed_everything(7, verbose=False)
    model = DropoutMLP()
    trainer = quiet_trainer(**{"max_epochs": 2, **trainer_kwargs}, callbacks=[*callbacks, probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    return [str(w.message) for w in caught if "ChaosProbe" in str(w.message)]


@pytest.mark.parametrize("vectorize", [False, True])
def test_the_twin_follows_the_real_model_and_the_results_are_trusted(vectorize):
    probe = ChaosProbe(num_shadows=4, sentinel_steps=5, vectorize=vectorize)
    messages = fit(probe)
    report = probe.sentinel
    # 5 steps from attach, then a second window from 3 steps before the end of the first epoch it can still reach
    # (epochs of 6 steps: the window opens in the second, at its batch 3, and the fit ends 3 steps later)
    assert report["steps"] == 5 + 3 and report["trusted"] and probe.trusted
    assert report["exact"] is (not vectorize)
    if vectorize:
        assert 0 <= report["max_drift"] <= report["tolerance"]
    else:
        assert report["max_drift"] == 0.0  # one at a time: bit identity
    assert not any("UNTRUSTED" in m for m in messages)
    assert probe._ensemble.has_twin is False and len(probe._ensemble.members) == 4  # freed after the window


def test_a_callback_that_writes_the_weights_makes_the_results_untrusted_with_a_warning_naming_it():
    probe = ChaosProbe(num_shadows=1, sentinel_steps=4, vectorize=False)
    messages = fit(probe, callbacks=[ShrinkWeights()])
    assert not probe.trusted
    assert probe.sentinel["first_drift_step"] == 1
    warning = next(m for m in messages if "UNTRUSTED" in m)
    assert "optimizer step 1" in warning and "ShrinkWeights" in warning


def test_sentinel_off_reports_nothing_and_costs_no_twin():
    probe = ChaosProbe(num_shadows=2, sentinel_steps=0, vectorize=False)
    fit(probe)
    assert probe.sentinel is None and probe.trusted
    assert len(probe._ensemble.members) == 2


def test_the_sentinel_verdict_is_logged():
    from lightning.pytorch.loggers import CSVLogger

    probe = ChaosProbe(num_shadows=1, sentinel_steps=3, vectorize=False)
    fit(probe, callbacks=[ShrinkWeights()], logger=CSVLogger("/tmp/_sentinel_logs", name="s"))
    import csv
    import glob

    rows = list(csv.DictReader(open(sorted(glob.glob("/tmp/_sentinel_logs/s/version_*/metrics.csv"))[-1])))
    trusted = [float(r["chaos/trusted"]) for r in rows if r.get("chaos/trusted")]
    assert trusted == [0.0]


@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_bad_sentinel_steps_are_refused_naming_the_argument(value):
    with pytest.raises(ValueError, match="sentinel_steps"):
        ChaosProbe(sentinel_steps=value)


def test_short_runs_warn_that_no_exponent_can_be_fitted():
    messages = fit(ChaosProbe(num_shadows=1), fast_dev_run=True)
    assert sum("fitting an exponent needs d(t) at 4 points" in m for m in messages) == 1
    probe = ChaosProbe(num_shadows=1)
    enough = fit(probe, max_steps=3)  # d(t) at t = 0, 1, 2, 3: the fit's 4 points
    assert not any("needs d(t)" in m for m in enough) and math.isfinite(probe.lyapunov_exponent)


def test_bf16_forward_warns_that_the_default_epsilon_is_below_its_rounding():
    messages = fit(ChaosProbe(num_shadows=1, vectorize=False), precision="bf16-mixed", max_steps=4)
    warning = next(m for m in messages if "bf16-mixed" in m)
    assert "epsilon=1e-4" not in warning and "ChaosProbe(epsilon=0.04)" in warning
    quiet = fit(ChaosProbe(num_shadows=1, epsilon=0.05, vectorize=False), precision="bf16-mixed", max_steps=4)
    assert not any("rounded away" in m for m in quiet)


class ShrinkWeightsFromEpochOne(Callback):
    """Writes the real weights at the start of every epoch but the first: only a window across an epoch boundary
    can see it."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            with torch.no_grad():
                pl_module.net[0].weight.mul_(0.99)


def test_the_second_window_sees_what_happens_at_the_epoch_boundary():
    probe = ChaosProbe(num_shadows=1, sentinel_steps=4, vectorize=False)
    messages = fit(probe, callbacks=[ShrinkWeightsFromEpochOne()], max_epochs=3)
    # first window: steps 1-4 of epoch 0, clean; the second opens 2 steps before the end of epoch 0 (6 steps an
    # epoch) and sees the write at the start of epoch 1
    assert not probe.trusted
    assert probe.sentinel["first_drift_step"] == 7  # the first step of epoch 1
    assert any("UNTRUSTED" in m and "optimizer step 7" in m and "ShrinkWeightsFromEpochOne" in m for m in messages)
    quiet = ChaosProbe(num_shadows=1, sentinel_steps=4, vectorize=False)
    fit(quiet, max_epochs=3)
    assert quiet.trusted and quiet.sentinel["steps"] == 8  # without the writer: both windows clean
