"""Probing a window of steps: shadows cloned at ``start_step``, released after ``stop_step``, training untouched."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import DropoutMLP, Quadratic, dummy_loader, parameters_of, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe
from lightning_chaos import logging as chaos_logging
from test_probe_ground_truth import EIGENVALUES, exact_exponent
from test_probe_logging import MemoryLogger


def test_a_window_of_steps_recovers_the_exact_exponent_and_frees_the_shadows():
    """On the quadratic the exponent does not depend on where the window starts: ln max|1 − ηa| again."""
    lr, steps = 0.9, 160
    # relative: by step 40 the expanding θ is ~e^21, far beyond what an absolute 1e-8 survives in float64
    probe = ChaosProbe(epsilon=1e-8, num_shadows=2, start_step=40, stop_step=140, log_every_n_steps=10)
    logger = MemoryLogger()
    quiet_trainer(max_steps=steps, callbacks=[probe], precision="64-true", logger=logger).fit(
        Quadratic(EIGENVALUES, lr), dummy_loader(steps)
    )
    assert probe.distances.shape == (140 - 40 + 1, 2)
    assert probe.local_exponents.tolist() == pytest.approx([exact_exponent(lr)] * 2, rel=0.01)
    assert probe._ensemble.shadows == [] and probe._ensemble.optimizers == []
    assert torch.isfinite(probe.running_exponents).all()
    logged_steps = [step for step, metrics in logger.rows if chaos_logging.DISTANCE_MEAN in metrics]
    assert logged_steps == list(range(40, 141, 10))  # plotted at the real model's steps


def test_a_window_does_not_perturb_training_and_its_shadows_start_from_the_model_of_that_step():
    def run(callbacks):
        L.seed_everything(7, verbose=False)
        model = DropoutMLP(scheduler="step")
        trainer = quiet_trainer(max_epochs=3, callbacks=callbacks, accumulate_grad_batches=2)
        trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
        return model

    reference = run([])
    probe = ChaosProbe(epsilon=0.0, num_shadows=1, start_step=3, stop_step=7, log_every_n_steps=1)
    model = run([probe])
    for a, b in zip(parameters_of(reference), parameters_of(model)):
        assert torch.equal(a, b)
    # With epsilon = 0, clones taken at step 3 follow the real model exactly, LR schedule and accumulation included.
    assert probe.distances.shape == (7 - 3 + 1, 1)
    assert (probe.distances == 0).all()


def test_a_stopped_probe_survives_a_checkpoint(tmp_path):
    def model():
        L.seed_everything(3, verbose=False)
        return DropoutMLP(dropout=0.0)

    loader = DataLoader(random_classification(), batch_size=16)
    probe = ChaosProbe(num_shadows=2, start_step=2, stop_step=8)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(model(), loader)
    assert "shadows" not in probe.state_dict()
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")

    resumed = ChaosProbe(num_shadows=2, start_step=2, stop_step=8)
    quiet_trainer(max_epochs=3, callbacks=[resumed]).fit(model(), loader, ckpt_path=tmp_path / "stopped.ckpt")
    assert resumed._ensemble is None  # not cloned again
    assert torch.equal(resumed.distances, probe.distances)
    assert torch.equal(resumed.running_exponents, probe.running_exponents)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": -1}, "`start_step` must be an integer >= 0"),
        ({"start_step": 1.5}, "`start_step` must be an integer >= 0"),
        ({"start_step": 5, "stop_step": 5}, r"`stop_step` must be None or an integer > start_step=5"),
        ({"stop_step": 0}, r"`stop_step` must be None or an integer > start_step=0"),
    ],
)
def test_window_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChaosProbe(**kwargs)


def test_resuming_a_checkpoint_without_probe_state_clones_the_restored_model_and_optimizer(tmp_path):
    """Lightning restores optimizer state and global step after on_fit_start: the shadows are cloned at the first
    batch, so they start from the restored Adam moments (epsilon = 0 stays exactly on the real trajectory)."""
    loader = DataLoader(random_classification(), batch_size=16)
    L.seed_everything(3, verbose=False)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(DropoutMLP(dropout=0.0, optimizer="adam"), loader)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")

    probe = ChaosProbe(epsilon=0.0, num_shadows=1, log_every_n_steps=1)
    L.seed_everything(3, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[probe]).fit(
        DropoutMLP(dropout=0.0, optimizer="adam"), loader, ckpt_path=tmp_path / "plain.ckpt"
    )
    assert probe._attach_step == 6
    assert probe.distances.shape == (7, 1) and (probe.distances == 0).all()


def test_a_target_reached_before_start_step_is_kept():
    class Target(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.callback_metrics["score"] = torch.tensor(float(trainer.current_epoch))

    probe = ChaosProbe(start_step=8, monitor="score", target=0.0)
    L.seed_everything(3, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[Target(), probe]).fit(
        DropoutMLP(dropout=0.0), DataLoader(random_classification(), batch_size=16)
    )
    assert probe.time_to_target["step"] == 6 and probe.time_to_target["epoch"] == 0
    assert probe._attach_step == 8
