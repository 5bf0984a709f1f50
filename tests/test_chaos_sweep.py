"""examples/chaos_sweep.py: the η sweep for any module and data module from a config, on the offline digits."""

from pathlib import Path

import pytest

from conftest import EXAMPLES, load_example

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

@pytest.mark.parametrize("config", ["deep_mlp.yaml", "small_cnn.yaml"])
def test_sweep_is_regular_at_small_and_chaotic_at_large_learning_rates(tmp_path, config):
    rows = load_example("chaos_sweep").run(
        [
            "--config", str(EXAMPLES / "configs" / config),
            "--data.init_args.dataset", "digits",
            "--sweep.lrs", "[0.01, 3.0]",
            "--sweep.inits", "2",
            "--sweep.steps", "60",
            "--sweep.out", str(tmp_path / "sweep.csv"),
        ]
    )
    assert len(rows) == 4 and (tmp_path / "sweep.csv").exists()
    small = [r for r in rows if r["lr"] == 0.01]
    large = [r for r in rows if r["lr"] == 3.0]
    assert all(r["regime"] != "chaotic" for r in small)
    assert all(r["regime"] == "chaotic" for r in large)
    assert min(r["exponent"] for r in large) > 10 * max(abs(r["exponent"]) for r in small)


def test_fashion_mnist_loader_reads_debians_idx_files():
    from lightning_chaos.demo import FASHION_MNIST_DIR, load_fashion_mnist

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    images, labels = load_fashion_mnist(limit=100)
    assert images.shape == (100, 1, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(labels.tolist()) <= set(range(10))
