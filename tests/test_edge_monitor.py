"""EdgeOfChaosMonitor on real data (scikit-learn's digits, 64 pixels): what it records, that it equals the estimators on
the same weights and inputs, that it logs, and that the training is the same with and without it."""

import math

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos import ChaosProbe, EdgeOfChaosMonitor
from lightning_chaos.functional import (
    asymptotic_jacobian_norm,
    edge_of_chaos_boundary,
    map_lyapunov_exponent,
    order_parameters,
)

SMALL = dict(num_inputs=12, steps=40, transient=10)


def digits(n=256):
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n]))


class Paper2(L.LightningModule):
    """Zhang et al. 2021's model in small: a square tanh layer without bias (J starts at 0.5), then a readout; SGD with
    momentum. ``functional=True`` applies tanh as a function, which a forward hook cannot see."""

    def __init__(self, functional=False, dropout=0.0, lr=0.2):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(64, 64, bias=False)
        nn.init.normal_(self.hidden.weight, std=0.5 / 64**0.5)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(64, 10)
        self.functional = functional
        self.lr = lr

    def forward(self, x):
        h = self.hidden(x)
        h = torch.tanh(h) if self.functional else self.act(h)
        return self.out(self.drop(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)


class Paper1(L.LightningModule):
    """Feng et al. 2019's square map in small: 64-32-64-10 with ReLU; F = input → the third layer's activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(model, callbacks=(), epochs=2, seed=0, shuffle=False, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(digits(), batch_size=32, shuffle=shuffle)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


def test_records_at_fit_start_and_every_epoch_with_the_papers_quantities():
    monitor = EdgeOfChaosMonitor(**SMALL)
    fit(Paper2(), [monitor], epochs=3)
    assert list(monitor.history) == ["hidden"]  # the readout is not square
    record = monitor.history["hidden"]
    assert set(record) == {"epoch", "step", "J0", "J", "J_c", "edge_distance", "lyapunov", "jacobian_norm"}
    assert record["epoch"] == [0.0, 1.0, 2.0, 3.0]
    assert record["step"] == [0.0, 8.0, 16.0, 24.0]  # 256 samples in batches of 32
    assert record["J"][0] == pytest.approx(0.5, rel=0.05)
    assert record["J_c"] == [1.0] * 4  # |J0/J| < 1 with tanh
    assert all(d == pytest.approx(math.log(j)) for d, j in zip(record["edge_distance"], record["J"]))
    assert record["J"][-1] > record["J"][0]  # SGD grows J (Zhang et al.: J² ≈ 0.25 + A·t)
    assert all(math.isfinite(v) for q in ("lyapunov", "jacobian_norm") for v in record[q])


def test_every_n_epochs():
    monitor = EdgeOfChaosMonitor(every_n_epochs=2, **SMALL)
    fit(Paper2(), [monitor], epochs=5)
    assert monitor.history["hidden"]["epoch"] == [0.0, 2.0, 4.0]


def test_the_first_record_is_the_estimators_on_the_initial_weights_and_the_first_batch():
    model = Paper2()
    weight = model.hidden.weight.detach().clone()
    inputs = digits().tensors[0][: SMALL["num_inputs"]]  # unshuffled: the first batch's first rows

    def layer_map(x):
        return torch.tanh(weight @ x)

    monitor = EdgeOfChaosMonitor(**SMALL)
    fit(model, [monitor], epochs=1)
    record = {quantity: values[0] for quantity, values in monitor.history["hidden"].items()}
    j0, j = order_parameters(weight)
    assert (record["J0"], record["J"]) == (j0, j)
    assert record["J_c"] == edge_of_chaos_boundary(j0 / j)
    steps, transient = SMALL["steps"], SMALL["transient"]
    assert record["lyapunov"] == pytest.approx(map_lyapunov_exponent(layer_map, inputs, steps, transient), rel=1e-5)
    assert record["jacobian_norm"] == pytest.approx(asymptotic_jacobian_norm(layer_map, inputs, steps), rel=1e-5)


def snapshot(trainer):
    module = trainer.lightning_module
    return (
        {k: v.detach().clone() for k, v in module.state_dict().items()},
        trainer.optimizers[0].state_dict(),
        torch.rand(4),  # the torch stream right after fit
        {k: v.clone() for k, v in trainer.callback_metrics.items()},
    )


def assert_identical(a, b):
    weights_a, optimizer_a, rng_a, metrics_a = a
    weights_b, optimizer_b, rng_b, metrics_b = b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a, state_b = optimizer_a["state"], optimizer_b["state"]
    assert all(torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]) for i in state_a)
    assert torch.equal(rng_a, rng_b)
    assert metrics_a.keys() == metrics_b.keys() and all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)


def test_observation_never_perturbs():
    """Dropout draws from the torch stream and the data is shuffled: any draw of the monitor's would show."""
    plain = snapshot(fit(Paper2(dropout=0.3), epochs=2, shuffle=True))
    monitor = EdgeOfChaosMonitor(maps={"hidden_map": lambda m, x: m.act(m.hidden(m.drop(x)))}, **SMALL)
    observed = snapshot(fit(Paper2(dropout=0.3), [monitor], epochs=2, shuffle=True))
    assert_identical(observed, plain)
    assert len(monitor.history["hidden"]["J"]) == 3 and len(monitor.history["hidden_map"]["lyapunov"]) == 3


def test_beside_chaos_probe_whose_sentinel_stays_exact():
    """The capture hooks are global, not per-module: a per-module hook would be deep-copied into the shadows."""
    probe = ChaosProbe(epsilon=0.0, num_shadows=1, vectorize=False, sentinel_steps=4)
    monitor = EdgeOfChaosMonitor(**SMALL)
    fit(Paper2(dropout=0.3), [monitor, probe], epochs=2, shuffle=True)
    assert probe.trusted is True
    assert probe.distances.abs().max().item() == 0.0
    assert len(monitor.history["hidden"]["J"]) == 3


def test_a_named_square_subnetwork_as_seed_paper_1_builds_it():
    monitor = EdgeOfChaosMonitor(maps={"F": lambda m, x: m.net[:4](x)}, **SMALL)
    fit(Paper1(), [monitor], epochs=2)
    assert list(monitor.history) == ["F"]  # the 64-wide Linear is followed by ReLU but is 32 → 64, not square
    record = monitor.history["F"]
    assert all(math.isnan(v) for v in record["J"])
    assert len(record["jacobian_norm"]) == 3 and all(math.isfinite(v) and v >= 0 for v in record["jacobian_norm"])


def test_a_functional_activation_is_skipped_unless_named(caplog):
    with pytest.warns(UserWarning, match="no square nn.Linear followed by an activation module"):
        monitor = EdgeOfChaosMonitor(**SMALL)
        fit(Paper2(functional=True), [monitor], epochs=1)
    assert monitor.history == {}
    named = EdgeOfChaosMonitor(layers={"hidden": "tanh"}, **SMALL)
    fit(Paper2(functional=True), [named], epochs=1)
    assert named.history["hidden"]["J_c"] == [1.0, 1.0]


def test_metrics_and_the_phase_diagram_reach_the_loggers(tmp_path):
    monitor = EdgeOfChaosMonitor(**SMALL)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    fit(Paper2(), [monitor], epochs=1, logger=loggers, log_every_n_steps=1)
    import csv

    rows = list(csv.DictReader(open(loggers[0].log_dir + "/metrics.csv")))
    logged = [(int(r["step"]), float(r["chaos/edge/hidden/J"])) for r in rows if r.get("chaos/edge/hidden/J")]
    assert logged == [(0, monitor.history["hidden"]["J"][0]), (8, monitor.history["hidden"]["J"][1])]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(loggers[1].log_dir, size_guidance={"images": 0}).Reload()
    assert "chaos/edge/phase_diagram" in events.Tags()["images"]
    assert [e.step for e in events.Images("chaos/edge/phase_diagram")] == [0, 8]
    assert "chaos/edge/hidden/edge_distance" in events.Tags()["scalars"]


def test_history_survives_a_checkpoint(tmp_path):
    monitor = EdgeOfChaosMonitor(**SMALL)
    trainer = fit(Paper2(), [monitor], epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    path = trainer.checkpoint_callback.best_model_path
    resumed = EdgeOfChaosMonitor(**SMALL)
    fit(Paper2(), [resumed], epochs=2, ckpt_path=path, enable_checkpointing=True, default_root_dir=tmp_path)
    first = monitor.history["hidden"]
    second = resumed.history["hidden"]
    assert second["J"][:2] == first["J"][:2]
    assert second["epoch"] == [0.0, 1.0, 1.0, 2.0]  # the resumed fit records its own start, then epoch 2


def test_plot_draws_the_boundary_and_each_path():
    monitor = EdgeOfChaosMonitor(**SMALL)
    fit(Paper2(), [monitor], epochs=2)
    figure = monitor.plot()
    ax = figure.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "edge of chaos (tanh, mean field)" in labels and "hidden" in labels
    path = next(line for line in ax.get_lines() if line.get_label() == "hidden")
    assert path.get_ydata().tolist() == pytest.approx([1 / j for j in monitor.history["hidden"]["J"]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layers="hidden"), "`layers` must be None, a non-empty list"),
        (dict(layers={"hidden": "gelu"}), "`layers\\['hidden'\\]` must be 'tanh', 'relu' or a callable"),
        (dict(maps={"F": 3}), "`maps` must be a mapping from names to callables"),
        (dict(every_n_epochs=0), "`every_n_epochs` must be an int >= 1"),
        (dict(num_inputs=2.5), "`num_inputs` must be an int >= 1"),
        (dict(steps=10, transient=10), "`transient` must be an int with 0 <= transient < steps"),
        (dict(log_figure="yes"), "`log_figure` must be True or False"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EdgeOfChaosMonitor(**kwargs)


def test_a_named_layer_that_is_not_square_is_refused_at_fit_start():
    with pytest.raises(ValueError, match="`layers` names 'out', which must be a square nn.Linear"):
        fit(Paper2(), [EdgeOfChaosMonitor(layers=["out"])], epochs=1)


def test_a_map_that_is_not_square_is_refused_at_the_first_batch():
    with pytest.raises(ValueError, match="`maps`: 'F' must map inputs of shape \\(1, 64\\) to the same shape"):
        fit(Paper1(), [EdgeOfChaosMonitor(maps={"F": lambda m, x: m.net[:2](x)}, **SMALL)], epochs=1)


def test_a_fault_inside_a_record_leaves_training_alone():
    class Faulty(EdgeOfChaosMonitor):
        def _iterated(self, fn, inputs):
            raise RuntimeError("boom")

    plain = snapshot(fit(Paper2(), epochs=2))
    with pytest.warns(UserWarning, match="EdgeOfChaosMonitor: recording failed .*boom.* continues unaffected"):
        observed = snapshot(fit(Paper2(), [Faulty(**SMALL)], epochs=2))
    assert_identical(observed, plain)


def test_an_epoch_cut_short_by_max_steps_is_labelled_by_its_fraction():
    monitor = EdgeOfChaosMonitor(**SMALL)
    fit(Paper2(), [monitor], epochs=3, max_steps=12)  # 8 steps per epoch: the second epoch ends after 4 of 8
    assert monitor.history["hidden"]["epoch"] == [0.0, 1.0, 1.5]
    assert monitor.history["hidden"]["step"] == [0.0, 8.0, 12.0]
