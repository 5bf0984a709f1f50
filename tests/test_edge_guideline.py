"""The edge-of-chaos guideline (lightning_chaos.functional.guideline): its balance formula, exactly, and bad input."""

import math

import pytest

from lightning_chaos.functional.guideline import SCALING_LIMIT, EdgeOfChaosGuideline, edge_of_chaos_guideline


def test_formula_from_a_plain_run():
    slope, lr, batch, samples, momentum = 0.03, 0.05, 64, 10_000, 0.75
    g = edge_of_chaos_guideline(slope, lr, batch, samples, momentum)
    tau_per_epoch = samples * lr / ((1 - momentum) * batch)
    growth = slope / tau_per_epoch
    assert isinstance(g, EdgeOfChaosGuideline)
    assert g.growth_rate == pytest.approx(growth, rel=1e-12)
    assert g.weight_decay == pytest.approx(growth / 4, rel=1e-12)
    assert g.torch_weight_decay == pytest.approx(2 * g.weight_decay, rel=1e-12)
    assert g.coefficient == pytest.approx(growth * samples, rel=1e-12)
    assert g.relaxation_epochs == pytest.approx(1 / (4 * g.weight_decay * tau_per_epoch), rel=1e-12)
    assert g.max_learning_rate == pytest.approx(SCALING_LIMIT * (1 - momentum) * batch, rel=1e-12)


@pytest.mark.parametrize("lr, batch, momentum", [(0.02, 32, 0.5), (0.005, 8, 0.5), (0.01, 32, 0.0), (0.1, 512, 0.9)])
def test_the_papers_law_gives_one_decay_whatever_the_speed(lr, batch, momentum):
    # A = 11·η/((1 − α)B) per epoch of 60 000: the balance λ = 11/(4·60 000) does not depend on η, B or α
    g = edge_of_chaos_guideline(11 * lr / ((1 - momentum) * batch), lr, batch, 60_000, momentum)
    assert g.weight_decay == pytest.approx(11 / (4 * 60_000), rel=1e-12)
    assert g.coefficient == pytest.approx(11.0, rel=1e-12)
    # ... only the time to reach it does: 1/(4λ) in τ, over τ_epoch = 60 000·η/((1 − α)B) per epoch
    assert g.relaxation_epochs == pytest.approx(60_000 / 11 / (60_000 * lr / ((1 - momentum) * batch)), rel=1e-12)


def test_target_j_scales_the_decay_by_its_inverse_square():
    base = edge_of_chaos_guideline(0.01, 0.02, 32, 60_000, 0.5)
    half = edge_of_chaos_guideline(0.01, 0.02, 32, 60_000, 0.5, target_j=0.5)
    assert half.weight_decay == pytest.approx(4 * base.weight_decay, rel=1e-12)
    assert half.growth_rate == base.growth_rate


def test_second_round_from_a_run_with_decay():
    # settled (slope 0) at J² = 1.5 under λ0: the decay's share 4λ0·J² is the growth, λ grows by 1.5
    g = edge_of_chaos_guideline(0.0, 0.02, 32, 60_000, 0.5, weight_decay=4e-5, j2=1.5)
    assert g.weight_decay == pytest.approx(4e-5 * 1.5, rel=1e-12)
    assert g.growth_rate == pytest.approx(4 * 4e-5 * 1.5, rel=1e-12)
    # a run already at the target is a fixed point
    assert edge_of_chaos_guideline(0.0, 0.1, 128, 5000, 0.9, weight_decay=3e-4, j2=1.0).weight_decay == \
        pytest.approx(3e-4, rel=1e-12)
    # still growing: the measured slope adds to the decay's share
    slope = 0.002
    tau_per_epoch = 60_000 * 0.02 / (0.5 * 32)
    g = edge_of_chaos_guideline(slope, 0.02, 32, 60_000, 0.5, weight_decay=4e-5, j2=0.8)
    assert g.growth_rate == pytest.approx(slope / tau_per_epoch + 4 * 4e-5 * 0.8, rel=1e-12)
    # a shrinking J² (too much decay) lowers the suggestion
    lower = edge_of_chaos_guideline(-0.002, 0.02, 32, 60_000, 0.5, weight_decay=4e-5, j2=0.8)
    assert lower.weight_decay < 4e-5 * 0.8


def test_j2_is_ignored_without_decay():
    assert edge_of_chaos_guideline(0.01, 0.02, 32, 60_000, j2=5.0) == edge_of_chaos_guideline(0.01, 0.02, 32, 60_000)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"j2_slope": math.nan}, "j2_slope"),
        ({"j2_slope": "0.1"}, "j2_slope"),
        ({"j2_slope": True}, "j2_slope"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 32.0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"weight_decay": 1e-4}, "j2"),  # a decay needs the window's J²
        ({"weight_decay": 1e-4, "j2": -1.0}, "j2"),
        ({"target_j": 0.0}, "target_j"),
        ({"scaling_limit": -1.0}, "scaling_limit"),
        ({"j2_slope": -0.01}, "j2_slope"),  # J² shrinking without decay: nothing to balance
        ({"j2_slope": 0.0}, "j2_slope"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    arguments = {"j2_slope": 0.01, "learning_rate": 0.02, "batch_size": 32, "num_samples": 60_000, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        edge_of_chaos_guideline(**arguments)
