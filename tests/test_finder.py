"""ChaosLRFinder: exact exponents on the quadratic, no side effects, a sensible suggestion on real digits."""

import logging
import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import (
    DropoutMLP,
    Quadratic,
    assert_sweeps_agree_where_learning,
    dummy_loader,
    parameters_of,
    quiet_trainer,
    random_classification,
)
from lightning_chaos import ChaosLRFinder, ChaosProbe, find_chaos_lr
from lightning_chaos.finder import ChaosLRFinderResult
from lightning_chaos.functional.onset import (
    chaotic_mask,
    edge_of_chaos_suggestion,
    learning_band,
    learns_well_threshold,
    onset_index,
    speed_band_top,
    trainability_edge_suggestion,
)

EIGENVALUES = (1.0, 2.0, 3.0)


@pytest.mark.parametrize("vectorize", [True, False], ids=["stacked", "one-at-a-time"])
def test_quadratic_exponents_match_ground_truth_and_no_suggestion_is_made(vectorize):
    model = Quadratic(EIGENVALUES, lr=0.1)
    before = model.weight.detach().clone()
    with pytest.warns(UserWarning, match="only where learning has already failed"):
        result = find_chaos_lr(
            quiet_trainer(max_steps=10, precision="64-true"),
            model,
            train_dataloaders=dummy_loader(10),
            min_lr=0.01,
            max_lr=2.0,
            num_lrs=12,
            steps_per_lr=200,
            vectorize=vectorize,
            anchor="onset",
        )
    exact = torch.tensor([math.log(max(abs(1 - lr * a) for a in EIGENVALUES)) for lr in result.lrs.tolist()])
    tolerance = torch.maximum(0.02 * exact.abs(), torch.full_like(exact, 0.01))
    assert ((result.exponents - exact).abs() <= tolerance).all(), (result.exponents, exact)
    # On the quadratic, Λ > 0 exactly where gradient descent stops learning (η > 2/3).
    assert result.learning.tolist() == (result.lrs < 2 / 3).tolist()
    assert result.suggestion is None and result.onset is not None
    assert result.learning_at_onset is False
    assert torch.equal(model.weight, before)
    assert model.lr == 0.1


class OffsetQuadratic(Quadratic):
    """The quadratic plus a constant: L = ½ θᵀAθ + c. Its loss ratio plateaus at c / L(0) wherever GD converges, so
    a whole band of η learns equally well and its top differs from the best η."""

    def __init__(self, eigenvalues, lr, offset):
        super().__init__(eigenvalues, lr)
        self.offset = offset

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.offset


def _exact_loss_ratio(model: OffsetQuadratic, lr: float, steps: int) -> float:
    """The finder's loss ratio from the eigen-decomposition: L_t = ½ Σ_i a_i (1 − η a_i)^(2t) c_i² + offset, with c the
    initial weights in the eigenbasis; mean over the last quarter of ``steps`` against L_0, measured against |L_0|."""
    eigenvalues, basis = torch.linalg.eigh(model.a)
    c = basis.T @ model.weight.detach()
    loss = [
        0.5 * (eigenvalues * (1 - lr * eigenvalues) ** (2 * t) * c**2).sum().item() + model.offset for t in range(steps)
    ]
    tail = loss[-(steps // 4):]
    return 1 - (loss[0] - sum(tail) / len(tail)) / abs(loss[0])


def _offset_quadratic_sweep(offset, vectorize):
    model = OffsetQuadratic(EIGENVALUES, lr=0.1, offset=offset)
    result = find_chaos_lr(
        quiet_trainer(max_steps=10, precision="64-true"), model, train_dataloaders=dummy_loader(40),
        min_lr=0.01, max_lr=2.0, num_lrs=12, steps_per_lr=40, vectorize=vectorize,
    )
    return model, result


@pytest.mark.parametrize("offset", [0.5, -3.0], ids=["positive-loss", "negative-loss"])
def test_default_anchor_on_the_quadratic_steps_back_from_the_exact_top_of_the_learning_band(offset):
    model, result = _offset_quadratic_sweep(offset, vectorize=True)
    _, sequential = _offset_quadratic_sweep(offset, vectorize=False)
    assert result.anchor == "trainability"
    learning = result.learning
    exact = torch.tensor([_exact_loss_ratio(model, lr, 40) for lr in result.lrs.tolist()], dtype=torch.float64)
    torch.testing.assert_close(result.loss_ratio[learning], exact[learning], rtol=1e-9, atol=1e-12)
    # The rule on the exact ratios: the largest η within 1.25x of the best ratio (the same distance above it when the
    # loss is negative), divided by 1.5. Several η learn about equally well, so the top is not the best η.
    best = exact[learning].min()
    well = learning & (exact <= best + 0.25 * best.abs())
    assert well.sum() >= 3 and result.lrs[learning][exact[learning].argmin()] < result.lrs[well].max()
    edge = result.lrs[well].max().item()
    assert result.trainability_edge == edge
    assert result.suggestion == pytest.approx(edge / 1.5, rel=1e-12) and model.lr == result.suggestion
    # the range for a cyclic schedule: from the smallest to the largest η that learns well, the exact band's ends
    assert result.lr_range == (min(result.lrs[well].min().item(), edge / 1.5), edge)
    # The four refined η lie just above the top of the coarse band, between it and the next coarse η.
    coarse = torch.logspace(math.log10(0.01), math.log10(2.0), 12, dtype=torch.float64)
    coarse_well = [lr for lr in coarse.tolist() if lr in result.lrs.tolist() and well[result.lrs.tolist().index(lr)]]
    refined = [lr for lr in result.lrs.tolist() if not torch.isclose(coarse, torch.tensor(lr, dtype=torch.float64)).any()]
    next_coarse = coarse[coarse > max(coarse_well)][0].item()
    assert len(refined) == 4 and all(max(coarse_well) < lr < next_coarse for lr in refined)
    assert sequential.suggestion == pytest.approx(result.suggestion, rel=1e-12)


def _exact_losses(model: OffsetQuadratic, lr: float, steps: int) -> torch.Tensor:
    eigenvalues, basis = torch.linalg.eigh(model.a)
    c = basis.T @ model.weight.detach()
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    return 0.5 * (eigenvalues * (1 - lr * eigenvalues) ** (2 * t) * c**2).sum(1) + model.offset


@pytest.mark.parametrize("vectorize", [True, False], ids=["stacked", "one-at-a-time"])
def test_the_result_holds_every_learning_rates_exact_loss_curve_and_the_sweeps_cost(vectorize):
    model, result = _offset_quadratic_sweep(0.5, vectorize)
    assert result.losses.shape == (len(result.lrs), 40)
    exact = torch.stack([_exact_losses(model, lr, 40) for lr in result.lrs.tolist()])
    ran = torch.isfinite(result.losses)
    # every η starts from the same loss; a learning η runs the whole window; a diverged one stops at a check
    assert ran[:, 0].all() and ran[result.learning].all()
    torch.testing.assert_close(result.losses[ran], exact[ran], rtol=1e-9, atol=1e-12)
    stopped = ~ran.all(1)
    assert stopped.any() and all(row[: int(row.sum())].all() and int(row.sum()) % 10 == 0 for row in ran[stopped])
    # a reference and one shadow per η, each a forward and backward per step it ran
    assert result.model_steps == 2 * int(ran.sum())


def _fit_dropout_mlp(callbacks, max_epochs=2):
    L.seed_everything(11, verbose=False)
    model = DropoutMLP()
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks)
    trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    return model, trainer


def test_sweep_leaves_model_optimizer_rng_and_data_order_untouched():
    reference, _ = _fit_dropout_mlp([])
    rng_after_reference = torch.get_rng_state()
    finder = ChaosLRFinder(min_lr=0.01, max_lr=5.0, num_lrs=4, steps_per_lr=12, refine=0, update_attr=False)
    swept, trainer = _fit_dropout_mlp([finder])
    assert finder.result is not None and len(finder.result.lrs) == 4
    for a, b in zip(parameters_of(reference), parameters_of(swept)):
        assert torch.equal(a, b)
    assert torch.equal(rng_after_reference, torch.get_rng_state())


def test_sweep_leaves_a_dataloaders_own_generator_untouched():
    """Training after the sweep sees the batches it would have seen without it, with DataLoader(generator=...) too."""

    def fit(callbacks):
        L.seed_everything(11, verbose=False)
        model = DropoutMLP()
        generator = torch.Generator().manual_seed(7)
        loader = DataLoader(random_classification(), batch_size=16, shuffle=True, generator=generator)
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, loader)
        return model

    reference = fit([])
    swept = fit([ChaosLRFinder(min_lr=0.01, max_lr=5.0, num_lrs=3, steps_per_lr=10, refine=0, update_attr=False)])
    for a, b in zip(parameters_of(reference), parameters_of(swept)):
        assert torch.equal(a, b)


class _Abort(BaseException):
    """An interrupt that is not an Exception, like KeyboardInterrupt (which Lightning turns into sys.exit)."""


class FailingMLP(DropoutMLP):
    """Raises ``error`` from the ``at``-th call of ``hook`` on (a stacked sweep turns a step's first error into a
    fallback to one candidate at a time): every call is a sweep's, as find_chaos_lr trains nothing."""

    calls = [0]  # shared by the sweep's copies of the module

    def __init__(self, hook, error, at):
        super().__init__()
        self.hook, self.error, self.at = hook, error, at

    def _count(self, hook):
        if hook == self.hook:
            FailingMLP.calls[0] += 1
            if FailingMLP.calls[0] >= self.at:
                raise self.error("failing on purpose")

    def training_step(self, batch, batch_idx):
        self._count("training_step")
        return super().training_step(batch, batch_idx)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self._count("on_before_batch_transfer")
        return batch


@pytest.mark.parametrize(
    ("hook", "error", "at"),
    [
        ("training_step", ValueError, 4),
        ("training_step", _Abort, 4),
        ("on_before_batch_transfer", ValueError, 3),  # while the sweep collects its batches
    ],
    ids=["error-in-step", "interrupt-in-step", "error-collecting-batches"],
)
def test_a_sweep_that_fails_still_restores_the_rng_streams_and_the_loaders_generator(hook, error, at):
    """isolate_rng restores the global streams only on a normal exit: after an error in the sweep the next draws of
    torch, random and NumPy, and the DataLoader's own generator, must be those of a run without the finder."""
    import random

    import numpy as np

    FailingMLP.calls[0] = 0
    model = FailingMLP(hook, error, at)
    trainer = quiet_trainer(max_epochs=1)
    generator = torch.Generator().manual_seed(7)
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True, generator=generator)
    loader_state = generator.get_state()

    def draws():
        return torch.rand(3), random.random(), np.random.rand()

    L.seed_everything(1234, verbose=False)
    expected = draws()
    L.seed_everything(1234, verbose=False)
    with pytest.raises(error, match="failing on purpose"):
        find_chaos_lr(trainer, model, train_dataloaders=loader, min_lr=0.01, max_lr=1.0, num_lrs=3,
                      steps_per_lr=10, refine=0, update_attr=False)
    assert FailingMLP.calls[0] >= at  # it failed inside the sweep
    torch_draw, python_draw, numpy_draw = draws()
    assert torch.equal(torch_draw, expected[0])
    assert python_draw == expected[1]
    assert numpy_draw == expected[2]
    assert torch.equal(generator.get_state(), loader_state)


def test_gradient_accumulation_sweeps_like_the_larger_batch():
    """Two batches of 16 accumulated into one step give the sweep of one batch of 32 (same samples, same order):
    Lightning divides each loss by ``accumulate_grad_batches``, and so must the sweep."""
    data = random_classification()

    def sweep(batch_size, accumulate):
        L.seed_everything(0, verbose=False)
        trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=accumulate)
        return find_chaos_lr(trainer, DropoutMLP(dropout=0.0), train_dataloaders=DataLoader(data, batch_size=batch_size),
                             min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=12, refine=0, update_attr=False)

    accumulated, large, small = sweep(16, 2), sweep(32, 1), sweep(16, 1)
    torch.testing.assert_close(accumulated.loss_ratio, large.loss_ratio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(accumulated.exponents, large.exponents, rtol=1e-3, atol=5e-5)
    assert not torch.allclose(small.loss_ratio, large.loss_ratio, rtol=1e-3)  # the batch size matters here


_SEEN: list[float] = []


class RecordBatches(DropoutMLP):
    def training_step(self, batch, batch_idx):
        _SEEN.append(batch[0][0, 0].item())  # the batch's first feature: which batch it is
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("limit", "allowed"), [(2, 2), (0.5, 3)])
def test_the_sweep_cycles_through_the_batches_limit_train_batches_allows(limit, allowed):
    _SEEN.clear()
    L.seed_everything(0, verbose=False)
    find_chaos_lr(quiet_trainer(max_epochs=1, limit_train_batches=limit), RecordBatches(),
                  train_dataloaders=DataLoader(random_classification(), batch_size=16),  # 6 batches
                  min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, refine=0, update_attr=False)
    assert len(set(_SEEN)) == allowed


_DRAWS: list[tuple[int, float]] = []


class NumpyDrawMLP(DropoutMLP):
    def training_step(self, batch, batch_idx):
        import numpy as np

        _DRAWS.append((batch_idx, float(np.random.rand())))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("vectorize", [False, True])
def test_numpy_draws_in_training_step_change_every_step_and_are_the_same_for_every_candidate(
    vectorize, classification_loader
):
    _DRAWS.clear()
    L.seed_everything(0, verbose=False)
    find_chaos_lr(quiet_trainer(max_epochs=1), NumpyDrawMLP(), train_dataloaders=classification_loader,
                  min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, refine=0, update_attr=False, vectorize=vectorize)
    by_step: dict[int, set[float]] = {}
    for batch_idx, value in _DRAWS:
        by_step.setdefault(batch_idx, set()).add(value)
    assert sorted(by_step) == list(range(10))
    assert all(len(values) == 1 for values in by_step.values())  # every η, reference and shadow drew the same
    assert len({values.pop() for values in by_step.values()}) == 10  # a new draw at every step


class RecordLR(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]


def test_callback_sets_the_suggestion_on_model_and_optimizer():
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=15, refine=1)
    record = RecordLR()
    model, trainer = _fit_dropout_mlp([finder, record], max_epochs=1)
    suggestion = finder.result.suggestion
    assert suggestion is not None
    assert model.lr == suggestion
    assert record.lrs == [pytest.approx(suggestion)]


def test_a_probe_listed_before_the_finder_records_the_learning_rate_the_finder_set():
    probe = ChaosProbe(num_shadows=1)
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0)
    _fit_dropout_mlp([probe, finder], max_epochs=1)
    assert finder.result.suggestion is not None and finder.result.suggestion != pytest.approx(0.2)
    assert probe._hparams["lr"] == pytest.approx(finder.result.suggestion)


def test_a_resumed_fit_keeps_the_checkpoints_learning_rate_and_does_not_sweep(tmp_path):
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0)
    model, trainer = _fit_dropout_mlp([finder], max_epochs=1)
    found = finder.result.suggestion
    assert found is not None and found != pytest.approx(0.2)
    trainer.save_checkpoint(tmp_path / "found.ckpt")

    again, record = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0), RecordLR()
    L.seed_everything(11, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[again, record]).fit(
        DropoutMLP(), DataLoader(random_classification(), batch_size=16, shuffle=True), ckpt_path=tmp_path / "found.ckpt")
    assert again.result is None
    assert record.lrs == [pytest.approx(found)]


class WarmupMLP(DropoutMLP):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()  # DropoutMLP's SGD with momentum, no schedule
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, 0.1 + step / 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class PlateauMLP(DropoutMLP):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


def test_schedulers_report_the_learning_rate_the_finder_set():
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=1)
    result = find_chaos_lr(trainer, PlateauMLP(), train_dataloaders=DataLoader(random_classification(), batch_size=16),
                           min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0)
    assert result.suggestion is not None
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [pytest.approx(result.suggestion)]


class WarmupThenCosineMLP(DropoutMLP):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_sequential_schedule_continues_from_the_learning_rate_the_finder_set():
    finder, record = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0), RecordPeakLR()
    L.seed_everything(11, verbose=False)
    quiet_trainer(max_steps=6, callbacks=[finder, record]).fit(
        WarmupThenCosineMLP(dropout=0.0), DataLoader(random_classification(), batch_size=16))
    suggestion = finder.result.suggestion
    assert suggestion is not None and suggestion != pytest.approx(0.2)
    # warm-up from half the LR, then the cosine from the full LR: every step at or below the suggestion, near it
    assert record.lrs[0] == pytest.approx(0.5 * suggestion)
    assert max(record.lrs) <= suggestion * (1 + 1e-9) and record.lrs[2] == pytest.approx(suggestion, rel=0.05)


def test_limit_train_batches_zero_skips_the_training_but_not_the_sweep():
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0)
    L.seed_everything(11, verbose=False)
    quiet_trainer(max_epochs=1, limit_train_batches=0, callbacks=[finder]).fit(
        DropoutMLP(), DataLoader(random_classification(), batch_size=16))
    assert finder.result is not None and len(finder.result.lrs) == 5


def test_a_warm_up_does_not_scale_the_swept_learning_rates():
    """At fit start a warm-up has the optimizer at 0.1 × the LR the user set; each η must still train at η."""

    def sweep(model_class):
        L.seed_everything(0, verbose=False)
        trainer = quiet_trainer(max_epochs=1)
        return find_chaos_lr(trainer, model_class(dropout=0.0), train_dataloaders=DataLoader(random_classification(),
                             batch_size=16), min_lr=0.01, max_lr=10.0, num_lrs=4, steps_per_lr=10, refine=0)

    warm, plain = sweep(WarmupMLP), sweep(DropoutMLP)
    assert torch.equal(warm.loss_ratio, plain.loss_ratio) and torch.equal(warm.learning, plain.learning)
    assert warm.suggestion == plain.suggestion


class OneCycleMLP(DropoutMLP):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=12)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class RecordPeakLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_suggestion_becomes_the_peak_of_a_one_cycle_schedule():
    """configure_optimizers ran before the sweep: the schedule's anchors must move with the LR, or OneCycleLR would
    climb back to the old max_lr."""
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=10, refine=0)
    record = RecordPeakLR()
    L.seed_everything(11, verbose=False)
    model = OneCycleMLP(dropout=0.0, lr=0.2)
    quiet_trainer(max_steps=12, callbacks=[finder, record]).fit(
        model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    assert finder.result.suggestion is not None and finder.result.suggestion != pytest.approx(0.2)
    assert max(record.lrs) == pytest.approx(finder.result.suggestion, rel=0.05)  # the cycle peaks mid-run
    assert record.lrs[0] == pytest.approx(finder.result.suggestion / 25)  # OneCycleLR's default div_factor


def test_find_chaos_lr_writes_the_attribute_and_leaves_the_trainer_ready():
    L.seed_everything(5, verbose=False)
    model = DropoutMLP(dropout=0.0)
    before = parameters_of(model)
    rng = torch.get_rng_state()
    trainer = quiet_trainer(max_epochs=1)
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True)
    result = find_chaos_lr(trainer, model, train_dataloaders=loader, min_lr=0.01, max_lr=100.0, num_lrs=5,
                           steps_per_lr=15, refine=0)
    assert result.suggestion is not None and model.lr == result.suggestion
    assert all(torch.equal(a, b) for a, b in zip(before, parameters_of(model)))
    assert torch.equal(rng, torch.get_rng_state())
    assert trainer.global_step == 0
    assert not any(isinstance(cb, ChaosLRFinder) for cb in trainer.callbacks)
    trainer.fit(model, loader)  # the same trainer then trains at the suggestion
    assert trainer.global_step == 6


def test_digits_suggestion_lies_between_stable_and_divergent_learning_rates():
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    model = MLPClassifier(hidden=(64,), lr=0.1)
    result = find_chaos_lr(quiet_trainer(max_epochs=1), model, datamodule=DigitsDataModule(batch_size=64),
                           min_lr=0.01, max_lr=20.0, num_lrs=6, steps_per_lr=60, refine=2)
    assert result.suggestion is not None
    stable = result.lrs[result.learning & (result.exponents * result.steps_per_lr < 1)]
    divergent = result.lrs[~result.learning & (result.lrs > result.suggestion)]
    assert len(stable) and len(divergent)
    assert stable.min() < result.suggestion < divergent.min()
    assert result.learning[result.lrs <= result.suggestion][-1]


class MyAdam(torch.optim.Adam):
    """A user's subclass: still adaptive."""


@pytest.mark.parametrize(
    ("optimizer", "margin", "anchor", "expected"),
    [
        ("sgd", "auto", "trainability", 1.5),
        ("adam", "auto", "trainability", 2.0),
        ("my_adam", "auto", "trainability", 2.0),
        ("rmsprop", "auto", "trainability", 2.0),
        ("adam", 2.5, "trainability", 2.5),  # a number the user gives is used as given
        ("sgd", 3.0, "onset", 3.0),
    ],
)
def test_auto_margin_steps_back_further_under_an_adaptive_optimizer(optimizer, margin, anchor, expected, caplog):
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "my_adam": MyAdam, "rmsprop": torch.optim.RMSprop}

    class Model(OffsetQuadratic):
        def configure_optimizers(self):
            return classes[optimizer](self.parameters(), lr=self.lr)

    model = Model(EIGENVALUES, lr=0.1, offset=0.5)
    with caplog.at_level(logging.INFO):
        result = find_chaos_lr(
            quiet_trainer(max_steps=10, precision="64-true"), model, train_dataloaders=dummy_loader(40),
            min_lr=0.01, max_lr=20.0, num_lrs=10, steps_per_lr=40, margin=margin, anchor=anchor,
        )
    assert result.margin == expected
    assert any(f"{expected:g}x below it" in record.getMessage() for record in caplog.records)  # the summary line
    edge = result.trainability_edge if anchor == "trainability" else result.onset
    assert edge is not None and result.suggestion == pytest.approx(edge / expected, rel=1e-12)
    assert model.lr == result.suggestion


def _digits_sweep(model_class, vectorize, anchor="trainability", min_lr=0.01, max_lr=20.0):
    from lightning_chaos.demo import DigitsDataModule

    L.seed_everything(0, verbose=False)
    return find_chaos_lr(quiet_trainer(max_epochs=1), model_class(hidden=(32,), dropout=0.1, lr=0.1),
                         datamodule=DigitsDataModule(batch_size=64), min_lr=min_lr, max_lr=max_lr, num_lrs=5,
                         steps_per_lr=30, refine=1, update_attr=False, vectorize=vectorize, anchor=anchor)


@pytest.mark.parametrize("anchor", ["trainability", "onset"])
def test_stacked_and_one_at_a_time_sweeps_agree_on_real_digits(anchor):
    """All candidates in one vmap per step (dropout replayed) give the exponents of the candidates run in turn."""
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import MLPClassifier

    stacked = _digits_sweep(MLPClassifier, True, anchor=anchor)
    sequential = _digits_sweep(MLPClassifier, False, anchor=anchor)
    assert stacked.anchor == sequential.anchor == anchor
    assert stacked.suggestion == pytest.approx(sequential.suggestion)
    common = [lr for lr in sequential.lrs.tolist() if lr in stacked.lrs.tolist()]
    assert len(common) >= 4  # one at a time stops past the edge; stacked runs the whole coarse grid
    pick = lambda result: result.exponents[[result.lrs.tolist().index(lr) for lr in common]]  # noqa: E731
    torch.testing.assert_close(pick(stacked), pick(sequential), rtol=1e-3, atol=1e-6)


def test_stacked_optimizer_steps_adam_candidates_as_their_own_optimizers_would(caplog):
    """Under Adam the stacked sweep steps every candidate in one optimizer step (not one per candidate); its exponents
    and loss ratios are those of the candidates run one at a time wherever the network learns. (Where it fails, at
    η = 1 here, Λ ≈ 0.6 per step amplifies the two ways' different rounding, ~1 ulp per step, into another
    realisation of the chaotic trajectory: Λ there differed by 15 %, as between two runs on different hardware.)"""
    pytest.importorskip("sklearn")
    import lightning_chaos.sweep as sweep_module
    from lightning_chaos.demo import MLPClassifier

    class AdamMLP(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-4)

    steps = []
    original = sweep_module.StackedOptimizer.step

    def counting_step(self):
        steps.append(self.rows)
        original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module.StackedOptimizer, "step", counting_step)
        stacked = _digits_sweep(AdamMLP, True, min_lr=1e-4, max_lr=1.0)
    sequential = _digits_sweep(AdamMLP, False, min_lr=1e-4, max_lr=1.0)
    assert steps and steps[0] == 5 * 2  # every coarse candidate's reference and shadow in one step
    assert_sweeps_agree_where_learning(stacked, sequential, at_least=4)
    assert stacked.suggestion == pytest.approx(sequential.suggestion)


def test_the_onset_anchor_keeps_its_margin_under_adam_and_points_to_the_bands_top_over_2():
    """``margin="auto"`` changes only the step back from the top of the learning band: the onset anchor's 1.5 was
    chosen on SGD tasks, and under Adam the onset lies below the fastest η anyway (FINDER_RESULTS.md)."""
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import MLPClassifier

    class AdamMLP(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = _digits_sweep(AdamMLP, True, anchor="onset", min_lr=1e-4, max_lr=1.0)
    assert result.onset is not None and result.trainability_edge is not None
    assert result.margin == 1.5 and result.suggestion == pytest.approx(result.onset / 1.5, rel=1e-12)
    told = [str(w.message) for w in record if "learning band" in str(w.message)]
    assert len(told) == 1 and f"would suggest lr={result.trainability_edge / 2:.3g}" in told[0]


def test_diverged_candidates_leave_the_stack(monkeypatch):
    """The issue's "stop diverged candidates early" in the stacked sweep: after a divergence the remaining candidates
    train in a smaller vmap, and the exponents are those of the candidates run one at a time."""
    pytest.importorskip("sklearn")
    import lightning_chaos.sweep as sweep_module
    from lightning_chaos.demo import MLPClassifier

    sizes = []

    class RecordingStack(sweep_module.StackedShadows):
        def __init__(self, shadows, *args, **kwargs):
            sizes.append(len(shadows))
            super().__init__(shadows, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "StackedShadows", RecordingStack)
    stacked = _digits_sweep(MLPClassifier, True)
    sequential = _digits_sweep(MLPClassifier, False)
    diverged = int((~torch.isfinite(stacked.loss_ratio) | (stacked.loss_ratio > 10)).sum())
    assert diverged >= 1
    # 5 coarse η x (reference + 1 shadow), shrinking as the largest η diverge, then the refinement's own stack (1 η)
    assert sizes[0] == 5 * 2 and sizes[-1] == 1 * 2
    assert len(sizes) > 2 and all(2 < size < 10 for size in sizes[1:-1]) and sizes[1:-1] == sorted(sizes[1:-1])[::-1]
    common = [lr for lr in sequential.lrs.tolist() if lr in stacked.lrs.tolist()]
    pick = lambda result: result.exponents[[result.lrs.tolist().index(lr) for lr in common]]  # noqa: E731
    torch.testing.assert_close(pick(stacked), pick(sequential), rtol=1e-3, atol=1e-6)  # the diverged ones too


def test_a_diverged_candidate_keeps_no_old_stack_alive(monkeypatch):
    """After restacks, the candidates' parameters hold only their own bytes, not the stacks they left."""
    pytest.importorskip("sklearn")
    import lightning_chaos.sweep as sweep_module
    from lightning_chaos.demo import MLPClassifier

    held = []
    train_grid = sweep_module.LRSweep._train_stacked

    def recording(self, candidates):
        train_grid(self, candidates)
        tensors = [p for c in candidates for m in c.reference.shadows + c.shadows.shadows for p in m.parameters()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        held.append((sum(storages.values()), sum(t.numel() * t.element_size() for t in tensors)))

    monkeypatch.setattr(sweep_module.LRSweep, "_train_stacked", recording)
    _digits_sweep(MLPClassifier, True)
    assert held and all(storage == own for storage, own in held), held


def test_a_stacked_step_frees_the_previous_steps_batched_gradients(monkeypatch):
    """No batched gradient of step t is alive while step t + 1 runs its forward and backward."""
    pytest.importorskip("sklearn")
    import weakref

    import lightning_chaos.sweep as sweep_module
    from lightning_chaos.demo import MLPClassifier

    previous: list[weakref.ref] = []
    alive_at_step: list[int] = []
    forward_backward = sweep_module.StackedShadows.forward_backward

    def recording(self, *args, **kwargs):
        alive_at_step.append(sum(ref() is not None for ref in previous))
        losses, grads = forward_backward(self, *args, **kwargs)
        previous[:] = [weakref.ref(grad) for grad in grads if grad is not None]
        return losses, grads

    monkeypatch.setattr(sweep_module.StackedShadows, "forward_backward", recording)
    _digits_sweep(MLPClassifier, True)
    assert len(alive_at_step) > 10 and previous
    assert alive_at_step == [0] * len(alive_at_step)


def test_a_training_step_vmap_cannot_run_falls_back_to_one_candidate_at_a_time(caplog):
    pytest.importorskip("sklearn")
    import logging

    from lightning_chaos.demo import MLPClassifier

    class ItemClassifier(MLPClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if math.isfinite(loss.item()):
                self.log("finite", loss)
            return loss

    with caplog.at_level(logging.INFO):
        fallen_back = _digits_sweep(ItemClassifier, True)
    assert any("one at a time from now on" in record.getMessage() for record in caplog.records)
    sequential = _digits_sweep(ItemClassifier, False)
    assert fallen_back.suggestion == sequential.suggestion


def _vertical_lines(ax):
    return {line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == 2 and
            line.get_xdata()[0] == line.get_xdata()[1]}


def test_plot_draws_without_a_display():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    _, result = _offset_quadratic_sweep(0.5, vectorize=True)
    figure = result.plot()
    ax, loss_ax = figure.axes[0], figure.axes[1]
    assert ax.get_xscale() == "log"
    assert len(ax.lines) >= 3
    # The lower panel shows what the default anchor reads: the loss ratio per η, the "learns well" threshold and the
    # band's top, the onset and the suggestion.
    assert loss_ax.get_yscale() == "log"
    x, y = loss_ax.lines[0].get_data()
    finite = torch.isfinite(result.loss_ratio)
    assert list(x) == result.lrs[finite].tolist() and list(y) == result.loss_ratio[finite].tolist()
    threshold = 1.25 * result.loss_ratio[result.learning].min().item()
    assert any(list(line.get_ydata()) == [threshold, threshold] for line in loss_ax.lines)
    assert {result.trainability_edge, result.suggestion, result.onset} <= _vertical_lines(loss_ax)
    labels = ax.get_legend_handles_labels()[1]
    assert f"suggestion {result.suggestion:.3g} (trainability / 1.5)" in labels  # the step back it took
    # Into a given axes, only the exponent panel.
    _, single = plt.subplots()
    assert result.plot(ax=single) is single.figure and len(single.figure.axes) == 2  # the Λ axes and its ρ twin
    plt.close("all")


def test_plot_copes_with_diverged_runs_and_a_sweep_that_learned_nothing():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    lrs = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    ratio = torch.tensor([0.9, 0.3, math.inf, math.nan], dtype=torch.float64)
    learned = torch.tensor([True, True, False, False])
    for loss_ratio, learning in ((ratio, learned), (ratio, torch.zeros(4, dtype=torch.bool)), (torch.empty(0), learned)):
        result = ChaosLRFinderResult(lrs=lrs, exponents=torch.tensor([-0.01, 0.0, 0.5, math.nan], dtype=torch.float64),
                                     sensitive_fraction=torch.tensor([0.0, 0.0, 1.0, 1.0]), learning=learning,
                                     suggestion=None, loss_ratio=loss_ratio, steps_per_lr=100)
        figure = result.plot()
        loss_ax = figure.axes[1]
        if loss_ratio.numel():
            x, _ = loss_ax.lines[0].get_data()
            assert list(x) == [0.01, 0.1]  # the diverged runs' inf and NaN are left out
        else:
            assert not loss_ax.lines  # nothing to draw, and no error
        assert not _vertical_lines(figure.axes[0])  # no onset, edge or suggestion to mark
    plt.close("all")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"min_lr": 1.0, "max_lr": 0.1}, "min_lr"),
        ({"min_lr": 0.0}, "min_lr"),
        ({"max_lr": -1.0}, "max_lr"),
        ({"num_lrs": 2}, "num_lrs"),
        ({"steps_per_lr": 3}, "steps_per_lr"),
        ({"num_inits": 0}, "num_inits"),
        ({"rule": "vibes"}, "rule"),
        ({"margin": 0.5}, "margin"),
        ({"margin": "adaptive"}, "margin"),
        ({"margin": None}, "margin"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"vectorize": 1}, "vectorize"),
        ({"anchor": "chaos"}, "anchor"),
        ({"margin": float("inf")}, "margin"),
        ({"seed": None}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"update_attr": "no"}, "update_attr"),
        ({"attr_name": 5}, "attr_name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ChaosLRFinder(**kwargs)


class NoLRAttribute(Quadratic):
    def __init__(self):
        super().__init__(EIGENVALUES, 0.1)
        del self.lr
        self.step_size = 0.1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.step_size)


def test_missing_lr_attribute_is_reported_before_any_training():
    model = NoLRAttribute()
    with pytest.raises(AttributeError, match="attr_name"):
        find_chaos_lr(quiet_trainer(max_steps=5), model, train_dataloaders=dummy_loader(5))
    result = find_chaos_lr(quiet_trainer(max_steps=5, precision="64-true"), model, train_dataloaders=dummy_loader(5),
                           attr_name="step_size", min_lr=0.01, max_lr=0.5, num_lrs=3, steps_per_lr=10, refine=0)
    assert len(result.lrs) == 3
    assert result.suggestion is None and result.lr_range is None  # it still learns well at max_lr: no top, no range


def test_onset_rules_on_hand_made_sweeps():
    exponents = torch.tensor([1e-5, 2e-4, 1e-3, 5e-3, 0.05, math.nan])
    assert chaotic_mask(exponents, steps=100).tolist() == [False, False, False, False, True, True]
    assert chaotic_mask(exponents, steps=100, rule="positive").tolist() == [True] * 6
    assert chaotic_mask(exponents, steps=100, rule="baseline").tolist() == [False, False, False, True, True, True]
    assert onset_index(torch.tensor([0.0, 0.2, 0.6, 1.0])) == 2
    lrs = torch.tensor([0.1, 0.2, 0.4, 0.8])
    rho = torch.tensor([0.0, 0.0, 0.0, 1.0])
    learning = torch.tensor([True, True, True, False])
    # Sensitive (Λ > 0) while learning just below the onset: an edge to approach.
    assert edge_of_chaos_suggestion(lrs, rho, learning, torch.tensor([0.0, 1e-3, 5e-3, 0.3]), margin=2)[0] == (
        pytest.approx(0.4)
    )
    # Contracting everywhere it learns: no edge, no suggestion.
    assert edge_of_chaos_suggestion(lrs, rho, learning, torch.tensor([-0.1, -0.2, -0.1, 0.3]))[0] is None
    assert edge_of_chaos_suggestion(lrs, torch.zeros(4), learning, torch.zeros(4))[2].startswith("no learning rate")
    assert "min_lr" in edge_of_chaos_suggestion(lrs, torch.ones(4), learning, torch.ones(4))[2]
    # Chaos on a loss plateau below every learning η: the edge is where learning fails above the (chaotic) band.
    plateau = edge_of_chaos_suggestion(
        torch.tensor([0.01, 0.1, 0.3, 1.0]), torch.ones(4), torch.tensor([False, True, True, False]), torch.ones(4),
        margin=1.5,
    )
    assert plateau[:2] == (pytest.approx(1.0 / 1.5), 1.0)
    assert "learned at no" in edge_of_chaos_suggestion(lrs, rho, torch.zeros(4, dtype=torch.bool), torch.ones(4))[2]


def test_probe_and_finder_together_the_shadows_follow_the_new_learning_rate():
    probe = ChaosProbe(epsilon=0.0, num_shadows=1, log_every_n_steps=1)  # listed first: clones before the sweep
    finder = ChaosLRFinder(min_lr=0.01, max_lr=100.0, num_lrs=5, steps_per_lr=15, refine=0)
    model, trainer = _fit_dropout_mlp([probe, finder], max_epochs=1)
    assert finder.result.suggestion is not None and model.lr == finder.result.suggestion
    assert (probe.distances == 0).all()
    assert probe._ensemble.optimizers[0].param_groups[0]["lr"] == pytest.approx(finder.result.suggestion)


def test_trainability_edge_is_the_largest_learning_rate_that_learns_well():
    lrs = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    learning = torch.tensor([True, True, True, False])
    # 0.35 is within 1.25x of the best ratio 0.3: the band's top is η = 1
    assert trainability_edge_suggestion(lrs, torch.tensor([0.9, 0.3, 0.35, math.nan]), learning) == (1 / 1.5, 1.0, "")
    # 0.5 still "learns" (< 0.95) but not well: the top is η = 0.1
    suggestion, edge, _ = trainability_edge_suggestion(lrs, torch.tensor([0.9, 0.3, 0.5, math.nan]), learning, margin=2)
    assert (suggestion, edge) == (0.05, 0.1)
    # learning well up to max_lr: no top inside the grid
    suggestion, edge, reason = trainability_edge_suggestion(lrs, torch.tensor([0.9, 0.5, 0.4, 0.3]), torch.ones(4) > 0)
    assert suggestion is None and edge == 10.0 and "larger `max_lr`" in reason
    suggestion, edge, reason = trainability_edge_suggestion(lrs, torch.ones(4), torch.zeros(4) > 0)
    assert suggestion is None and edge is None and "learned at no learning rate" in reason
    with pytest.raises(ValueError, match="`margin` and `tolerance` must be >= 1"):
        trainability_edge_suggestion(lrs, torch.ones(4), torch.ones(4) > 0, tolerance=0.8)


def test_the_learning_band_runs_from_the_smallest_to_the_largest_learning_rate_that_learns_well():
    lrs = torch.tensor([0.001, 0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    learning = torch.tensor([True, True, True, True, False])
    assert learning_band(lrs, torch.tensor([0.9, 0.36, 0.3, 0.35, math.nan]), learning) == (0.01, 1.0)
    # a hole inside the band does not cut it; a diverged η never counts, nor one that does not learn
    assert learning_band(lrs, torch.tensor([0.3, 0.9, 0.3, 0.3, 0.3]), learning) == (0.001, 1.0)
    assert learning_band(lrs, torch.tensor([0.3, 0.31, 0.32, 0.33, 0.2]), learning, tolerance=1.1) == (0.001, 1.0)
    assert learning_band(lrs, torch.ones(5), torch.zeros(5) > 0) is None
    with pytest.raises(ValueError, match="`tolerance` must be >= 1"):
        learning_band(lrs, torch.ones(5), learning, tolerance=0.5)


def test_learns_well_threshold_is_a_factor_above_a_positive_best_and_a_distance_above_a_negative_one():
    assert learns_well_threshold(0.2) == pytest.approx(0.25)
    assert learns_well_threshold(-0.4) == pytest.approx(-0.3)
    assert learns_well_threshold(0.0) == 0.0


def test_plot_of_a_loss_that_crossed_zero_keeps_every_eta_and_its_threshold():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    lrs = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    result = ChaosLRFinderResult(
        lrs=lrs, exponents=torch.tensor([0.001, 0.002, 0.2], dtype=torch.float64),
        sensitive_fraction=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), learning=torch.tensor([True, True, False]),
        suggestion=0.05, loss_ratio=torch.tensor([0.5, -0.4, 2.0], dtype=torch.float64),
    )
    loss_ax = next(a for a in result.plot().axes if a.get_ylabel().startswith("loss ratio"))
    assert loss_ax.get_yscale() == "symlog"  # a log axis would drop the negative ratio
    assert learns_well_threshold(-0.4) in [line.get_ydata()[0] for line in loss_ax.get_lines()]


def _relu_digits_sweep(anchor):
    from lightning_chaos.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    model = MLPClassifier(hidden=(32,), activation="relu", lr=0.1)
    result = find_chaos_lr(quiet_trainer(max_epochs=1), model, datamodule=DigitsDataModule(batch_size=64),
                           min_lr=0.01, max_lr=20.0, num_lrs=5, steps_per_lr=40, refine=2, anchor=anchor)
    return model, result


def test_the_onset_anchor_warns_when_the_top_of_the_learning_band_disagrees():
    pytest.importorskip("sklearn")
    with pytest.warns(UserWarning, match="lies above the top of the learning band") as record:
        _, result = _relu_digits_sweep("onset")
    assert result.suggestion > result.trainability_edge
    messages = [str(w.message) for w in record if "learning band" in str(w.message)]
    assert len(messages) == 1 and f"would suggest lr={result.trainability_edge / 1.5:.3g}" in messages[0]


def test_trainability_anchor_on_real_digits_refines_above_the_band_and_steps_back_from_its_top():
    pytest.importorskip("sklearn")
    model, result = _relu_digits_sweep("trainability")
    assert result.anchor == "trainability" and result.trainability_edge is not None
    assert result.suggestion == pytest.approx(result.trainability_edge / 1.5)
    assert model.lr == result.suggestion
    edge = result.lrs.tolist().index(result.trainability_edge)
    assert result.learning[edge] and edge + 1 < len(result.lrs)
    best = result.loss_ratio[result.learning].min()
    assert result.loss_ratio[edge] <= 1.25 * best
    assert not (result.learning[edge + 1] and result.loss_ratio[edge + 1] <= 1.25 * best)
    assert len(result.lrs) == 5 + 2  # refined between the top of the band and the next grid point


def test_an_optimizer_not_linear_in_the_lr_steps_per_candidate_and_says_why_once(caplog):
    """Rprop's step sizes depend on the LR it started with: the stack keeps one optimizer step per candidate (said once
    at info level, not at every restack), and the sweep matches the one-at-a-time sweep where the network learns."""
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import MLPClassifier

    class RpropMLP(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.Rprop(self.parameters(), lr=self.lr)

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        stacked = _digits_sweep(RpropMLP, True, min_lr=1e-4, max_lr=1.0)
    said = [r for r in caplog.records if "stepping the candidates' optimizers one at a time" in r.getMessage()]
    assert len(said) == 1 and "Rprop" in said[0].getMessage()
    sequential = _digits_sweep(RpropMLP, False, min_lr=1e-4, max_lr=1.0)
    common = [lr for lr in sequential.lrs[sequential.learning].tolist() if lr in stacked.lrs.tolist()]
    assert common
    pick = lambda result, values: values[[result.lrs.tolist().index(lr) for lr in common]]  # noqa: E731
    torch.testing.assert_close(pick(stacked, stacked.loss_ratio), pick(sequential, sequential.loss_ratio),
                               rtol=1e-4, atol=1e-6)


def test_every_candidate_starts_from_the_state_a_fresh_optimizer_has():
    """Adagrad makes its accumulators when built (torch before 2.13 cannot step without them): a candidate's reset
    optimizer holds them at initial_accumulator_value, and nothing of the user's optimizer state."""
    from lightning_chaos.sweep import reset_state

    parameter = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adagrad([parameter], lr=0.1, initial_accumulator_value=0.7)
    parameter.grad = torch.full((3,), 2.0)
    optimizer.step()
    assert optimizer.state[parameter]["sum"][0] == pytest.approx(4.7)
    reset_state(optimizer)
    assert optimizer.state[parameter]["sum"].tolist() == pytest.approx([0.7] * 3)
    assert optimizer.state[parameter]["step"] == 0
    momentum = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
    momentum.step()
    reset_state(momentum)
    assert not momentum.state


class MaskedGradientMLP(DropoutMLP):
    """Zeroes the first layer's bias gradient in ``on_after_backward``: a hook the candidates must run on themselves."""

    calls = 0

    def on_after_backward(self):
        MaskedGradientMLP.calls += 1
        self.net[0].bias.grad.zero_()


def test_candidates_run_the_modules_own_hooks_one_at_a_time(caplog):
    MaskedGradientMLP.calls = 0
    model = MaskedGradientMLP(dropout=0.0)
    bias = model.net[0].bias.detach().clone()
    trainer = quiet_trainer(max_epochs=1)
    with caplog.at_level(logging.INFO):
        find_chaos_lr(trainer, model, train_dataloaders=DataLoader(random_classification(), batch_size=16),
                      min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, num_shadows=1, vectorize=True)
    assert "overrides on_after_backward" in caplog.text  # a stack cannot run the hook per candidate
    assert MaskedGradientMLP.calls >= 3 * 2 * 10  # every candidate (reference and shadow) at every step
    torch.testing.assert_close(model.net[0].bias, bias, rtol=0, atol=0)  # the real model: untouched by the sweep


@pytest.mark.parametrize("optimizer", ["lbfgs", "schedule-free"])
def test_closure_and_mode_optimizers_are_swept_without_error(optimizer):
    schedulefree = pytest.importorskip("schedulefree") if optimizer == "schedule-free" else None

    class Model(DropoutMLP):
        def configure_optimizers(self):
            if schedulefree is not None:  # starts in eval mode: its step refuses to run until .train()
                return schedulefree.SGDScheduleFree(self.parameters(), lr=self.lr)
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=2)

    result = find_chaos_lr(quiet_trainer(max_epochs=1), Model(dropout=0.0),
                           train_dataloaders=DataLoader(random_classification(), batch_size=16),
                           min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, num_shadows=1)
    assert len(result.lrs) >= 3 and torch.isfinite(torch.as_tensor(result.exponents)).any()


@pytest.mark.parametrize("name", ["prodigy", "dadaptation"])
def test_an_optimizer_that_estimates_its_step_size_is_swept_by_its_multiplier_and_says_so(name, caplog):
    """Prodigy's and D-Adaptation's ``lr`` multiplies the step size d they estimate: the sweep scales that multiplier
    (each candidate's ``lr`` is its η, and d is estimated afresh per candidate), and the result and the log say so."""
    package = pytest.importorskip("prodigyopt" if name == "prodigy" else "dadaptation")
    build = package.Prodigy if name == "prodigy" else package.DAdaptAdam
    seen: list[tuple[float, float]] = []

    class Model(DropoutMLP):
        def configure_optimizers(self):
            return build(self.parameters(), lr=self.lr)

    import lightning_chaos.sweep as sweep_module

    step = sweep_module.Candidate.step

    def recording(self, *args, **kwargs):
        group = self.reference.optimizers[0].param_groups[0]
        seen.append((group["lr"], group["d"]))
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr(sweep_module.Candidate, "step", recording)
        result = find_chaos_lr(quiet_trainer(max_epochs=1), Model(dropout=0.0, lr=1.0),
                               train_dataloaders=DataLoader(random_classification(), batch_size=16),
                               min_lr=0.01, max_lr=10.0, num_lrs=3, steps_per_lr=10, refine=0)
    assert result.swept.startswith(f"the `lr` of {build.__name__}, a multiplier") and "estimates" in result.swept
    assert result.suggestion is None or "(swept: the `lr` of" in caplog.text
    assert sorted({lr for lr, _ in seen}) == pytest.approx(result.lrs.tolist())  # the multipliers themselves
    middle = sorted({lr for lr, _ in seen})[1]
    estimates = [d for lr, d in seen if lr == middle]
    assert len(estimates) == 10 and estimates[-1] > 10 * estimates[0]  # each candidate estimates its own d afresh


def test_a_plain_optimizer_sweeps_the_learning_rate():
    result = find_chaos_lr(quiet_trainer(max_epochs=1), DropoutMLP(dropout=0.0),
                           train_dataloaders=DataLoader(random_classification(), batch_size=16),
                           min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, refine=0)
    assert result.swept == "the learning rate"


class StaleHyperparameter(DropoutMLP):
    """``self.lr`` trains (SGD reads it), but ``hparams.lr`` holds another value, which Lightning's attribute lookup
    reads and writes (the last holder)."""

    def __init__(self):
        super().__init__(lr=0.05, dropout=0.0)
        self.save_hyperparameters({"lr": 2.0})


def test_copies_of_the_lr_attribute_that_disagree_are_named_in_a_warning(caplog):
    loader = DataLoader(random_classification(), batch_size=16)
    with pytest.warns(UserWarning, match=r"`lr` has different values \(StaleHyperparameter 0\.05, AttributeDict 2\)"):
        find_chaos_lr(quiet_trainer(max_epochs=1), StaleHyperparameter(), train_dataloaders=loader, min_lr=0.01,
                      max_lr=1.0, num_lrs=3, steps_per_lr=10, refine=0)
    # an optimizer that trains at a multiple of the attribute is swept in proportion: said at info level only
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        find_chaos_lr(quiet_trainer(max_epochs=1), DropoutMLP(optimizer="adam", dropout=0.0), train_dataloaders=loader,
                      min_lr=0.01, max_lr=1.0, num_lrs=3, steps_per_lr=10, refine=0)
    assert not [w for w in record if "different values" in str(w.message)]
    assert "`lr` is 0.2 and the optimizer's first param group trains at 0.01" in caplog.text


def test_the_speed_band_is_the_learning_rates_that_reach_the_level_within_a_quarter_more_steps():
    """Hand-made loss curves: 1 until step k, then 0. The level is 90 % of the way from 1 to the best end (0), 0.1;
    the 5-step running mean falls below it at step k + 4. The fewest steps are 10, so the band is s ≤ 1.25·10 + 1."""
    lrs = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float64)
    losses = torch.ones(6, 60, dtype=torch.float64)
    for row, k in enumerate((36, 6, 8, 26, 2, 3)):
        losses[row, k:] = 0.0
    losses[5, 40:] = math.nan  # stopped: out, however fast it was
    learning = torch.tensor([True, True, True, True, False, True])  # η = 3 reached it first but did not learn
    assert speed_band_top(lrs, losses, learning) == 0.3  # steps 40, 10, 12, 30: the band is {0.1, 0.3}
    assert speed_band_top(lrs, losses, learning, tolerance=3.0) == 1.0  # 30 ≤ 3·10 + 1
    assert speed_band_top(lrs, losses, torch.zeros(6) > 0) is None
    with pytest.raises(ValueError, match="`level` must be in"):
        speed_band_top(lrs, losses, learning, level=1.5)


def test_on_the_quadratic_the_edge_is_the_lower_of_the_end_bands_and_the_exact_speed_bands_tops():
    model, result = _offset_quadratic_sweep(0.5, vectorize=True)
    exact = torch.stack([_exact_losses(model, lr, 40) for lr in result.lrs.tolist()])
    exact[~torch.isfinite(result.losses)] = math.nan  # the diverged runs stopped where the sweep's did
    assert result.speed_edge == speed_band_top(result.lrs, exact, result.learning)
    end_top = learning_band(result.lrs, result.loss_ratio, result.learning)[1]
    assert result.trainability_edge == min(end_top, result.speed_edge)


def test_on_an_easy_real_task_the_speed_band_pulls_the_suggestion_below_the_end_bands_top():
    """sklearn's wine (178 samples, standardised), a 13-32-3 tanh MLP under SGD: every η from about 0.01 to 3 ends the
    100-step window low, so the end band's top is 3.16, ten times the fastest η. How fast the loss falls tells them
    apart: the speed band's top is 1, and the suggestion 1/1.5."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)

    class WineMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lr = 0.1
            self.net = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 3))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    L.seed_everything(0, verbose=False)
    loader = DataLoader(torch.utils.data.TensorDataset(x, torch.tensor(y)), batch_size=16, shuffle=True)
    result = find_chaos_lr(quiet_trainer(max_epochs=1), WineMLP(), train_dataloaders=loader)
    end_top = learning_band(result.lrs, result.loss_ratio, result.learning)[1]
    assert end_top >= 3 and result.speed_edge == pytest.approx(1.0)
    assert result.trainability_edge == result.speed_edge and result.suggestion == pytest.approx(1 / 1.5)
