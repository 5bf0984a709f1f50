"""The finder's sweep engine on its own, without a Trainer: exact exponents and loss curves of gradient descent on a
quadratic, and a grid split across (simulated) processes gathering into what one process makes."""

import math

import pytest
import torch

from conftest import Quadratic
from lightning_chaos.sweep import LRSweep, seeded_rng_states

EIGENVALUES = (1.0, 2.0, 3.0)
STEPS = 60


def engine(**kwargs):
    model = Quadratic(EIGENVALUES, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(zip([torch.zeros(1)] * STEPS, seeded_rng_states(STEPS, 0, torch.device("cpu"))))
    return model, LRSweep(model, optimizer, batches, base_lr=0.1, steps_per_lr=STEPS, **kwargs)


@pytest.mark.parametrize("stack", [False, True], ids=["one-at-a-time", "stacked"])
def test_the_engine_trains_each_learning_rate_as_gradient_descent_would(stack):
    model, sweep = engine(stack=stack)
    lrs = [0.1, 0.3, 0.5, 0.6]
    runs = sweep.grid(lrs)
    assert list(runs) == lrs and sweep.trained_here == lrs
    eigenvalues, basis = torch.linalg.eigh(model.a)
    c = basis.T @ model.weight.detach()
    t = torch.arange(STEPS, dtype=torch.float64)[:, None]
    for lr, (run,) in runs.items():
        exact = 0.5 * (eigenvalues * (1 - lr * eigenvalues) ** (2 * t) * c**2).sum(1)
        torch.testing.assert_close(run.losses, exact, rtol=1e-9, atol=1e-300)
        # Λ = ln max_i |1 − η a_i| once the separation has aligned with the slowest-contracting direction
        assert run.exponent == pytest.approx(math.log(max(abs(1 - lr * a) for a in EIGENVALUES)), abs=2e-3)
        assert run.model_steps == 2 * STEPS and run.learning


@pytest.mark.parametrize("stack", [False, True], ids=["one-at-a-time", "stacked"])
def test_a_grid_split_across_processes_gathers_into_one_processs_runs(stack):
    """Rank r trains lrs[r::2]; the gather hands every rank both shares. One at a time, each rank trains its whole
    share, and the η past the point where one process would have stopped are dropped after the gather."""
    lrs = [0.1, 0.3, 0.5, 0.8, 1.2, 2.0]  # learning up to 2/3, diverging above
    _, alone = engine(stack=stack)
    one = alone.grid(lrs, stop_past_the_edge=True)
    _, second = engine(stack=stack, rank=1, world_size=2, gather=lambda runs: [runs])
    share = second.grid(lrs, stop_past_the_edge=False)  # rank 1's own runs, as it sends them
    _, first = engine(stack=stack, rank=0, world_size=2, gather=lambda runs: [runs, share])
    both = first.grid(lrs, stop_past_the_edge=True)
    assert first.trained_here == lrs[0::2] and second.trained_here == lrs[1::2]
    assert list(both) == list(one)
    if not stack:  # one process stopped past the edge: fewer η than the grid
        assert len(one) < len(lrs)
    for lr in one:
        torch.testing.assert_close(both[lr][0].losses, one[lr][0].losses, rtol=0, atol=0, equal_nan=True)
        assert both[lr][0].exponent == one[lr][0].exponent


def test_a_split_sweep_needs_a_gather():
    with pytest.raises(ValueError, match="`gather`"):
        engine(world_size=2)
