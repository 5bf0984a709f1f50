"""EdgeOfChaosMonitor on modules it did not write: a Hugging Face BERT (whose pooler is a square ``Linear`` + ``Tanh``),
a ``torch.compile``d module, Lightning's LSTM demo (no square layer). Each fit is bit-identical with and without the
monitor (property 1 of the compatibility suite), and the monitor records what it should or says why it cannot.

The cases are the suite's own (or built inside a test, so the README's setups table, which lists the ChaosProbe's
cases, does not grow)."""

import math

import pytest
import torch
from harness import MLP, Case, assert_same_training, fit, loaders, plain_run
from test_module_hooks import CASES as HOOK_CASES
from test_transformers import CASES as TRANSFORMER_CASES
from torch import nn
from torch.nn import functional as F

from lightning_chaos import EdgeOfChaosMonitor

SMALL = dict(num_inputs=8, steps=30, transient=5)
BERT = next(case for case in TRANSFORMER_CASES if "Bert" in case.name)
LSTM_DEMO = next(case for case in HOOK_CASES if case.name == "LightningLSTM-demo")


def test_bert_pooler_is_found_and_training_is_untouched():
    monitor = EdgeOfChaosMonitor(**SMALL)
    run = fit(BERT, callbacks=[monitor])
    assert_same_training(run, plain_run(BERT))
    # the only square Linear followed by an activation module: query/key/value are followed by other Linears
    assert list(monitor.history) == ["model.bert.pooler.dense"]
    record = monitor.history["model.bert.pooler.dense"]
    assert len(record["J"]) == 1 + run.trainer.current_epoch
    assert all(math.isfinite(record[q][-1]) for q in ("J0", "J", "J_c", "lyapunov", "jacobian_norm"))


def test_a_named_layer_without_an_activation_is_the_linear_map():
    name = "model.bert.encoder.layer.0.attention.output.dense"  # square, followed by dropout and a LayerNorm
    monitor = EdgeOfChaosMonitor(layers=[name], **SMALL)
    run = fit(BERT, callbacks=[monitor])
    assert_same_training(run, plain_run(BERT))
    record = monitor.history[name]
    assert math.isnan(record["J_c"][0])  # no mean-field edge for the identity
    assert math.isfinite(record["lyapunov"][0])


def test_lightning_lstm_demo_has_nothing_to_record_and_says_so():
    monitor = EdgeOfChaosMonitor(**SMALL)
    run = fit(LSTM_DEMO, callbacks=[monitor])
    assert run.warned("EdgeOfChaosMonitor: .* has no square nn.Linear followed by an activation module")
    assert monitor.history == {}
    assert_same_training(run, plain_run(LSTM_DEMO))


class SquareTanh(MLP):
    """8 → 8 (tanh) → 3; logs outside ``training_step``, which a compiled step cannot do."""

    def __init__(self):
        super().__init__(log=False)
        self.net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_compiled_module(backend):
    case = Case(f"edge-compiled-{backend}", lambda: torch.compile(SquareTanh(), backend=backend), loaders,
                status="works")
    monitor = EdgeOfChaosMonitor(**SMALL)
    run = fit(case, callbacks=[monitor])
    assert_same_training(run, fit(case))
    assert len(monitor.history["net.0"]["J"]) == 1 + run.trainer.current_epoch
