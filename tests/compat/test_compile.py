"""``torch.compile``: a compiled LightningModule passed to ``trainer.fit`` (Lightning's documented way), with and
without gradient accumulation, and a module with a compiled submodule.

Lightning's ``from_compiled`` stores the compiled ``training_step`` and ``forward`` as instance attributes bound to the
real module: a plain deep copy would run the real module on the real parameters. The shadows run eagerly, so against
a compiled real model they agree to float rounding, except with ``backend="eager"`` (Dynamo tracing only), which is
exact.

Found on torch 2.13 + Lightning 2.6.6: ``self.log`` inside a compiled ``training_step`` fails in Dynamo
(``InternalTorchDynamoError: 'method' object has no attribute '__dict__'``, from ``inspect.getfullargspec`` on the
compiled ``training_step``), so these modules log from ``on_train_batch_end``.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from harness import (
    MLP,
    Case,
    assert_probe_healthy,
    assert_refused,
    assert_untrusted_is_said,
    assert_zero_epsilon_agreement,
    check_observation_never_perturbs,
    check_zero_epsilon_shadow_is_the_real_model,
    fit,
    loaders,
)
from lightning_chaos import ChaosProbe

ROUNDING = (1e-5, 1e-6)  # rtol, atol: a compiled real model against its eager shadows


class LogsOutsideTheStep(MLP):
    """Logs its loss from ``on_train_batch_end``: ``self.log`` inside a compiled ``training_step`` breaks Dynamo."""

    def __init__(self, dropout=0.1):
        super().__init__(log=False, dropout=dropout)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train_loss", outputs["loss"])


class CompiledSubmodule(LogsOutsideTheStep):
    """The module stays eager; its ``net`` is ``torch.compile(nn.Sequential(...))``."""

    def __init__(self, backend="inductor", dropout=0.0):
        super().__init__()
        self.net = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)),
                                 backend=backend)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def compiled(backend, dropout=0.1):
    return lambda: torch.compile(LogsOutsideTheStep(dropout), backend=backend)


FAMILY = "torch.compile"
EAGER_SHADOWS = "The shadows run eagerly: they agree with the compiled model to rounding."

CASES = [
    Case("compile-module-eager-backend", compiled("eager"), loaders, status="works",
         setup='`torch.compile(module, backend="eager")`',
         note='The shadows run eagerly: bit for bit with `backend="eager"` (Dynamo tracing only).'),
    Case("compile-module-aot_eager-accumulate-2", compiled("aot_eager"), loaders,
         trainer={"accumulate_grad_batches": 2}, tolerance=ROUNDING, status="works with a note", note=EAGER_SHADOWS,
         setup='`torch.compile(module, backend="aot_eager")` + `accumulate_grad_batches=2`'),
    Case("compile-module-inductor", compiled("inductor", dropout=0.0), loaders, tolerance=ROUNDING,
         status="works with a note", note=EAGER_SHADOWS, setup="`torch.compile(module)` (inductor), no dropout"),
    Case("compile-module-inductor-accumulate-2", compiled("inductor", dropout=0.0), loaders,
         trainer={"accumulate_grad_batches": 2}, tolerance=ROUNDING, status="works with a note", note=EAGER_SHADOWS,
         setup="`torch.compile(module)` (inductor), no dropout, + `accumulate_grad_batches=2`"),
    # four shadows: the batched path, under which a compiled submodule would recompile and the real one round otherwise
    Case("compile-submodule-inductor-batched", CompiledSubmodule, loaders, tolerance=ROUNDING,
         probe={"num_shadows": 4}, status="works with a note",
         note="The shadows run eagerly, batched: they agree with the compiled model to rounding.",
         setup="a module with a `torch.compile(nn.Sequential(...))` submodule (inductor), 4 shadows, batched"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (Dynamo's per-code-object cache limit would otherwise fill up across cases and
    fall back to eager without saying so)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()



def test_zero_epsilon_batched_shadows_of_a_compiled_submodule_follow_the_real_model():
    """The batched path (four shadows) against a module with a compiled submodule: the real model must not recompile
    into another rounding, and the shadows must follow it to float rounding."""
    check_zero_epsilon_shadow_is_the_real_model(CASES[-1], num_shadows=4, vectorize="auto")


# Inductor draws dropout masks its own way (a seed taken from the torch stream, then its own generator; unless
# torch._inductor.config.fallback_random): the same RNG state gives an eager shadow other masks than the compiled real
# model. The probe must follow the compiled masks or say that it cannot.
INDUCTOR_DROPOUT = Case(
    "compile-module-inductor-dropout", compiled("inductor", dropout=0.1), loaders, tolerance=ROUNDING,
    status="refused with reason", setup="`torch.compile(module)` (inductor) with dropout",
    note="Inductor draws its own dropout masks, which the eager shadows cannot repeat: the sentinel flags the probe"
         " untrusted, with a warning.",
)


def test_inductor_dropout_observation_never_perturbs():
    check_observation_never_perturbs(INDUCTOR_DROPOUT, require_trusted=False)


def test_inductor_dropout_is_followed_or_refused():
    run = fit(INDUCTOR_DROPOUT, ChaosProbe(epsilon=0.0, num_shadows=1, vectorize=False, log_every_n_steps=1))
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    if run.probe.trusted:
        assert_zero_epsilon_agreement(run, ROUNDING)
    else:
        assert_refused(run, r"UNTRUSTED|untrusted|cannot|dropout|random")
