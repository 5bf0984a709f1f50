"""TangentProbe against exact answers (GD and heavy ball on a quadratic, the logistic map), against ChaosProbe on a
real MLP, and the callback's contract: observation never perturbs, refusals, bad input, checkpoints, logging."""

import copy
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from conftest import DropoutMLP, Quadratic, dummy_loader, load_example, quiet_trainer, random_classification
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_chaos import ChaosProbe
from lightning_chaos.demo import DigitsDataModule, MLPClassifier, load_digits_tensors
from lightning_chaos.functional.tangent import qr_renormalize
from lightning_chaos.tangent import TangentProbe

torch.set_num_threads(1)


def _increments(history: torch.Tensor, start: int) -> torch.Tensor:
    """The mean exponents over steps (start, T]: (T·S(T) − start·S(start)) / (T − start), free of the transient."""
    steps = history.shape[0]
    return (history[-1] * steps - history[start - 1] * start) / (steps - start)


# -- exact checks ---------------------------------------------------------------------------------------------------


def test_gd_on_a_quadratic_gives_the_exact_spectrum_and_sharpness():
    eigenvalues, lr, steps = [0.2, 1.2, 2.6, 3.4, 4.6], 0.5, 120
    probe = TangentProbe(num_exponents=5, sharpness=True, sharpness_every=10)
    quiet_trainer(max_steps=steps, callbacks=[probe]).fit(Quadratic(eigenvalues, lr, seed=3), dummy_loader(steps))
    expected = torch.tensor(sorted((math.log(abs(1 - lr * a)) for a in eigenvalues), reverse=True),
                            dtype=torch.float64)
    # after the alignment transient every step grows each direction by exactly |1 − η a_i|
    torch.testing.assert_close(_increments(probe.spectrum_history, 40), expected, rtol=0, atol=1e-9)
    # the running exponents carry the transient ln|cos|/t
    torch.testing.assert_close(probe.lyapunov_spectrum, expected, rtol=0, atol=0.06)
    assert probe.spectrum_history.shape == (steps, 5)
    assert probe.num_positive == 1  # 4.6 > 2/η = 4: the one unstable direction
    assert probe.sharpness == pytest.approx(4.6, rel=1e-6)
    assert probe.sharpness_threshold == pytest.approx(2 / lr)
    assert len(probe.sharpness_history) == 12 and probe.sharpness_steps.tolist()[:2] == [0, 10]
    assert probe.trusted


class HeavyBallQuadratic(Quadratic):
    def __init__(self, eigenvalues, lr, momentum, seed=0):
        super().__init__(eigenvalues, lr, seed)
        self.momentum = momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def test_heavy_ball_on_a_quadratic_gives_the_roots_of_each_direction():
    """Per direction the tangent map has the roots of z² − (1 + μ − ηa)z + μ; a complex pair gives two exponents
    ln √μ."""
    eigenvalues, lr, momentum, steps = [0.05, 1.0, 7.0], 0.5, 0.5, 400
    roots = np.concatenate([np.roots([1.0, -(1 + momentum - lr * a), momentum]) for a in eigenvalues])
    expected = torch.tensor(sorted(np.log(np.abs(roots)), reverse=True), dtype=torch.float64)
    probe = TangentProbe(num_exponents=6)
    quiet_trainer(max_steps=steps, callbacks=[probe]).fit(HeavyBallQuadratic(eigenvalues, lr, momentum, seed=1),
                                                          dummy_loader(steps))
    assert probe.spectrum_history.shape == (steps - 1, 6)  # attached once the momentum buffer existed
    increments = _increments(probe.spectrum_history, 100)
    pair = [2, 3]  # a = 1: complex roots of modulus √μ
    real = [0, 1, 4, 5]
    torch.testing.assert_close(increments[real], expected[real], rtol=0, atol=1e-9)
    torch.testing.assert_close(increments[pair].sum(), expected[pair].sum(), rtol=0, atol=1e-9)
    # the pair's split oscillates with the rotation: each running value within C/t of ln √μ
    torch.testing.assert_close(probe.lyapunov_spectrum[pair], torch.full((2,), math.log(momentum) / 2,
                                                                         dtype=torch.float64), rtol=0, atol=0.02)
    assert probe.num_positive == 1


class LogisticMap(L.LightningModule):
    """A one-parameter model whose GD step is x ← r x (1 − x): L'(x) = (x − f(x))/η, L = ((1 − r)x²/2 + r x³/3)/η."""

    def __init__(self, r=4.0, lr=0.1, x0=0.3):
        super().__init__()
        self.r, self.lr = r, lr
        self.x = nn.Parameter(torch.tensor([x0], dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        x = self.x
        return (((1 - self.r) * x**2 / 2 + self.r * x**3 / 3) / self.lr).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RecordParameters(Callback):
    def __init__(self):
        self.values = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.values.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))


def test_the_logistic_map_as_a_gd_model_gives_ln_2():
    steps, r = 1200, 4.0
    recorder, probe = RecordParameters(), TangentProbe()
    quiet_trainer(max_steps=steps, callbacks=[recorder, probe]).fit(LogisticMap(r), dummy_loader(steps))
    orbit = torch.cat(recorder.values)
    assert orbit.min() > 0 and orbit.max() < 1  # the orbit stayed on the attractor
    exact = (r - 2 * r * orbit).abs().log().mean().item()  # the time average of ln|f'(x_t)| on this very orbit
    assert probe.lyapunov_spectrum.item() == pytest.approx(exact, abs=1e-12)
    assert probe.lyapunov_spectrum.item() == pytest.approx(math.log(2), abs=0.05)  # ergodic average, error ~ 1/√T


def test_top_exponent_agrees_with_chaos_probe_on_a_real_float64_mlp():
    """Full-batch GD on sklearn digits: the renormalised shadow (ε = 1e-9, every step) and the tangent measure the
    same exponent; after the transient their per-step growth agrees to 1e-4."""
    torch.manual_seed(0)
    steps = 200
    tangent = TangentProbe(num_exponents=1)
    shadow = ChaosProbe(epsilon=1e-9, relative=False, renormalize_every=1, sentinel_steps=0)
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[tangent, shadow]).fit(
        MLPClassifier(hidden=(32,), lr=2.0).double(), DigitsDataModule(batch_size=None, dtype=torch.float64))
    d = shadow.distances[:, 0]
    shadow_growth = (d[1:] / d[0]).log()  # renormalised to d(0) every step: ln(d(t)/d(0)) is one step's growth
    assert abs(_increments(tangent.spectrum_history, 100).item() - shadow_growth[100:].mean().item()) < 1e-4
    assert tangent.lyapunov_spectrum.item() == pytest.approx(shadow.running_exponents.item(), rel=0.1)


class BatchNormMLP(MLPClassifier):
    """The quickstart MLP with a BatchNorm after its hidden layer; ``frozen`` keeps the BatchNorm in eval mode (its
    running statistics normalise), as fine-tuning recipes do."""

    def __init__(self, frozen=False, **kwargs):
        super().__init__(hidden=(32,), **kwargs)
        self.frozen = frozen
        self.norm = nn.BatchNorm1d(32)
        self.net = nn.Sequential(self.net[0], self.norm, *self.net[1:])

    def on_train_epoch_start(self):
        if self.frozen:
            self.norm.eval()


# -- the callback's contract ----------------------------------------------------------------------------------------


class Recorder(Callback):
    """What the user sees of the real training: losses, logged metrics, gradients."""

    def __init__(self):
        self.losses, self.metrics, self.grads = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        self.metrics.append({k: v.clone() for k, v in trainer.callback_metrics.items()})


def _fit_dropout_mlp(optimizer, probes, max_steps=12):
    L.seed_everything(0, verbose=False)
    model = DropoutMLP(optimizer=optimizer, dropout=0.3)
    recorder = Recorder()
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True)
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[*probes, recorder])
    trainer.fit(model, loader)
    state = trainer.optimizers[0].state_dict()["state"]
    return model, state, recorder, torch.get_rng_state(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_observation_never_perturbs(optimizer):
    """With dropout: weights, optimizer state, gradients, losses, logged metrics and the RNG are bit-identical."""
    plain = _fit_dropout_mlp(optimizer, [])
    probe = TangentProbe(num_exponents=3, sharpness=True, sharpness_every=3)
    probed = _fit_dropout_mlp(optimizer, [probe])
    assert probe.spectrum_history.shape[0] >= 10 and probe.trusted  # the replayed gradient matched the real one
    assert torch.isfinite(probe.lyapunov_spectrum).all() and math.isfinite(probe.sharpness)
    for a, b in zip(plain[0].parameters(), probed[0].parameters()):
        assert torch.equal(a, b)
    for key, state in plain[1].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(probed[1][key][name]))
    for grads_a, grads_b in zip(plain[2].grads, probed[2].grads):
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(plain[2].losses, probed[2].losses))
    for a, b in zip(plain[2].metrics, probed[2].metrics):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(plain[3], probed[3]) and np.array_equal(plain[4], probed[4])


def test_parameters_changed_outside_the_optimizer_step_are_said():
    """A hook that rescales the weights after each step is part of the real map, not of the optimizer's update that
    the tangents follow: the probe says so (and never touches the training)."""

    class Shrink(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(0.999)

    probe = TangentProbe(num_exponents=1)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[Shrink(), probe])
    with pytest.warns(UserWarning, match="parameters changed after the optimizer's step.*UNTRUSTED"):
        trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
    assert not probe.trusted and probe.spectrum_history.shape[0] == 4
    assert not trainer.optimizers[0]._optimizer_step_post_hooks  # the probe's step hook is gone with the fit


class ScalesItsGradients(MLPClassifier):
    """Edits the gradients in its own ``on_before_optimizer_step``, which Lightning calls after the callbacks'."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            p.grad.mul_(self.scale)


class WarmsUpItself(MLPClassifier):
    """Sets its learning rate in its own ``on_before_optimizer_step`` (after the callbacks')."""

    def on_before_optimizer_step(self, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * min(1.0, (self.trainer.global_step + 1) / 10)


@pytest.mark.parametrize("model, what", [(lambda: ScalesItsGradients(0.5), "gradients"),
                                         (lambda: ScalesItsGradients(1.0), None),
                                         (WarmsUpItself, "hyperparameters")],
                         ids=["gradients-scaled", "gradients-rewritten-same", "lr-set"])
def test_a_step_edited_after_the_probe_is_said(model, what):
    """The optimizer steps with gradients or a learning rate the probe did not see: said (a write of the same values
    is not an edit)."""
    probe = TangentProbe(num_exponents=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[probe]).fit(model(), datamodule=DigitsDataModule())
    said = [str(w.message) for w in caught if "the optimizer stepped with other" in str(w.message)]
    assert probe.trusted is (what is None) and len(said) == (what is not None)
    assert what is None or f"other {what} than" in said[0]
    assert probe.spectrum_history.shape[0] == 3


class WarmUp(Callback):
    """A linear learning-rate warm-up set in ``on_before_optimizer_step``, as several recipes do."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * min(1.0, (trainer.global_step + 1) / 10)


def test_the_probe_runs_after_the_callbacks_it_observes():
    """Listed before a warm-up callback, the probe still steps its tangents with the LR the warm-up set for the step
    (it moves itself after the other callbacks, beside a ChaosProbe, checkpointing last): the same spectrum either
    way. Before, it read the previous step's LR, silently."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(order):
        L.seed_everything(0, verbose=False)
        probe, chaos, warm_up = TangentProbe(num_exponents=2), ChaosProbe(sentinel_steps=0), WarmUp()
        named = {"probe": probe, "chaos": chaos, "warm-up": warm_up}
        trainer = quiet_trainer(max_steps=12, limit_val_batches=0, callbacks=[named[name] for name in order])
        trainer.fit(MLPClassifier(lr=0.5), DigitsDataModule(batch_size=None))
        return probe, [type(c).__name__ for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]

    first, order = run(["probe", "chaos", "warm-up"])
    assert order == ["WarmUp", "TangentProbe", "ChaosProbe"]
    last, _ = run(["warm-up", "probe"])
    assert torch.equal(first.spectrum_history, last.spectrum_history) and first.trusted


@pytest.mark.parametrize("observer", [TangentProbe, lambda: ChaosProbe(sentinel_steps=0)], ids=["tangent", "chaos"])
def test_moving_after_the_other_callbacks_leaves_their_setup_alone(observer):
    """The probes reorder the Trainer's callbacks from their ``setup``, while Lightning loops over the list calling
    ``setup``: every callback is still set up once, and Lightning's EMA callback, listed after a probe, works (it
    crashed the fit when the list was reordered in place)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    calls = []

    class Recorder(Callback):
        def setup(self, trainer, pl_module, stage):
            calls.append(self)

    probe, first, second = observer(), Recorder(), Recorder()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[probe, first, second, EMAWeightAveraging()])
    trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
    assert calls == [first, second] and trainer.callbacks[:3] == [first, second, trainer.callbacks[2]]
    assert trainer.callbacks[3] is probe


class EditsInItsOwnHook(MLPClassifier):
    """Changes the step in its own ``on_before_optimizer_step`` (Lightning calls it after the callbacks'), through
    ``.data`` (no version counter bumped) or not, or clips in an overridden ``clip_gradients``."""

    def __init__(self, edit):
        super().__init__()
        self.edit = edit

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            if self.edit == "weights":
                p.data.mul_(0.99)
            elif self.edit == "gradients through .data":
                p.grad.data.mul_(0.5)
            elif self.edit == "gradients reversed":
                p.grad.neg_()

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.edit == "own clip_gradients":
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)


class EditsAfterTheStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for p in pl_module.parameters():
            p.data.clamp_(-0.05, 0.05)  # WGAN's weight clipping, through .data


@pytest.mark.parametrize("edit, said", [
    ("weights", "other weights"), ("gradients through .data", "other gradients"),
    ("gradients reversed", "other gradients"), ("own clip_gradients", "other gradients"),
    ("clamped after the step", "the parameters changed after the optimizer's step")])
def test_every_edit_to_the_step_is_said(edit, said):
    """Whatever changes the step outside what the tangents follow, however it is written, is said once."""
    probe = TangentProbe(num_exponents=1)
    callbacks = [EditsAfterTheStep(), probe] if edit == "clamped after the step" else [probe]
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(EditsInItsOwnHook(edit), datamodule=DigitsDataModule())
    messages = [str(w.message) for w in caught if "UNTRUSTED" in str(w.message)]
    assert probe.trusted is False and len(messages) == 1 and said in messages[0], messages
    assert said.split()[-1] in probe._summary() or "parameters changed" in probe._summary()


class LogsGradientNorms(MLPClassifier):
    """A read-only ``on_before_optimizer_step`` (which turns the step checks on) and a parameter no loss uses (no
    ``.grad``: the optimizer skips it)."""

    def __init__(self, optimizer):
        super().__init__(momentum=0.9)
        self.unused = nn.Linear(3, 3)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-2)
        return super().configure_optimizers()

    def on_before_optimizer_step(self, optimizer):
        self.log("grad_norm", torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]).norm())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_read_only_hook_in_the_window_raises_no_false_alarm(optimizer):
    probe = TangentProbe(num_exponents=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=5, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[probe]).fit(
            LogsGradientNorms(optimizer), datamodule=DigitsDataModule())
    assert probe._step_editable and probe.trusted, [str(w.message) for w in caught if "TangentProbe" in str(w.message)]


def test_a_crashed_fit_leaves_no_hook_on_the_optimizer():
    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("the user's bug")

    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[Crash(), TangentProbe()])
    with pytest.raises(RuntimeError, match="the user's bug"):
        trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


@pytest.mark.parametrize("frozen", [False, True], ids=["train-mode", "frozen"])
def test_batch_norm_statistics_are_never_perturbed(frozen):
    """The replay runs the BatchNorm on copies of its running statistics: the real ones end bit-identical."""

    def run(probes):
        L.seed_everything(0, verbose=False)
        model = BatchNormMLP(frozen=frozen, lr=0.5, momentum=0.9)
        quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=probes).fit(model, datamodule=DigitsDataModule())
        return model

    probe = TangentProbe(num_exponents=2)
    plain, probed = run([]), run([probe])
    assert probe.trusted and probe.spectrum_history.shape[0] == 7  # momentum: from the second step
    for a, b in zip([*plain.parameters(), *plain.buffers()], [*probed.parameters(), *probed.buffers()]):
        assert torch.equal(a, b)
    assert int(probed.norm.num_batches_tracked) == (0 if frozen else 8)


@pytest.mark.parametrize("how", ["swapped", "rewritten"])
def test_a_parameter_storage_swapped_between_steps_is_followed(how):
    """The probe keeps its θ leaves from step to step as views of the parameters; a ``p.data = ...`` swap between
    steps must be noticed, or the tangents would go through stale weights. Neither a swap nor an in-place rewrite
    with the same values changes the map: the results stay trusted."""

    class Swap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for p in pl_module.parameters():
                if how == "swapped":
                    p.data = p.data.clone()
                else:
                    with torch.no_grad():
                        p.copy_(p.clone())

    def run(extra):
        L.seed_everything(0, verbose=False)
        probe = TangentProbe(num_exponents=1)
        quiet_trainer(max_steps=6, callbacks=[*extra, probe]).fit(MLPClassifier(lr=0.5),
                                                                  datamodule=DigitsDataModule())
        assert probe.trusted
        return probe.spectrum_history

    assert torch.equal(run([Swap()]), run([]))


def test_adam_gets_the_preconditioned_sharpness_and_its_threshold():
    probe = TangentProbe(num_exponents=2, sharpness=True, sharpness_every=2)
    model = _fit_dropout_mlp("adam", [probe])[0]
    lr = model.lr / 20
    assert probe.preconditioned_sharpness_threshold == pytest.approx(38 / lr)
    assert probe.preconditioned_sharpness > 0 and len(probe.preconditioned_sharpness_history) == 6
    assert math.isnan(probe.sharpness_threshold)


class RMSpropMLP(DropoutMLP):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


def test_an_unsupported_optimizer_warns_and_leaves_training_untouched():
    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = RMSpropMLP()
        quiet_trainer(max_steps=5, callbacks=callbacks).fit(model, DataLoader(random_classification(), batch_size=16))
        return model

    plain = fit([])
    probe = TangentProbe()
    with pytest.warns(UserWarning, match="RMSprop is not supported"):
        probed = fit([probe])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), probed.parameters()))
    assert probe.spectrum_history.shape == (0, 1) and math.isnan(probe.lyapunov_spectrum.item())


class OwnClipping(DropoutMLP):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.current_epoch > 0:  # the docstring's example: clip from the second epoch on
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)


def test_own_clipping_is_refused():
    probe = TangentProbe()
    with pytest.warns(UserWarning, match="overridden configure_gradient_clipping"):
        quiet_trainer(max_steps=2, callbacks=[probe], gradient_clip_val=1.0).fit(
            OwnClipping(), DataLoader(random_classification(), batch_size=16))
    assert probe.spectrum_history.shape[0] == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulated_halves_equal_whole_batches(optimizer):
    """accumulate_grad_batches=2 over halves of each batch is the same step as the whole batch (mean losses): each
    half is replayed with its own random state and its loss divided by 2, as Lightning does; the spectra agree."""
    def spectrum(batch_size, accumulate):
        L.seed_everything(0, verbose=False)
        probe = TangentProbe(num_exponents=2, sharpness=True, sharpness_every=3)
        loader = DataLoader(random_classification(), batch_size=batch_size)
        quiet_trainer(max_steps=8, callbacks=[probe], accumulate_grad_batches=accumulate, precision="64-true").fit(
            DropoutMLP(optimizer=optimizer, dropout=0.0), loader)
        assert probe.trusted
        return probe.spectrum_history, probe.sharpness_history

    whole, halves = spectrum(32, 1), spectrum(16, 2)
    assert whole[0].shape[0] >= 6
    torch.testing.assert_close(halves[0], whole[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(halves[1], whole[1], rtol=1e-7, atol=0)


def _first_growth_against_finite_differences(base, **trainer_kwargs):
    """The probe's first tangent growth ln‖J u₀‖ and central finite differences of the real training step along u₀,
    fitted by Lightning from θ₀ ± h u₀ (float64, full batch)."""
    size = sum(p.numel() for p in base.parameters())
    u0, _ = qr_renormalize(torch.randn(size, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

    def step_from(offset):
        model = copy.deepcopy(base)
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(model.parameters()) + offset,
                                            model.parameters())
        probe = TangentProbe()
        quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[probe], **trainer_kwargs).fit(
            model, DigitsDataModule(batch_size=None, dtype=torch.float64))
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), probe

    _, probe = step_from(torch.zeros(size, dtype=torch.float64))  # the probe's u₀ is this seeded QR's first column
    h = 1e-7
    difference = (step_from(h * u0[:, 0])[0] - step_from(-h * u0[:, 0])[0]) / (2 * h)
    assert probe.trusted and probe.spectrum_history.shape == (1, 1)
    return probe.spectrum_history[0, 0].item(), difference.norm().log().item()


@pytest.mark.parametrize("algorithm, clip", [("norm", 0.05), ("value", 0.002), (None, 0.0)])
def test_a_clipped_step_is_linearised_exactly(algorithm, clip):
    """Lightning's clipping (by norm or by value, active here) goes into the tangent map."""
    torch.manual_seed(0)
    clipping = dict(gradient_clip_val=clip, gradient_clip_algorithm=algorithm) if algorithm else {}
    growth, difference = _first_growth_against_finite_differences(
        MLPClassifier(hidden=(32,), lr=2.0).double(), **clipping)
    assert growth == pytest.approx(difference, abs=1e-8)


@pytest.mark.parametrize("frozen", [False, True], ids=["train-mode", "frozen"])
def test_a_batch_norm_step_is_linearised_exactly(frozen):
    """BatchNorm in train mode (the batch's statistics, differentiated through) and frozen in eval mode (the running
    statistics the real model has, constants of the step)."""
    torch.manual_seed(0)
    model = BatchNormMLP(frozen=frozen, lr=2.0)
    with torch.no_grad():  # running statistics of real data, not the initial zeros and ones
        hidden = model.net[0](load_digits_tensors()[0])
        model.norm.running_mean.copy_(hidden.mean(0))
        model.norm.running_var.copy_(hidden.var(0) * 2)  # not the batch's: frozen and train mode normalise differently
    growth, difference = _first_growth_against_finite_differences(model.double())
    assert growth == pytest.approx(difference, abs=1e-8)


class ManualModel(DropoutMLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None


def test_manual_optimization_is_refused_at_setup():
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        quiet_trainer(max_steps=1, callbacks=[TangentProbe()]).fit(ManualModel(),
                                                                   DataLoader(random_classification(), batch_size=16))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_exponents=0), "num_exponents"),
    (dict(num_exponents=True), "num_exponents"),
    (dict(num_exponents=2.0), "num_exponents"),
    (dict(orthonormalize_every=0), "orthonormalize_every"),
    (dict(sharpness="yes"), "sharpness"),
    (dict(sharpness_every=0), "sharpness_every"),
    (dict(start_step=-1), "start_step"),
    (dict(start_step=5, stop_step=5), "stop_step"),
    (dict(stop_step=1.5), "stop_step"),
    (dict(log_every_n_steps=0), "log_every_n_steps"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        TangentProbe(**kwargs)


def test_too_many_exponents_for_the_state_disable_the_probe():
    probe = TangentProbe(num_exponents=4)
    with pytest.warns(UserWarning, match="exceeds the dimension 3"):
        quiet_trainer(max_steps=3, callbacks=[probe]).fit(Quadratic([1.0, 2.0, 3.0], 0.1), dummy_loader(3))


def test_start_and_stop_step_window_the_probe():
    probe = TangentProbe(num_exponents=2, start_step=5, stop_step=15, orthonormalize_every=2)
    quiet_trainer(max_steps=30, callbacks=[probe]).fit(Quadratic([0.5, 1.0, 3.0], 0.1, seed=2), dummy_loader(30))
    history = probe.spectrum_history
    assert history.shape == (10, 2)
    assert torch.isnan(history[0]).all() and torch.equal(history[1], history[2])  # QR every 2nd step only
    assert probe._tangents is None  # freed at stop_step


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    def probe():
        return TangentProbe(num_exponents=4, sharpness=True, sharpness_every=5)

    def model():
        return HeavyBallQuadratic([0.3, 1.0, 2.0, 5.0], 0.2, 0.6, seed=4)

    whole = probe()
    quiet_trainer(max_steps=40, callbacks=[whole]).fit(model(), dummy_loader(40))

    first = probe()
    trainer = quiet_trainer(max_steps=20, callbacks=[first])
    trainer.fit(model(), dummy_loader(40))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = probe()
    quiet_trainer(max_steps=40, callbacks=[resumed]).fit(model(), dummy_loader(40), ckpt_path=tmp_path / "half.ckpt")

    assert torch.equal(resumed.spectrum_history, whole.spectrum_history)
    assert torch.equal(resumed.lyapunov_spectrum, whole.lyapunov_spectrum)
    assert torch.equal(resumed.sharpness_history, whole.sharpness_history)


def test_logs_the_spectrum_and_the_sharpness_with_its_threshold(tmp_path):
    probe = TangentProbe(num_exponents=2, sharpness=True, sharpness_every=1, log_every_n_steps=5)
    logger = CSVLogger(tmp_path, name="run")
    quiet_trainer(max_steps=10, logger=logger, callbacks=[probe]).fit(Quadratic([1.0, 3.0, 5.0], 0.3, seed=2),
                                                                      dummy_loader(10))
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for tag in ["chaos/tangent/exponent_0", "chaos/tangent/exponent_1", "chaos/tangent/num_positive",
                "chaos/tangent/kaplan_yorke", "chaos/sharpness", "chaos/sharpness_threshold"]:
        assert tag in columns
    logged = [row for row in rows if row["chaos/sharpness"]]
    assert [int(row["step"]) for row in logged][:2] == [5, 10]
    assert float(logged[-1]["chaos/sharpness"]) == pytest.approx(5.0, rel=1e-4)
    assert float(logged[-1]["chaos/sharpness_threshold"]) == pytest.approx(2 / 0.3)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_k_tangents_cost_one_replayed_step_and_k_products(model):
    """The cost formula the docs state, counted exactly (floating-point operations of products and convolutions, the
    double backward's included): a probed step is the real step, one replay of it (forward and a backward that keeps
    its graph) and one Hessian-vector product per tangent: k tangents add k products, not k forwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_chaos.demo import SmallCNN

    def flops(k):
        L.seed_everything(0, verbose=False)
        probes = [TangentProbe(num_exponents=k)] if k else []
        with FlopCounterMode(display=False) as counter:
            quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=probes).fit(
                SmallCNN() if model == "cnn" else MLPClassifier(), datamodule=DigitsDataModule())
        assert not probes or probes[0].spectrum_history.shape[0] == 4  # every step probed
        return counter.get_total_flops()

    plain, one, two, three = (flops(k) for k in range(4))
    product = two - one
    assert product > 0 and three - two == product  # each tangent: one more product, nothing else
    assert one - product == 2 * plain  # the replay is the real step's arithmetic again, once
    # the product's arithmetic next to a gradient's: why one tangent cannot cost as little as one shadow step
    assert 1.1 * plain < product < 2.1 * plain


def test_edge_of_stability_example_quick():
    """The example in --quick mode: full-batch GD sharpens until the sharpness reaches 2/η and stays near it."""
    example = load_example("edge_of_stability")
    result = example.main(["--quick", "--no-plot"])
    sharpness, threshold = result["sharpness"], result["threshold"]
    assert sharpness[0] < 0.7 * threshold  # it started well below the edge: progressive sharpening
    assert abs(result["plateau_ratio"] - 1) < 0.25  # and ended at 2/η within ±25 %
