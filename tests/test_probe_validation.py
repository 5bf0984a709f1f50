"""Bad input raises early with the argument's name; faults in the probe never break the real training."""

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from conftest import DropoutMLP, Quadratic, dummy_loader, parameters_of, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"epsilon": -1e-3}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": "small"}, "epsilon"),
        ({"num_shadows": 0}, "num_shadows"),
        ({"num_shadows": 2.5}, "num_shadows"),
        ({"renormalize_every": 0}, "renormalize_every"),
        ({"norm": "linf"}, "norm"),
        ({"distribution": "cauchy"}, "distribution"),
        ({"target": 0.9}, "target"),
        ({"monitor": "val_acc"}, "target"),
        ({"monitor": "val_acc", "target": 0.9, "mode": "up"}, "mode"),
        ({"stop_at_target": True}, "stop_at_target"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"monitor": "val_acc", "target": float("nan")}, "target"),
        ({"monitor": 5, "target": 0.9}, "monitor"),
        ({"relative": "no"}, "relative"),
        ({"perturb_biases": 1}, "perturb_biases"),
        ({"monitor": "val_acc", "target": 0.9, "stop_at_target": "yes"}, "stop_at_target"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        ChaosProbe(**kwargs)


class ManualModel(Quadratic):
    def __init__(self):
        super().__init__((1.0,), 0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def test_manual_optimization_is_refused_at_fit_start():
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        quiet_trainer(max_steps=2, callbacks=[ChaosProbe()]).fit(ManualModel(), dummy_loader(2))


class ExplodingShadowMLP(DropoutMLP):
    """Fails only inside a shadow (a deep copy carries the flag), as an odd module might."""

    is_shadow = False

    def training_step(self, batch, batch_idx):
        if self.is_shadow and batch_idx == 2:
            raise RuntimeError("odd module")
        return super().training_step(batch, batch_idx)


def _fit_mlp(model_cls, callbacks):
    L.seed_everything(7, verbose=False)
    model = model_cls()
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True)
    quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, loader)
    return model


def test_an_error_inside_a_shadow_disables_the_probe_but_not_training(monkeypatch):
    import lightning_chaos.shadow as shadow_module

    original = shadow_module.make_shadow_module

    def make_exploding_shadow(module):
        shadow = original(module)
        shadow.is_shadow = True
        return shadow

    monkeypatch.setattr(shadow_module, "make_shadow_module", make_exploding_shadow)
    probe = ChaosProbe()
    with pytest.warns(UserWarning, match="odd module"):
        probed = _fit_mlp(ExplodingShadowMLP, [probe])
    reference = _fit_mlp(ExplodingShadowMLP, [])
    for a, b in zip(parameters_of(reference), parameters_of(probed)):
        assert torch.equal(a, b)
    assert probe.distances.shape[0] == 3  # d(0) and the two steps before the fault


class BlowUpMLP(DropoutMLP):
    """Real training stays finite (tiny lr); the shadows are made to diverge by a huge perturbation."""

    def __init__(self):
        super().__init__(lr=1e-3, dropout=0.0)


def test_a_diverging_shadow_is_retired_with_a_warning_and_a_nan_exponent():
    probe = ChaosProbe(epsilon=1e30, relative=False, num_shadows=2, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="non-finite"):
        probed = _fit_mlp(BlowUpMLP, [probe])
    reference = _fit_mlp(BlowUpMLP, [])
    for a, b in zip(parameters_of(reference), parameters_of(probed)):
        assert torch.equal(a, b)
    assert torch.isnan(probe.local_exponents).all()
    assert probe.lyapunov_exponent != probe.lyapunov_exponent  # NaN


class UncopyableMLP(DropoutMLP):
    """Holds something deepcopy cannot copy, as some modules do (open handles, locks)."""

    def __init__(self):
        super().__init__()
        import threading

        self.lock = threading.Lock()


def test_a_model_that_cannot_be_cloned_disables_the_probe_with_a_warning():
    probe = ChaosProbe()
    with pytest.warns(UserWarning, match="could not clone"):
        probed = _fit_mlp(UncopyableMLP, [probe])
    reference = _fit_mlp(UncopyableMLP, [])
    for a, b in zip(parameters_of(reference), parameters_of(probed)):
        assert torch.equal(a, b)
    assert probe.distances.shape == (0, 1)


class ZeroModel(Quadratic):
    def __init__(self):
        super().__init__((1.0, 2.0), 0.1)
        with torch.no_grad():
            self.weight.zero_()


def test_relative_epsilon_on_all_zero_parameters_is_refused_with_advice_and_training_goes_on():
    probe = ChaosProbe()
    with pytest.warns(UserWarning, match="relative=False"):
        quiet_trainer(max_steps=3, callbacks=[probe]).fit(ZeroModel(), dummy_loader(3))
    absolute = ChaosProbe(relative=False, epsilon=1e-6)
    quiet_trainer(max_steps=3, callbacks=[absolute], precision="64-true").fit(ZeroModel(), dummy_loader(3))
    assert absolute.distances.shape == (4, 1) and (absolute.distances[0] > 0).all()
