"""Observation must not perturb, and with ε = 0 every shadow is the real model, bit for bit, at every step."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import DropoutMLP, parameters_of, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe

SETUPS = {
    "dropout+momentum": dict(model={}, trainer={}),
    "step-scheduler+clip-norm": dict(model={"scheduler": "step"}, trainer={"gradient_clip_val": 0.05}),
    "epoch-scheduler+clip-value": dict(
        model={"scheduler": "epoch"}, trainer={"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}
    ),
    "accumulate-3": dict(model={"scheduler": "step"}, trainer={"accumulate_grad_batches": 3}),
    "adam+accumulate-2+clip": dict(
        model={"optimizer": "adam"}, trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.1}
    ),
}


def fit(setup, callbacks=(), max_epochs=3, **trainer_kwargs):
    L.seed_everything(123, verbose=False)
    model = DropoutMLP(**setup["model"])
    # 96 samples / batch 16 = 6 batches per epoch; with accumulate 3 or 2 the last window is complete.
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=list(callbacks), **setup["trainer"], **trainer_kwargs)
    trainer.fit(model, loader)
    return model, trainer


@pytest.mark.parametrize("name", list(SETUPS))
def test_probe_does_not_perturb_the_real_training(name):
    reference, _ = fit(SETUPS[name])
    probed, _ = fit(SETUPS[name], callbacks=[ChaosProbe(num_shadows=2, renormalize_every=2, log_every_n_steps=1)])
    for a, b in zip(parameters_of(reference), parameters_of(probed)):
        assert torch.equal(a, b)
    # The RNG stream after training is the same too: shadows replayed dropout without consuming it.
    fit(SETUPS[name])
    after_plain = torch.rand(5)
    fit(SETUPS[name], callbacks=[ChaosProbe(num_shadows=2)])
    assert torch.equal(after_plain, torch.rand(5))


@pytest.mark.parametrize("name", list(SETUPS))
def test_zero_epsilon_shadows_stay_bit_identical_every_step(name):
    # Bit identity is the sequential path's promise; the batched path's is tested in test_probe_vectorized.py.
    probe = ChaosProbe(epsilon=0.0, num_shadows=2, log_every_n_steps=1, vectorize=False)
    model, trainer = fit(SETUPS[name], callbacks=[probe])
    expected_steps = trainer.global_step
    assert expected_steps > 0
    assert probe.distances.shape == (expected_steps + 1, 2)
    assert (probe.distances == 0).all(), "a shadow left the real trajectory"
    for shadow, optimizer in zip(probe._ensemble.shadows, probe._ensemble.optimizers):
        for a, b in zip(model.parameters(), shadow.parameters()):
            assert torch.equal(a, b)
        real_state = trainer.optimizers[0].state
        for real_p, shadow_p in zip(model.parameters(), shadow.parameters()):
            for key, value in real_state[real_p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer.state[shadow_p][key]))


def test_shadows_do_not_log_into_the_users_metrics():
    probe = ChaosProbe(num_shadows=3)
    _, trainer = fit(SETUPS["dropout+momentum"], callbacks=[probe], max_epochs=1)
    reference_model, reference_trainer = fit(SETUPS["dropout+momentum"], max_epochs=1)
    assert torch.equal(trainer.callback_metrics["train_loss"], reference_trainer.callback_metrics["train_loss"])


def test_shadows_are_independent_copies_with_their_own_state():
    probe = ChaosProbe(num_shadows=2)
    model, trainer = fit(SETUPS["adam+accumulate-2+clip"], callbacks=[probe], max_epochs=1)
    real_state = trainer.optimizers[0].state
    for optimizer in probe._ensemble.optimizers:
        for real_p, shadow_p in zip(model.parameters(), optimizer.param_groups[0]["params"]):
            assert shadow_p is not real_p
            assert optimizer.state[shadow_p]["exp_avg"].data_ptr() != real_state[real_p]["exp_avg"].data_ptr()
    # ε > 0 moved the shadows off the real trajectory, each by its own perturbation.
    assert (probe.distances[-1] > 0).all()
    first, second = (torch.cat([p.flatten() for p in s.parameters()]) for s in probe._ensemble.shadows)
    assert not torch.equal(first, second)
    # relative=True: ‖δ‖ = ε‖θ‖ exactly, for every shadow.
    norm = torch.linalg.vector_norm(torch.cat([p.flatten() for p in DropoutMLP().parameters()]))
    assert probe.distances[0].tolist() == pytest.approx([1e-4 * norm.item()] * 2, rel=0.05)


class MetricMLP(DropoutMLP):
    """Updates a torchmetrics metric inside training_step, as many users do."""

    def __init__(self):
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.train_accuracy = MulticlassAccuracy(3, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_accuracy(self.net(x), y)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_shadows_do_not_touch_the_users_torchmetrics_state():
    def run(callbacks):
        L.seed_everything(5, verbose=False)
        model = MetricMLP()
        trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)
        trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
        return model, trainer

    plain_model, plain = run([])
    probe = ChaosProbe(num_shadows=2, vectorize=True)
    probed_model, probed = run([probe])
    assert torch.equal(plain.callback_metrics["train_acc"], probed.callback_metrics["train_acc"])
    # The shadows updated their own copies of the metric, not the user's, and in one batched step: vmap takes
    # torchmetrics' functional state update.
    assert probe._ensemble.vectorized
    assert probe._ensemble.shadows[0].train_accuracy is not probed_model.train_accuracy


@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true"])
def test_zero_epsilon_is_bit_identical_in_other_precisions(precision):
    probe = ChaosProbe(epsilon=0.0, num_shadows=1, log_every_n_steps=1)
    reference, _ = fit(SETUPS["step-scheduler+clip-norm"], max_epochs=2, precision=precision)
    model, trainer = fit(SETUPS["step-scheduler+clip-norm"], callbacks=[probe], max_epochs=2, precision=precision)
    assert (probe.distances == 0).all()
    assert next(probe._ensemble.shadows[0].parameters()).dtype == next(model.parameters()).dtype
    for a, b in zip(parameters_of(reference), parameters_of(model)):
        assert torch.equal(a, b)


class MixupMLP(DropoutMLP):
    """Mixup with its coefficient drawn from NumPy's or Python's global generator, as many recipes do."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def training_step(self, batch, batch_idx):
        import random

        import numpy as np

        x, y = batch
        lam = float(np.random.beta(0.4, 0.4)) if self.source == "numpy" else random.betavariate(0.4, 0.4)
        perm = torch.randperm(x.shape[0])
        logits = self.net(lam * x + (1 - lam) * x[perm])
        cross_entropy = torch.nn.functional.cross_entropy
        return lam * cross_entropy(logits, y) + (1 - lam) * cross_entropy(logits, y[perm])


@pytest.mark.parametrize("source", ["numpy", "python"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_numpy_and_python_draws_in_training_step_are_replayed_not_consumed(source, vectorize):
    """The shadows draw the real step's mixup coefficient, and the real run draws what it would have without them."""
    import random

    import numpy as np

    def run(callbacks):
        L.seed_everything(3, verbose=False)
        model = MixupMLP(source)
        quiet_trainer(max_steps=12, callbacks=callbacks).fit(model, DataLoader(random_classification(), batch_size=16))
        return model, (np.random.rand(), random.random())

    plain, plain_after = run([])
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, vectorize=vectorize)
    probed, probed_after = run([probe])
    for a, b in zip(parameters_of(plain), parameters_of(probed)):
        assert torch.equal(a, b)
    assert plain_after == probed_after
    assert probe._ensemble.vectorized == vectorize
    if not vectorize:  # bit identity is the sequential path's promise
        assert (probe.distances == 0).all()
    else:
        assert probe.distances.max() < 1e-5


class TrainerTouchingMLP(DropoutMLP):
    """Writes to its logger directly and stops the run from its training_step, but only when it is not the module
    that was built (a shadow is a deep copy): the real run must see neither."""

    def __init__(self):
        super().__init__()
        self.built_as = id(self)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if id(self) != self.built_as:
            assert isinstance(self.trainer, L.Trainer)  # user code may check it
            self.logger.log_metrics({"written_by_a_shadow": 1.0}, step=self.global_step)
            self.logger.experiment.anything(1)
            self.trainer.should_stop = True
        return loss


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_shadow_cannot_write_to_the_users_logger_or_stop_the_run(vectorize):
    from lightning.pytorch.loggers.logger import Logger

    class RecordingLogger(Logger):
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.keys = set()
            self.calls = []

        @property
        def experiment(self):
            logger = self

            class Experiment:
                def __getattr__(self, name):
                    return lambda *args, **kwargs: logger.calls.append(name)

            return Experiment()

        def log_metrics(self, metrics, step=None):
            self.keys.update(metrics)

        def log_hyperparams(self, *args, **kwargs):
            pass

    logger = RecordingLogger()
    L.seed_everything(0, verbose=False)
    probe = ChaosProbe(num_shadows=2, vectorize=vectorize)
    trainer = quiet_trainer(max_steps=5, logger=logger, callbacks=[probe])
    trainer.fit(TrainerTouchingMLP(), DataLoader(random_classification(), batch_size=16))
    assert trainer.global_step == 5 and not trainer.should_stop
    assert "written_by_a_shadow" not in logger.keys and "anything" not in logger.calls
    assert len(probe.distances) == 6  # the shadows ran every step


def test_auto_runs_the_shadows_one_at_a_time_in_16_bit_precision():
    """Batched bf16 kernels round otherwise than the real model's; one at a time, ε = 0 stays exact."""
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, log_every_n_steps=1)  # K = 4 of a small model: "auto" would batch
    fit(SETUPS["dropout+momentum"], callbacks=[probe], max_epochs=1, precision="bf16-mixed")
    assert not probe._ensemble.vectorized
    assert (probe.distances == 0).all()
