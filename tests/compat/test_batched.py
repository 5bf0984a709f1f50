"""The batched path (``num_shadows=4``, default ``vectorize="auto"``: one ``vmap`` over the stacked shadows) against
modules that keep a tensor in a plain attribute inside ``training_step`` (a recurrent state carried from batch to batch).

Under ``vmap`` that attribute would receive a batched tensor that outlives the transform: the probe must neither crash
(and disable itself) nor let the shadows share, leak or lose their state. At ε = 0 the four shadows follow the real
model to float rounding (a batched kernel may sum in another order), or exactly where the probe fell back to one at a
time.
"""

import pytest
import torch
from torch.nn import functional as F

from harness import (
    MLP,
    Case,
    TinyLightningLSTM,
    assert_trusted,
    assert_zero_epsilon_agreement,
    check_observation_never_perturbs,
    check_shadow_is_an_independent_run,
    fit,
    loaders,
)
from lightning_chaos import ChaosProbe

ROUNDING = (1e-5, 1e-6)


class CarriesState(MLP):
    """Keeps the first layer's (detached) activations of the last batch in ``self.state`` and feeds them into the next
    step, like a truncated-BPTT hidden state (across epochs too: the LSTM demo case resets its state per epoch)."""

    def __init__(self):
        super().__init__()
        self.state = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.net[0](x)
        if self.state is not None:
            hidden = hidden + 0.5 * self.state
        self.state = torch.tanh(hidden).detach()
        logits = self.net[3](self.net[2](torch.tanh(hidden)))
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss


FAMILY = "Batched path (4 shadows), state in a plain attribute"

CASES = [
    Case("batched-state-in-a-plain-attribute", CarriesState, loaders, probe={"num_shadows": 4}, tolerance=ROUNDING,
         status="works with a note",
         setup="`training_step` keeps a tensor in `self.state` and reuses it the next step, 4 shadows",
         note="vmap cannot batch a step that keeps a tensor in a plain attribute: the shadows fall back to one at a"
              " time, each with its own state (asserted to rounding)."),
    Case("batched-LightningLSTM-demo", TinyLightningLSTM, dict, trainer={"gradient_clip_val": 0.25},
         probe={"num_shadows": 4}, tolerance=ROUNDING, status="works with a note",
         setup="Lightning's LSTM demo (above) with 4 shadows",
         note="vmap has no batching rule for `nn.LSTM`: the shadows fall back to one at a time (asserted to"
              " rounding)."),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_observation_never_perturbs(case):
    check_observation_never_perturbs(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zero_epsilon_batched_shadows_follow_the_real_model(case):
    run = fit(case, ChaosProbe(epsilon=0.0, num_shadows=4, log_every_n_steps=1))  # vectorize="auto": batched
    assert_trusted(run)
    assert_zero_epsilon_agreement(run, case.tolerance)
    if isinstance(run.module, CarriesState):
        # each shadow kept its own state, a plain tensor (no batched tensor escaped the transform), the real one's
        for shadow in run.probe.shadow_modules:
            assert shadow.state is not run.module.state
            assert type(shadow.state) is torch.Tensor and not torch._C._functorch.is_batchedtensor(shadow.state)
            torch.testing.assert_close(shadow.state, run.module.state, rtol=ROUNDING[0], atol=ROUNDING[1])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batched_shadow_is_an_independent_run(case):
    check_shadow_is_an_independent_run(case, num_shadows=1, vectorize=True)
