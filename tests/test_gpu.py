"""CUDA checks: exact lockstep on the GPU in every precision. Skipped where no GPU is present (CI never has one)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import (
    DropoutMLP,
    assert_sweeps_agree_where_learning,
    parameters_of,
    quiet_trainer,
    random_classification,
)
from lightning_chaos import ChaosProbe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fit_on_gpu(callbacks, precision, **model_kwargs):
    L.seed_everything(21, verbose=False)
    model = DropoutMLP(**model_kwargs)
    trainer = quiet_trainer(
        accelerator="cuda", max_epochs=2, callbacks=callbacks, precision=precision, gradient_clip_val=0.5,
        accumulate_grad_batches=2,
    )
    trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    return model


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "64-true"])
def test_zero_epsilon_bit_identical_on_cuda(precision):
    probe = ChaosProbe(epsilon=0.0, num_shadows=2, log_every_n_steps=1, vectorize=False)
    reference = fit_on_gpu([], precision, scheduler="step")
    model = fit_on_gpu([probe], precision, scheduler="step")
    assert (probe.distances == 0).all()
    assert next(probe._ensemble.shadows[0].parameters()).device.type == "cuda"
    for a, b in zip(parameters_of(reference), parameters_of(model)):
        assert torch.equal(a, b)


def test_probe_measures_on_cuda_with_a_positive_epsilon():
    probe = ChaosProbe(num_shadows=2, renormalize_every=2)
    fit_on_gpu([probe], "16-mixed", lr=2.0)
    assert probe.distances.shape[1] == 2
    assert torch.isfinite(probe.local_exponents).all()


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "64-true"])
def test_vectorized_shadows_agree_with_sequential_ones_on_cuda(precision):
    # In 16-bit autocast a batched kernel's rounding (about 1e-3 of each activation) is as large as the effect of a
    # 1e-4 perturbation: there a larger epsilon keeps the comparison about the dynamics, not the rounding.
    half = precision in ("16-mixed", "bf16-mixed")
    runs = {}
    for vectorize in (False, True):
        probe = ChaosProbe(epsilon=1e-2 if half else 1e-4, num_shadows=4, log_every_n_steps=1, vectorize=vectorize)
        fit_on_gpu([probe], precision, scheduler="step", dropout=0.0)
        assert probe._ensemble.vectorized is vectorize
        runs[vectorize] = probe.distances
    rtol = {"64-true": 1e-9, "32-true": 1e-4}.get(precision, 0.1)
    torch.testing.assert_close(runs[True], runs[False], rtol=rtol, atol=0)


def test_dropout_on_cuda_runs_the_shadows_one_at_a_time():
    """A batched dropout on CUDA would draw other masks than the real model's fused kernel: sequential, exactly."""
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, log_every_n_steps=1)
    fit_on_gpu([probe], "32-true")
    assert not probe._ensemble.vectorized
    assert "dropout on CUDA" in probe._ensemble.sequential_reason
    assert (probe.distances == 0).all()


class SmallConvNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x.view(-1, 1, 4, 2).repeat(1, 1, 3, 4)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def test_batched_convolutions_on_cuda_follow_the_tf32_setting():
    """With TF32 allowed (PyTorch's default for cuDNN) the real model's convolutions round in TF32 and a batched,
    grouped convolution would round differently: the probe runs the shadows one at a time. With TF32 off both paths
    agree to float32 tolerance."""

    def run(vectorize):
        L.seed_everything(4, verbose=False)
        probe = ChaosProbe(num_shadows=4, log_every_n_steps=1, vectorize=vectorize)
        trainer = quiet_trainer(accelerator="cuda", max_epochs=2, callbacks=[probe])
        trainer.fit(SmallConvNet(), DataLoader(random_classification(), batch_size=16, shuffle=True))
        return probe

    assert torch.backends.cudnn.allow_tf32
    assert "TF32" in run(True)._ensemble.sequential_reason
    torch.backends.cudnn.allow_tf32 = False
    try:
        batched, sequential = run(True), run(False)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert batched._ensemble.vectorized
    # float32 summation order at lr 0.5 with momentum over 12 steps
    torch.testing.assert_close(batched.distances, sequential.distances, rtol=2e-3, atol=0)


def _digits_sweep_on_cuda(model, vectorize, **kwargs):
    from lightning_chaos import ChaosLRFinder
    from lightning_chaos.demo import DigitsDataModule

    L.seed_everything(0, verbose=False)
    finder = ChaosLRFinder(num_lrs=5, steps_per_lr=30, refine=1, update_attr=False, vectorize=vectorize, **kwargs)
    trainer = quiet_trainer(accelerator="cuda", max_epochs=1, callbacks=[finder], limit_train_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return finder


def test_finder_batches_dropout_on_cuda_with_one_mask_for_every_row():
    """The finder compares nothing outside its stack, so a dropout on CUDA is batched: every row draws the same mask.
    Were the masks different, dropout noise would part each shadow from its reference at once and every η would read
    chaotic; at the smallest η the separation grows by less than one e-fold."""
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import MLPClassifier

    L.seed_everything(0, verbose=False)
    finder = _digits_sweep_on_cuda(MLPClassifier(hidden=(32,), dropout=0.2, lr=0.1), True, min_lr=1e-3, max_lr=20.0)
    assert finder._stack  # no fallback to one at a time
    result = finder.result
    assert result.exponents[0] * result.steps_per_lr < 1
    assert result.suggestion is not None


def test_stacked_adam_sweep_on_cuda_agrees_with_one_at_a_time_where_it_learns():
    pytest.importorskip("sklearn")
    from lightning_chaos.demo import MLPClassifier

    class AdamMLP(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    def sweep(vectorize):
        L.seed_everything(0, verbose=False)
        return _digits_sweep_on_cuda(AdamMLP(hidden=(32,), lr=0.01), vectorize, min_lr=1e-4, max_lr=1.0).result

    stacked, sequential = sweep(True), sweep(False)
    assert_sweeps_agree_where_learning(stacked, sequential, at_least=3)
