"""TangentProbe on modules it did not write: a Hugging Face BERT (SDPA attention and hidden dropout, AdamW),
Lightning's LSTM demo (a hidden state kept across batches, gradient clipping), a max-norm constraint in a hook and a
``configure_gradient_clipping`` that clips with its own value.
Each fit is bit-identical with and without the probe, and the replayed gradient matches the real one (``trusted``),
or the probe says why not.

The cases are the suite's own, so the README's setups table (the ChaosProbe's) does not grow."""

import math

import pytest
from harness import assert_same_training, fit, plain_run
from lightning_chaos import TangentProbe
from test_batched import CASES as BATCHED_CASES
from test_callbacks import CASES as CALLBACK_CASES
from test_compile import CASES as COMPILE_CASES
from test_module_hooks import CASES as HOOK_CASES
from test_optimizers import CASES as OPTIMIZER_CASES
from test_transformers import CASES as TRANSFORMER_CASES

BERT = next(case for case in TRANSFORMER_CASES if "Bert" in case.name)
GPT2 = next(case for case in TRANSFORMER_CASES if "eager" in case.name)
LSTM_DEMO = next(case for case in HOOK_CASES if case.name == "LightningLSTM-demo")
MAX_NORM = next(case for case in HOOK_CASES if case.name == "on_train_batch_end-max-norm")
OWN_CLIPPING = next(case for case in HOOK_CASES if case.name == "configure_gradient_clipping-own-value")


def test_bert_with_dropout_and_adamw():
    probe = TangentProbe(num_exponents=2, sharpness=True, sharpness_every=2)
    run = fit(BERT, callbacks=[probe])
    assert_same_training(run, plain_run(BERT))
    assert probe.trusted, run.warned("TangentProbe")  # the replay drew the real dropout masks
    assert probe.spectrum_history.shape[0] == run.trainer.global_step - 1  # Adam: from its second step
    assert all(math.isfinite(v) for v in probe.lyapunov_spectrum.tolist()) and probe.sharpness > 0


def test_gpt2_eager_attention():
    probe = TangentProbe(num_exponents=1)
    run = fit(GPT2, callbacks=[probe])
    assert_same_training(run, plain_run(GPT2))
    assert probe.trusted, run.warned("TangentProbe")


@pytest.mark.parametrize("case, said", [
    # the demo carries its LSTM's hidden state from batch to batch: a variable of the training map the tangents do not
    # follow; the replay check catches it at the first step
    (LSTM_DEMO, "TangentProbe: at step 0 .* UNTRUSTED"),
    # the module renormalises its weights in on_train_batch_end, after the optimizer's step: said from the step after
    (MAX_NORM, "TangentProbe: before step 2 the parameters changed after the optimizer's step.*UNTRUSTED"),
    # the module clips in configure_gradient_clipping with its own value while the Trainer has none (not refused
    # upfront: such an override may clip nothing): the optimizer steps with gradients the tangents did not
    (OWN_CLIPPING, "TangentProbe: at step 1 the optimizer stepped with other gradients.*UNTRUSTED"),
], ids=lambda value: getattr(value, "name", ""))
def test_a_step_the_tangents_do_not_follow_is_said(case, said):
    """Training untouched, the results marked untrusted, and why said."""
    probe = TangentProbe(num_exponents=1)
    run = fit(case, callbacks=[probe])
    assert_same_training(run, plain_run(case))
    assert probe.trusted is False
    assert run.warned(said)


# -- every setup of the compat suite ---------------------------------------------------------------------------------

# What TangentProbe does on each of the ChaosProbe's setups that the tests above do not take one by one: refuses it
# (it linearises SGD, Adam and AdamW only, and not an overridden configure_gradient_clipping), stops where the
# trainable set changes, says the results cannot be trusted, or follows it (trusted); anything else fails.
REFUSED = {"schedulefree-AdamWScheduleFree+validation", "schedulefree-SGDScheduleFree+validation", "LBFGS-closure",
           "LBFGS-closure+dropout", "prodigyopt-Prodigy", "dadaptation-DAdaptAdam", "pytorch_optimizer-Lion",
           "pytorch_optimizer-Ranger", "pytorch_optimizer-AdaBelief", "configure_gradient_clipping-docstring"}
STOPPED = {"BackboneFinetuning-unfreeze-at-epoch-1"}
UNTRUSTED = {"on_after_backward-gradient-mask", "batched-state-in-a-plain-attribute", "batched-LightningLSTM-demo"}
TAKEN_ONE_BY_ONE = {case.name for case in (BERT, GPT2, LSTM_DEMO, MAX_NORM, OWN_CLIPPING)}
EVERY_OTHER_CASE = {case.name: case for cases in (OPTIMIZER_CASES, CALLBACK_CASES, HOOK_CASES, TRANSFORMER_CASES,
                                                   COMPILE_CASES, BATCHED_CASES)
                    for case in cases if case.name not in TAKEN_ONE_BY_ONE}


@pytest.mark.parametrize("name", sorted(EVERY_OTHER_CASE))
def test_every_setup_is_followed_refused_or_said(name):
    case = EVERY_OTHER_CASE[name]
    probe = TangentProbe(num_exponents=2)
    run = fit(case, callbacks=[probe])
    assert_same_training(run, plain_run(case))
    if name in REFUSED:
        assert run.warned("TangentProbe: .* not supported.* the probe is off") and probe.spectrum_history.shape[0] == 0
    elif name in STOPPED:
        assert run.warned("TangentProbe: the set of trainable parameters changed") and probe.trusted
    elif name in UNTRUSTED:
        assert probe.trusted is False and run.warned("TangentProbe: .*UNTRUSTED")
    else:
        assert probe.trusted and not run.warned("TangentProbe"), run.warned("TangentProbe")
    if name not in REFUSED:
        assert probe.spectrum_history.shape[0] > 0 and all(math.isfinite(v) for v in probe.lyapunov_spectrum.tolist())
