"""Vectorised shadows (one torch.func.vmap over stacked parameters) agree with shadows stepped one at a time."""

import logging
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import DropoutMLP, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe
from lightning_chaos.vectorized import NotVectorizable, _DropoutOnCudaGuard, vectorization_blocker
from test_probe_exactness import SETUPS, fit


def probed_distances(setup, vectorize, **probe_kwargs):
    probe = ChaosProbe(num_shadows=3, log_every_n_steps=1, vectorize=vectorize, **probe_kwargs)
    model, trainer = fit(setup, callbacks=[probe], precision="64-true")
    assert probe._ensemble.vectorized is vectorize
    return probe, model


@pytest.mark.parametrize("name", list(SETUPS))
def test_vectorized_and_sequential_shadows_agree(name):
    """Dropout replay, schedulers, clipping, accumulation, momentum and Adam: the same d(t) either way."""
    batched, _ = probed_distances(SETUPS[name], True, renormalize_every=3)
    sequential, _ = probed_distances(SETUPS[name], False, renormalize_every=3)
    # A shadow with another dropout mask would be off by O(d) at once, not by float64 rounding.
    torch.testing.assert_close(batched.distances, sequential.distances, rtol=1e-9, atol=0)
    torch.testing.assert_close(batched.running_exponents, sequential.running_exponents, rtol=1e-9, atol=0)


def test_vectorized_shadows_at_zero_epsilon_follow_the_real_model_to_rounding():
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, log_every_n_steps=1)
    model, _ = fit(SETUPS["dropout+momentum"], callbacks=[probe])
    assert probe._ensemble.vectorized
    scale = torch.linalg.vector_norm(torch.cat([p.flatten() for p in model.parameters()])).item()
    assert probe.distances.max().item() < 1e-6 * scale  # float32 rounding of a batched kernel, never a mask apart


def test_vectorized_shadows_are_views_of_one_stacked_tensor_and_train_apart():
    probe, model = probed_distances(SETUPS["adam+accumulate-2+clip"], True)
    stacked = probe._ensemble.stacked
    first_name = next(iter(stacked.parameters))
    rows = stacked.parameters[first_name]
    assert rows.shape[0] == 3
    for k, shadow in enumerate(probe._ensemble.shadows):
        parameter = shadow.get_parameter(first_name)
        assert parameter.data_ptr() == rows[k].data_ptr()
        assert torch.equal(parameter, rows[k])
    assert (probe.distances[-1] > 0).all()
    assert not torch.equal(rows[0], rows[1])


class BatchNormMLP(L.LightningModule):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def fit_batch_norm(vectorize, momentum=0.1):
    L.seed_everything(3, verbose=False)
    model = BatchNormMLP(momentum)
    probe = ChaosProbe(num_shadows=2, log_every_n_steps=1, vectorize=vectorize)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe], precision="64-true")
    trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    return probe


def test_batch_norm_running_statistics_are_batched_too():
    batched, sequential = fit_batch_norm(True), fit_batch_norm(False)
    assert batched._ensemble.vectorized
    torch.testing.assert_close(batched.distances, sequential.distances, rtol=1e-9, atol=0)
    for a, b in zip(batched._ensemble.shadows, sequential._ensemble.shadows):
        norm_a, norm_b = a.net[1], b.net[1]
        torch.testing.assert_close(norm_a.running_mean, norm_b.running_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm_a.running_var, norm_b.running_var, rtol=1e-9, atol=1e-12)
        assert norm_a.num_batches_tracked.item() == norm_b.num_batches_tracked.item() == 12


def test_cumulative_batch_norm_runs_sequentially_and_says_why(caplog):
    with caplog.at_level(logging.INFO):
        probe = fit_batch_norm(True, momentum=None)
    assert not probe._ensemble.vectorized
    assert "momentum=None" in probe._ensemble.sequential_reason
    assert sum("one at a time" in record.getMessage() for record in caplog.records) == 1


class ItemMLP(DropoutMLP):
    """Reads a loss value on the host inside training_step, which vmap cannot batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if math.isfinite(loss.item()):
            self.log("finite_loss", loss)
        return loss


def test_a_training_step_that_cannot_be_batched_falls_back_once_to_the_exact_sequential_path(caplog):
    """``.item()`` in training_step fails under vmap: the first batched step is redone one shadow at a time, and from
    then on the run is the sequential one, bit for bit."""

    def run(vectorize):
        L.seed_everything(5, verbose=False)
        model = ItemMLP()
        probe = ChaosProbe(num_shadows=2, log_every_n_steps=1, vectorize=vectorize)
        trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
        trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
        return probe

    with caplog.at_level(logging.INFO):
        fallen_back = run(True)
    sequential = run(False)
    assert not fallen_back._ensemble.vectorized
    assert "vectorised step failed" in fallen_back._ensemble.sequential_reason
    assert sum("one at a time" in record.getMessage() for record in caplog.records) == 1
    assert torch.equal(fallen_back.distances, sequential.distances)


class WideLinear(DropoutMLP):
    def __init__(self):
        super().__init__(dropout=0.0)
        self.net = nn.Sequential(nn.Linear(8, 1000), nn.Linear(1000, 1000), nn.Linear(1000, 3))  # 1.01 M parameters


def test_auto_leaves_models_over_a_million_parameters_sequential():
    probe = ChaosProbe(num_shadows=4)
    quiet_trainer(max_steps=1, callbacks=[probe]).fit(WideLinear(), DataLoader(random_classification(), batch_size=16))
    assert not probe._ensemble.vectorized
    forced = ChaosProbe(num_shadows=4, vectorize=True)
    quiet_trainer(max_steps=1, callbacks=[forced]).fit(WideLinear(), DataLoader(random_classification(), batch_size=16))
    assert forced._ensemble.vectorized


def test_auto_batches_from_four_shadows_on():
    probes = [ChaosProbe(num_shadows=k, seed=k) for k in (1, 2, 3, 4, 8)]
    assert all(probe.vectorize == "auto" for probe in probes)
    fit(SETUPS["dropout+momentum"], callbacks=probes, max_epochs=1)
    assert [probe._ensemble.vectorized for probe in probes] == [False, False, False, True, True]


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_vectorize_must_be_auto_or_a_bool(value):
    with pytest.raises(ValueError, match="`vectorize` must be one of"):
        ChaosProbe(vectorize=value)


def test_dropout_blocks_batching_on_cuda_only():
    model = DropoutMLP()
    assert vectorization_blocker(model, torch.device("cpu")) is None
    assert "net.2 is a dropout on CUDA" in vectorization_blocker(model, torch.device("cuda"))
    assert vectorization_blocker(DropoutMLP(dropout=0.0), torch.device("cuda")) is None


def test_an_attention_dropout_is_refused_under_the_first_batched_step():
    """Fused attention draws its dropout its own way: the guard of the first batched step refuses it on any device."""
    query = torch.randn(1, 4, 8)
    with _DropoutOnCudaGuard():
        nn.functional.scaled_dot_product_attention(query, query, query)  # no dropout: fine
        nn.functional.dropout(query, 0.5, True)  # CPU dropout: replayed exactly under vmap
        with pytest.raises(NotVectorizable, match="dropout_p=0.1"):
            nn.functional.scaled_dot_product_attention(query, query, query, dropout_p=0.1)


class DropoutConvNet(L.LightningModule):
    """Convolutions with Dropout2d, AlphaDropout and a functional dropout: every dropout kind vmap must replay."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout2d(0.3), nn.Flatten(), nn.AlphaDropout(0.2), nn.Linear(144, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(nn.functional.dropout(self.net(x), 0.2), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_batched_convolutions_replay_every_dropout_kind_on_the_cpu():
    def run(vectorize):
        L.seed_everything(0, verbose=False)
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        probe = ChaosProbe(num_shadows=3, vectorize=vectorize, log_every_n_steps=1)
        quiet_trainer(max_epochs=2, callbacks=[probe], precision="64-true").fit(
            DropoutConvNet(), DataLoader(data, batch_size=16, shuffle=True)
        )
        assert probe._ensemble.vectorized is vectorize
        return probe.distances

    torch.testing.assert_close(run(True), run(False), rtol=1e-9, atol=0)


class EmaMLP(DropoutMLP):
    """Reassigns a buffer in training_step, which functional_call would silently undo after a batched step."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.register_buffer("ema", torch.ones(3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.ema = 0.9 * self.ema + 0.1 * self.net(x).detach().mean(0)
        return nn.functional.cross_entropy(self.net(x) + self.ema, y)


def test_a_reassigned_buffer_falls_back_to_the_exact_sequential_path():
    def run(vectorize):
        L.seed_everything(2, verbose=False)
        probe = ChaosProbe(num_shadows=2, log_every_n_steps=1, vectorize=vectorize)
        quiet_trainer(max_epochs=1, callbacks=[probe], precision="64-true").fit(
            EmaMLP(), DataLoader(random_classification(), batch_size=16)
        )
        return probe

    fallen_back, sequential = run(True), run(False)
    assert "reassigns 'ema'" in fallen_back._ensemble.sequential_reason
    assert torch.equal(fallen_back.distances, sequential.distances)
    for a, b in zip(fallen_back._ensemble.shadows, sequential._ensemble.shadows):
        assert torch.equal(a.ema, b.ema)


def test_a_retired_shadow_holds_no_view_of_the_batched_gradients():
    from lightning_chaos.shadow import Perturbation, ShadowEnsemble

    model = DropoutMLP(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ensemble = ShadowEnsemble(model, optimizer, 2, Perturbation(1e-3), vectorize=True)
    grads = [torch.ones(2, *p.shape) for p in ensemble.real_params]
    ensemble.take_gradients(grads, [0, 1], zero_grad=True)
    ensemble.take_gradients(grads, [0, 1], zero_grad=True, alive=[True, False])
    assert all(p.grad is not None and p.grad._base is g for p, g in zip(ensemble.shadow_params[0], grads))
    assert all(p.grad is None for p in ensemble.shadow_params[1])


def test_convolutions_on_cuda_with_tf32_allowed_are_not_batched_for_the_probe():
    """The batched (grouped) convolution would round differently from the real model's TF32 one; the finder,
    which stacks its references too, can batch them in full precision instead."""
    model = DropoutConvNet()
    model.net[2].p = 0.0
    model.net[4].p = 0.0
    cuda = torch.device("cuda")
    allowed = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert "TF32 allowed" in vectorization_blocker(model, cuda)
        assert vectorization_blocker(model, cuda, stacks_the_reference=True) is None
        torch.backends.cudnn.allow_tf32 = False
        assert vectorization_blocker(model, cuda) is None
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
    assert vectorization_blocker(model, torch.device("cpu")) is None


class _TransposedDropout(DropoutMLP):
    """Dropout on a non-contiguous view (as attention code often has): a CPU dropout fills its mask in memory
    order, so a batched copy with another layout would draw another mask from the same RNG state."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = nn.functional.dropout(self.net[0](x).t(), 0.3, training=True).t()
        return nn.functional.cross_entropy(self.net[3](torch.tanh(hidden)), y)


class _CarriedState(DropoutMLP):
    """Keeps a tensor in a plain attribute from one training_step to the next (a recurrent hidden state)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        if getattr(self, "memory", None) is not None and self.memory.shape[0] == x.shape[0]:
            x = x + 0.1 * self.memory
        out = self.net(x)
        self.memory = out.detach()[:, :1].expand(-1, 8).clone()
        return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("module", [_TransposedDropout, _CarriedState])
def test_what_the_batched_path_cannot_replay_falls_back_before_it_drifts(module, caplog):
    L.seed_everything(3, verbose=False)
    model = module()
    probe = ChaosProbe(epsilon=0.0, num_shadows=4, vectorize=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
    with caplog.at_level(logging.INFO):
        trainer.fit(model, DataLoader(random_classification(), batch_size=16, shuffle=True))
    assert not probe._ensemble.vectorized and "vectorised step failed" in probe._ensemble.sequential_reason
    assert not probe._disabled and probe.trusted
    assert (probe.distances == 0).all()  # one at a time from the first step: bit-identical, never a mask apart
    for a, b in zip(model.parameters(), probe.shadow_modules[0].parameters()):
        assert torch.equal(a, b)
