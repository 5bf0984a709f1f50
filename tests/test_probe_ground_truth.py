"""The probe recovers exact Lyapunov exponents: full-batch GD on ½θᵀAθ has λ = ln max_i |1 − η a_i|."""

import math

import pytest

from conftest import Quadratic, dummy_loader, quiet_trainer
from lightning_chaos import ChaosProbe

EIGENVALUES = (1.0, 2.0, 3.0)


def exact_exponent(lr):
    return math.log(max(abs(1 - lr * a) for a in EIGENVALUES))


@pytest.mark.parametrize("lr", [0.25, 0.9], ids=["contracting", "expanding"])
def test_free_evolution_fit_recovers_exact_exponent(lr):
    probe = ChaosProbe(epsilon=1e-8, relative=False, num_shadows=2, norm="l1")
    steps = 200
    quiet_trainer(max_steps=steps, callbacks=[probe], precision="64-true").fit(
        Quadratic(EIGENVALUES, lr), dummy_loader(steps)
    )
    assert probe.distances.shape == (steps + 1, 2)
    expected = exact_exponent(lr)
    assert probe.local_exponents.tolist() == pytest.approx([expected] * 2, rel=0.01)
    assert probe.lyapunov_exponent == pytest.approx(expected, rel=0.01)
    assert (probe.window_fit.r2 > 0.999).all()


@pytest.mark.parametrize(
    ("lr", "steps", "relative"),
    [(0.25, 1000, True), (0.9, 600, True), (0.25, 1000, False)],
    ids=["contracting-relative", "expanding-relative", "contracting-absolute"],
)
def test_renormalised_running_exponent_recovers_exact_exponent(lr, steps, relative):
    probe = ChaosProbe(epsilon=1e-6, relative=relative, num_shadows=2, renormalize_every=5)
    quiet_trainer(max_steps=steps, callbacks=[probe], precision="64-true").fit(
        Quadratic(EIGENVALUES, lr), dummy_loader(steps)
    )
    expected = exact_exponent(lr)
    assert probe.local_exponents.tolist() == pytest.approx([expected] * 2, rel=0.01)
    # The first segments carry the alignment transient (bias ∝ 1/steps), hence the long runs.
    if not relative:
        # Pulled back to d0 = d(0) every 5 steps, the separation never drifts by more than 5 steps' growth.
        ratio = probe.distances[50:] / probe.distances[0]  # after the alignment transient
        assert ratio.max() < math.exp(5 * abs(expected)) * 1.01
        assert ratio.min() > math.exp(-5 * abs(expected)) / 1.01


def test_absolute_perturbation_lost_to_rounding_is_reported():
    """θ grows as 1.7^t, so an absolute d0 = 1e-6 drops below the weights' rounding step: d(t) becomes exactly 0."""
    probe = ChaosProbe(epsilon=1e-6, relative=False, renormalize_every=5)
    with pytest.warns(UserWarning, match="rounding"):
        quiet_trainer(max_steps=600, callbacks=[probe], precision="64-true").fit(
            Quadratic(EIGENVALUES, 0.9), dummy_loader(600)
        )
    assert probe.distances[-1, 0] == 0
