"""Estimators on hand-made arrays and analytic cases, without a Trainer."""

import math

import pytest
import torch

from lightning_chaos.functional import (
    benettin_exponent,
    best_window_fit,
    default_fit_windows,
    finite_time_exponent,
    flat_norm,
    network_mle,
    parameter_distance,
)


def test_parameter_distance_l1_l2_over_lists_of_tensors():
    a = [torch.zeros(2, 2), torch.zeros(3)]
    b = [torch.tensor([[1.0, -2.0], [0.0, 2.0]]), torch.tensor([0.0, 0.0, -4.0])]
    assert parameter_distance(a, b).item() == pytest.approx(5.0)
    assert parameter_distance(a, b, norm="l1").item() == pytest.approx(9.0)
    assert flat_norm(b, "l1").item() == pytest.approx(9.0)


def test_parameter_distance_mixed_dtypes_and_bad_input():
    a = [torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float32)]
    b = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([4.0])]
    assert parameter_distance(a, b).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="norm"):
        parameter_distance(a, b, norm="max")
    with pytest.raises(ValueError, match="other"):
        parameter_distance(a, b[:1])


def test_default_windows_are_the_papers_grid_at_201_points():
    starts, widths = default_fit_windows(201)
    assert starts == list(range(0, 101, 5))
    assert widths == list(range(30, 101, 5))
    with pytest.raises(ValueError, match="num_points"):
        default_fit_windows(3)


def test_linear_map_exponent_is_ln_abs_a():
    # x → a·x: d(t) = |a|^t d(0), so ln d is exactly linear with slope ln|a|.
    for a in (0.5, -1.5, 3.0):
        t = torch.arange(60, dtype=torch.float64)
        d = 1e-8 * abs(a) ** t
        fit = best_window_fit(d.log())
        assert fit.exponent.item() == pytest.approx(math.log(abs(a)), rel=1e-9)
        assert fit.r2.item() == pytest.approx(1.0)
        assert finite_time_exponent(d).item() == pytest.approx(math.log(abs(a)), rel=1e-9)


def test_logistic_map_exponent_from_two_trajectories_with_renormalisation():
    # The logistic map x ← 4x(1 − x) has λ = ln 2 exactly (Benettin by hand, d0 = 1e-9, renormalised every step).
    x, y, d0, total, steps = 0.1234, 0.1234 + 1e-9, 1e-9, 0.0, 20000
    for _ in range(steps):
        x, y = 4 * x * (1 - x), 4 * y * (1 - y)
        d = abs(y - x)
        total += math.log(d / d0)
        y = x + (y - x) * d0 / d
    assert benettin_exponent(torch.tensor(total), steps).item() == pytest.approx(math.log(2), abs=0.02)
    with pytest.raises(ValueError, match="steps"):
        benettin_exponent(torch.tensor(1.0), 0)


def test_window_search_finds_the_exponential_phase_before_saturation():
    t = torch.arange(201, dtype=torch.float64)
    growth = -18.0 + 0.3 * t
    log_d = torch.minimum(growth, torch.tensor(0.0))  # saturates at t = 60
    log_d = log_d + 1e-3 * torch.sin(7 * t)  # a little noise so R² < 1 on the plateau
    fit = best_window_fit(log_d)
    assert fit.exponent.item() == pytest.approx(0.3, rel=1e-3)
    assert fit.start.item() + fit.width.item() <= 61
    assert fit.intercept.item() == pytest.approx(-18.0 + 0.3 * fit.start.item(), abs=0.01)


def test_window_fit_columns_are_independent_and_skip_non_finite_values():
    t = torch.arange(40, dtype=torch.float64)
    diverged = -5 + 0.1 * t
    diverged[30:] = math.nan
    series = torch.stack([-2 - 0.05 * t, diverged], dim=1)
    fit = best_window_fit(series)
    assert fit.exponent.tolist() == pytest.approx([-0.05, 0.1])
    assert fit.start[1] + fit.width[1] <= 30


def test_window_fit_of_a_flat_series_has_zero_slope_and_undefined_r2():
    fit = best_window_fit(torch.full((30,), -3.0))
    assert fit.exponent.item() == 0.0
    assert math.isnan(fit.r2.item())


def test_window_fit_rejects_bad_grids():
    with pytest.raises(ValueError, match="widths"):
        best_window_fit(torch.zeros(20), widths=[2])
    with pytest.raises(ValueError, match="no window"):
        best_window_fit(torch.zeros(20), starts=[15], widths=[10])
    with pytest.raises(ValueError, match="log_distances"):
        best_window_fit(torch.zeros(5, 2, 2))


def test_network_mle_keeps_only_good_chaotic_fits():
    exponents = torch.tensor([0.2, 0.4, 0.01, 0.3, -0.1])
    r2 = torch.tensor([0.95, 0.99, 0.99, 0.5, 0.99])
    mean, std, kept = network_mle(exponents, r2)
    assert kept == 2
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(0.1)
    assert math.isnan(network_mle(torch.tensor([-1.0]), torch.tensor([1.0]))[0])
    # a separation that overflowed is no exponent to average
    assert network_mle(torch.tensor([math.inf, 0.1, math.nan]), torch.tensor([0.95, 0.95, 0.95]))[2] == 1


def test_regime_words_follow_the_e_fold_criterion():
    from lightning_chaos.functional.onset import regime

    assert regime(0.02, 100) == "chaotic"
    assert regime(-0.02, 100) == "contracting"
    assert regime(0.005, 100) == "neutral"
    assert regime(float("nan"), 100) == "undetermined"


def test_fit_before_saturation_finds_a_short_exponential_phase_the_papers_grid_misses():
    from lightning_chaos.functional import saturation_cut, window_fit_before_saturation

    t = torch.arange(201, dtype=torch.float64)
    # 16 e-folds in 20 steps, then a plateau with a slow drift: the seed paper's MNIST shape at large η.
    log_d = torch.where(t < 20, -18.0 + 0.8 * t, -2.0 + 0.001 * (t - 20))
    assert best_window_fit(log_d).exponent.item() < 0.1  # the paper's grid sits on the plateau
    assert saturation_cut(log_d).item() == 20  # t = 19 is within one e-fold of the top
    fit = window_fit_before_saturation(log_d)
    assert fit.exponent.item() == pytest.approx(0.8)
    # No growth, no cut: contracting and neutral series are fitted whole, as by best_window_fit.
    flat = -5.0 - 0.01 * t
    assert saturation_cut(flat).item() == 201
    assert window_fit_before_saturation(flat).exponent.item() == pytest.approx(best_window_fit(flat).exponent.item())
