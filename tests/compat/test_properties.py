"""The three properties (SETUPS.md) on every standard case of the suite: each family's ``CASES``, defined in its own
module next to the tests peculiar to it. Written once here rather than once per family."""

import pytest
from harness import (
    check_observation_never_perturbs,
    check_shadow_is_an_independent_run,
    check_zero_epsilon_shadow_is_the_real_model,
)
from test_callbacks import CASES as CALLBACKS
from test_compile import CASES as COMPILE
from test_compile import fresh_dynamo  # noqa: F401 (autouse: each compiled case compiles from scratch)
from test_module_hooks import CASES as HOOKS
from test_optimizers import CASES as OPTIMIZERS
from test_transformers import CASES as TRANSFORMERS

STANDARD = [*COMPILE, *HOOKS, *CALLBACKS, *OPTIMIZERS, *TRANSFORMERS]


@pytest.mark.parametrize("case", STANDARD, ids=str)
def test_observation_never_perturbs(case):
    check_observation_never_perturbs(case)


@pytest.mark.parametrize("case", STANDARD, ids=str)
def test_zero_epsilon_shadow_is_the_real_model(case):
    check_zero_epsilon_shadow_is_the_real_model(case)


@pytest.mark.parametrize("case", STANDARD, ids=str)
def test_shadow_is_an_independent_run(case):
    check_shadow_is_an_independent_run(case)
