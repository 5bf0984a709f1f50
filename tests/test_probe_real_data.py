"""On real data (scikit-learn's handwritten digits) a small learning rate is regular and a large one chaotic."""

import lightning as L
import pytest

from conftest import quiet_trainer
from lightning_chaos import ChaosProbe
from lightning_chaos.demo import DigitsDataModule, MLPClassifier

pytest.importorskip("sklearn")


def exponent_at(lr, steps=150):
    L.seed_everything(0, verbose=False)
    probe = ChaosProbe(num_shadows=3)
    quiet_trainer(max_steps=steps, callbacks=[probe], limit_val_batches=0).fit(
        MLPClassifier(hidden=(64,), lr=lr), datamodule=DigitsDataModule(batch_size=64)
    )
    return probe


def test_small_learning_rate_is_regular_and_large_one_chaotic():
    gentle, aggressive = exponent_at(0.01), exponent_at(5.0)
    assert abs(gentle.lyapunov_exponent) < 1e-3
    assert aggressive.lyapunov_exponent > 0.02
    assert (aggressive.local_exponents > 20 * gentle.local_exponents.abs().max()).all()
    # At the large rate the separation grew by orders of magnitude; at the small one it barely moved.
    assert (aggressive.distances[-1] / aggressive.distances[0]).min() > 100
    assert (gentle.distances[-1] / gentle.distances[0]).max() < 1.1
