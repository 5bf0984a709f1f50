"""The edge-of-chaos estimators against exact mean-field ground truths (REFERENCE §8) and random-matrix simulations."""

import math

import pytest
import torch

from lightning_chaos.functional import (
    asymptotic_jacobian_norm,
    edge_of_chaos_boundary,
    map_lyapunov_exponent,
    mean_field_chi,
    order_parameters,
)

N = 2000


def coupling(g: float, j0: float = 0.0, n: int = N, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=generator) * g / math.sqrt(n) + j0 / n


def starts(n: int = N, count: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("j0", "j"), [(0.0, 0.5), (0.8, 1.5), (-1.2, 2.0)])
def test_order_parameters_recover_the_couplings_statistics(j0, j):
    found = order_parameters(coupling(j, j0))
    assert found.j == pytest.approx(j, rel=0.01)
    assert found.j0 == pytest.approx(j0, abs=0.1)  # std of N·mean over N² entries: J/√N·… ≈ 0.03 J
    assert tuple(found) == (found.j0, found.j)


def test_order_parameters_use_the_fan_in():
    weight = torch.full((3, 5), 0.2)
    weight[0, 0] = 1.2  # mean 0.2667, population std 0.2494
    j0, j = order_parameters(weight)
    assert j0 == pytest.approx(5 * weight.double().mean().item())
    assert j == pytest.approx(math.sqrt(5) * weight.double().std(correction=0).item())


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 2, 2), torch.zeros(1, 1), [[1.0, 2.0]]])
def test_order_parameters_refuse_what_is_not_a_matrix(bad):
    with pytest.raises(ValueError, match="`weight` must be a 2-D tensor"):
        order_parameters(bad)


# (J0/J, J_c): REFERENCE §8 gives 1.509, 1.912, 2.376, 3.642; the last is 3.63598 by adaptive quadrature
# (scipy.integrate.quad at 1e-13 agrees with ours to 1e-10), so REFERENCE's is off by 0.16 %.
@pytest.mark.parametrize(
    ("ratio", "expected"), [(1.1, 1.5087792128), (1.2, 1.9117400), (1.3, 2.3761439), (1.5, 3.6359844)]
)
def test_tanh_boundary_beyond_the_ferromagnetic_line(ratio, expected):
    assert edge_of_chaos_boundary(ratio) == pytest.approx(expected, rel=1e-6)
    assert edge_of_chaos_boundary(-ratio) == pytest.approx(expected, rel=1e-6)


def test_tanh_boundary_is_one_inside_and_rises_beyond():
    ratios = torch.tensor([-0.9, 0.0, 0.5, 1.0, 1.05, 1.4, 2.0])
    boundary = edge_of_chaos_boundary(ratios)
    assert isinstance(boundary, torch.Tensor) and boundary.shape == ratios.shape
    assert boundary[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert bool((boundary[4:].diff() > 0).all()) and boundary[4] > 1.0


def test_relu_boundary_at_he_initialisation():
    assert edge_of_chaos_boundary(0.0, activation="relu") == pytest.approx(math.sqrt(2.0), rel=1e-12)
    # a positive mean coupling biases h toward the active side: fewer dead units, a lower edge
    assert edge_of_chaos_boundary(0.5, activation="relu") < math.sqrt(2.0) < edge_of_chaos_boundary(-0.5, "relu")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: edge_of_chaos_boundary(0.5, activation="gelu"), "`activation` must be one of"),
        (lambda: edge_of_chaos_boundary(math.nan), "`j0_over_j` must be finite"),
        (lambda: mean_field_chi(0.0), "`sigma_w` must be a positive"),
        (lambda: mean_field_chi(1.0, sigma_b=-1.0), "`sigma_b` must be a non-negative"),
    ],
)
def test_mean_field_functions_refuse_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mean_field_chi_ground_truths():
    assert mean_field_chi(2.0) == pytest.approx(1.3627, abs=1e-4)
    assert mean_field_chi(1.5) == pytest.approx(1.1393, abs=1e-4)
    assert mean_field_chi(3.0) == pytest.approx(1.8600, abs=2e-4)
    assert mean_field_chi(0.7) == pytest.approx(0.49, rel=1e-12)  # ordered: q* = 0, χ₁ = σ_w²
    assert mean_field_chi(1.0) == pytest.approx(1.0)  # the tanh edge
    assert mean_field_chi(1.0 + 1e-3) == pytest.approx(1.0, abs=1e-4)  # continuous through it
    assert mean_field_chi(1.0, sigma_b=0.3) < 1.0  # a bias field orders the network
    assert mean_field_chi(math.sqrt(2.0), sigma_b=0.5, activation="relu") == pytest.approx(1.0)  # the ReLU edge


@pytest.fixture(scope="module")
def chaotic_maps():
    """Exponent and Jacobian norm of x ↦ tanh(Wx) for W ~ N(0, g²/N), N = 2000: one simulation per g."""
    results = {}
    for g in (0.8, 1.5, 2.0, 3.0):
        w = coupling(g)
        x0 = starts()
        results[g] = (
            map_lyapunov_exponent(lambda x, w=w: torch.tanh(w @ x), x0, steps=600, transient=100),
            asymptotic_jacobian_norm(lambda x, w=w: torch.tanh(w @ x), x0, steps=300),
        )
    return results


@pytest.mark.parametrize(("g", "half_log_chi"), [(1.5, 0.0652), (2.0, 0.1547), (3.0, 0.3103)])
def test_exponent_above_the_edge_is_half_log_chi(chaotic_maps, g, half_log_chi):
    exponent, _ = chaotic_maps[g]
    assert exponent == pytest.approx(half_log_chi, rel=0.02)  # REFERENCE: N = 2000 lands within 1-2 %
    assert half_log_chi == pytest.approx(0.5 * math.log(mean_field_chi(g)), abs=1e-4)


def test_exponent_below_the_edge_is_log_g(chaotic_maps):
    exponent, norm = chaotic_maps[0.8]
    # ln 0.8 = −0.223 as N → ∞; the spectral radius of a finite W sits a little above g (REFERENCE: −0.206)
    assert -0.23 < exponent < -0.19
    assert norm == pytest.approx(0.8, rel=0.01)  # the orbit falls to 0, where J* = W


@pytest.mark.parametrize("g", [1.5, 2.0, 3.0])
def test_jacobian_norm_above_the_edge_is_root_chi(chaotic_maps, g):
    _, norm = chaotic_maps[g]
    # one snapshot of a chaotic orbit: ±1.5 % between realisations at N = 2000
    assert norm == pytest.approx(math.sqrt(mean_field_chi(g)), rel=0.03)


def test_exponent_of_a_linear_map_is_its_spectral_radius_exactly():
    a = torch.diag(torch.tensor([0.5, -1.1, 0.0], dtype=torch.float64))
    x0 = torch.ones(2, 3, dtype=torch.float64)
    # after the transient the tangent lies along the top direction to (0.5/1.1)^80 ≈ 1e-27
    exponent = map_lyapunov_exponent(lambda x: a @ x, x0, steps=100, transient=40)
    assert exponent == pytest.approx(math.log(1.1), rel=1e-12)


def test_map_functions_leave_the_global_rng_alone():
    w = coupling(1.5, n=50)
    before = torch.get_rng_state()
    map_lyapunov_exponent(lambda x: torch.tanh(w @ x), starts(50), steps=20, transient=5)
    asymptotic_jacobian_norm(lambda x: torch.tanh(w @ x), starts(50), steps=20)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_escaping_orbit_ends_early_and_says_so():
    x0 = torch.ones(3, 4, dtype=torch.float64)  # ‖x_t‖ = 2^(t+1)·2 passes 1e10 at t = 32
    with pytest.warns(RuntimeWarning, match="orbit escaped .* at iteration 32; the exponent is taken over the 22"):
        exponent = map_lyapunov_exponent(lambda x: 2.0 * x, x0, steps=100, transient=10)
    assert exponent == pytest.approx(math.log(2.0))
    with pytest.warns(RuntimeWarning, match="escaped .* at iteration 32; the Jacobian is taken at the last finite"):
        assert asymptotic_jacobian_norm(lambda x: 2.0 * x, x0, steps=100) == pytest.approx(2.0)


def test_a_dead_relu_map_has_exponent_minus_infinity():
    with pytest.warns(RuntimeWarning, match="tangent collapsed to 0 at iteration 0"):
        assert map_lyapunov_exponent(lambda x: torch.relu(-x), torch.ones(2, 5), steps=10, transient=0) == -math.inf


def test_orbit_functions_refuse_bad_input():
    square = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="`x0` must be a tensor \\[num_starts"):
        map_lyapunov_exponent(square, torch.ones(4))
    with pytest.raises(ValueError, match="`x0` must be a floating-point"):
        asymptotic_jacobian_norm(square, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`fn` must map a point of shape \\(4,\\) to the same shape"):
        map_lyapunov_exponent(torch.nn.Linear(4, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="`transient` must be an int with 0 <= transient < steps"):
        map_lyapunov_exponent(square, torch.ones(2, 4), steps=10, transient=10)
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        asymptotic_jacobian_norm(square, torch.ones(2, 4), steps=0)
