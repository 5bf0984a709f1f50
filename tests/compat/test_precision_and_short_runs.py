"""Precision and short runs.

* ``precision="bf16-mixed"`` on the CPU: bf16's rounding (2^-8 ≈ 4e-3 relative) is far above the default relative
  ε = 1e-4, even though the master weights stay float32: the probe must say so in a warning that names the ε to use.
  With that ε, or at ε = 0, it works.
* ``precision="64-true"``: everything bit for bit.
* ``fast_dev_run=True``: one step, no exponent can be fitted: the probe says so once instead of returning NaN silently.
"""

import math
import re
import warnings

import pytest

from harness import (
    MLP,
    Case,
    assert_probe_healthy,
    assert_trusted,
    assert_untrusted_is_said,
    check_observation_never_perturbs,
    check_shadow_is_an_independent_run,
    check_zero_epsilon_shadow_is_the_real_model,
    fit,
    loaders,
)
from lightning_chaos import ChaosProbe

FAMILY = "Precision and short runs"
TOO_SHORT = "Warns that fitting an exponent needs d(t) at 4 points (3 optimizer steps)."

BF16 = Case("precision-bf16-mixed", MLP, loaders, trainer={"precision": "bf16-mixed"}, status="works with a note",
            setup='`precision="bf16-mixed"`',
            note="Warns that the default ε = 1e-4 is below bf16's rounding and names the ε to use (`epsilon=0.04`).")
FLOAT64 = Case("precision-64-true", MLP, loaders, trainer={"precision": "64-true"}, status="works",
               setup='`precision="64-true"`', note="The shadows are float64 too.")
FAST_DEV_RUN = Case("fast_dev_run", MLP, loaders, trainer={"fast_dev_run": True}, status="works with a note",
                    setup="`fast_dev_run=True`",
                    note="Warns once that one step is too few to fit an exponent (Λ is NaN); ε = 0 stays exact.")
# A window fit needs 4 recorded distances: a run of 2 or 3 steps has 3 or 4 (d(0) included).
SHORT_RUNS = [Case(f"max_steps={steps}", MLP, loaders, trainer={"max_steps": steps}, status="works with a note",
                   setup=f"`max_steps={steps}`", note=TOO_SHORT) for steps in (1, 2)]

BF16_WARNING = r"(?i)bf16|bfloat16"
NO_EXPONENT = r"(?i)\bexponents?\b"  # the word: not `probe.lyapunov_exponent` in the no-logger hint
DEFAULT_EPSILON = 1e-4


def suggested_epsilons(message, above):
    """The numbers written as an ε to use in ``message`` (``epsilon=0.05``, ``epsilon >= 5e-2``, ``ε of 0.05`` ...)
    that are larger than ``above``."""
    number = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
    found = re.findall(r"(?:epsilon|ε)\s*(?:=|>=|≥|>|of|to|at least|around|about|~)?\s*`?" + number, message)
    return [float(x) for x in found if float(x) > above]


# -- bf16-mixed -------------------------------------------------------------------------------------------------------


def test_bf16_observation_never_perturbs_even_when_refusing():
    check_observation_never_perturbs(BF16, ChaosProbe(num_shadows=2), require_trusted=False)


def test_bf16_default_epsilon_is_said_to_be_below_the_rounding_with_the_epsilon_to_use():
    """The shadows still repeat the training exactly (``trusted`` concerns that), but d(t) would measure bf16
    rounding: a warning must say so and name the ε to use."""
    run = fit(BF16, ChaosProbe(num_shadows=1))
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    messages = run.warned(BF16_WARNING)
    assert messages, f"no warning about bf16's rounding; got {run.warned('.')}"
    suggestions = [eps for message in messages for eps in suggested_epsilons(message, above=DEFAULT_EPSILON)]
    assert suggestions, f"the bf16 warning names no ε larger than {DEFAULT_EPSILON} to use: {messages}"

    # with the suggested ε the probe neither warns about bf16 nor refuses, and the real training is still untouched
    again = check_observation_never_perturbs(BF16, ChaosProbe(epsilon=max(suggestions), num_shadows=1))
    assert not again.warned(BF16_WARNING), again.warned(BF16_WARNING)


def test_bf16_zero_epsilon_shadow_is_the_real_model():
    check_zero_epsilon_shadow_is_the_real_model(BF16)


def test_bf16_shadow_is_an_independent_run():
    # a large ε: above bf16's rounding (the default would be refused, see above)
    check_shadow_is_an_independent_run(BF16, epsilon=0.25)


# -- 64-true ----------------------------------------------------------------------------------------------------------


def test_float64_observation_never_perturbs():
    check_observation_never_perturbs(FLOAT64)


def test_float64_zero_epsilon_shadow_is_the_real_model():
    run = check_zero_epsilon_shadow_is_the_real_model(FLOAT64)
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 8 for p in run.probe.shadow_modules[0].parameters())


def test_float64_shadow_is_an_independent_run():
    check_shadow_is_an_independent_run(FLOAT64)


# -- fast_dev_run -----------------------------------------------------------------------------------------------------


def test_fast_dev_run_observation_never_perturbs():
    check_observation_never_perturbs(FAST_DEV_RUN, require_trusted=False)


def test_fast_dev_run_warns_once_that_no_exponent_can_be_fitted():
    run = fit(FAST_DEV_RUN, ChaosProbe(num_shadows=2))
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    assert run.trainer.global_step == 1
    with warnings.catch_warnings(record=True) as on_access:
        warnings.simplefilter("always")
        exponent = run.probe.lyapunov_exponent
        run.probe.local_exponents  # noqa: B018: reading the results twice must not warn twice
        run.probe.lyapunov_exponent  # noqa: B018
    assert math.isnan(exponent)
    said = run.warned(NO_EXPONENT) + [str(w.message) for w in on_access
                                      if issubclass(w.category, UserWarning) and re.search(NO_EXPONENT, str(w.message))]
    assert len(said) == 1, f"expected one warning that no exponent can be fitted, got {said}"


def test_zero_epsilon_works_in_a_fast_dev_run():
    run = fit(FAST_DEV_RUN, ChaosProbe(epsilon=0.0, num_shadows=1, vectorize=False))
    assert_trusted(run)
    assert run.probe.distances.shape == (2, 1) and (run.probe.distances == 0).all()


@pytest.mark.parametrize("case", SHORT_RUNS, ids=str)
def test_runs_too_short_to_fit_say_so_too(case):
    run = fit(case, ChaosProbe(num_shadows=1))
    assert_probe_healthy(run)
    if math.isnan(run.probe.lyapunov_exponent):
        assert run.warned(NO_EXPONENT), "no exponent, and nothing said about it"
