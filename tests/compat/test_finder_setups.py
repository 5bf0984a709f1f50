"""``ChaosLRFinder`` on every setup of the suite: its sweep trains clones of the model at fit start, through the same
mirror as the probe's shadows, and must neither crash on the setup nor perturb the user's training.

Each case is fitted with the smallest sweep the finder accepts (3 learning rates, 10 steps each, one shadow, no
refinement) and ``update_attr=False``, so that it sets no learning rate: the fit must then end bit-identical to the
case's fit without it (property 1 of ``harness.py``: parameters, buffers, optimizer state, the RNG draws after fit,
the logged metrics less the probe's and the finder's tags, the global step). A suggestion may be None on these tiny
tasks. The setups the probe refuses (it cannot follow them) are swept too: the sweep must leave the training alone
whatever the probe can measure; only a repeat of another case's fit is skipped.
"""

import pytest

from harness import Case, assert_same_training, fit, plain_run
from lightning_chaos import ChaosLRFinder
from lightning_chaos.finder import ChaosLRFinderResult
from table import all_cases
from test_compile import fresh_dynamo  # noqa: F401 (an autouse fixture: each compiled case compiles from scratch)

NUM_LRS, STEPS_PER_LR = 3, 10  # the smallest grid and window ChaosLRFinder accepts


def finder() -> ChaosLRFinder:
    return ChaosLRFinder(min_lr=1e-3, max_lr=1.0, num_lrs=NUM_LRS, steps_per_lr=STEPS_PER_LR, num_shadows=1, refine=0,
                         update_attr=False)


def same_fit(case: Case) -> tuple:
    """What the fit depends on. Cases that differ only in the probe's arguments (``num_shadows=4`` for the batched
    path) or in what the probe's properties compare are the same fit for the finder."""
    return case.model, case.data, repr(sorted(case.trainer.items())), case.callbacks, case.seed


def finder_cases() -> list:
    """Every case of the suite, once per distinct fit; a repeat is kept as a skipped test that names the first."""
    first: dict[tuple, str] = {}
    params = []
    for case in all_cases():
        key = same_fit(case)
        if key in first:
            reason = f"the same fit as {first[key]} (the cases differ only in the probe's arguments)"
            params.append(pytest.param(case, marks=pytest.mark.skip(reason=reason)))
        else:
            first[key] = case.name
            params.append(case)
    return params


@pytest.mark.parametrize("case", finder_cases(), ids=str)
def test_the_finder_sweeps_without_perturbing_the_training(case):
    sweep = finder()
    run = fit(case, callbacks=[sweep])
    result = sweep.result
    assert isinstance(result, ChaosLRFinderResult), "the finder gave no result"
    assert 1 <= result.lrs.numel() <= NUM_LRS and result.steps_per_lr == STEPS_PER_LR
    assert result.exponents.shape == result.learning.shape == result.lrs.shape
    assert_same_training(run, plain_run(case))
