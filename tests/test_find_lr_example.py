"""examples/find_lr.py, scaled down: the sweep sets the LR it reports, saves its figure, and on this task (the
quickstart MLP on the digits, seed 0) the suggestion reaches 95 % validation accuracy before the default LR does."""

import os
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import find_lr  # noqa: E402


def test_find_lr_example_sets_the_suggestion_and_beats_the_default_lr_on_the_digits(tmp_path, capsys):
    figure = tmp_path / "sweep.png"
    out = find_lr.main(["--epochs", "6", "--figure", str(figure)])
    result = out["result"]
    assert result.anchor == "trainability" and result.suggestion is not None
    assert out["model_lr"] == result.suggestion
    assert figure.stat().st_size > 10_000
    chaos_lr, chaos_steps, _ = out["measured"]["ChaosLRFinder"]
    default_lr, default_steps, _ = out["measured"]["default"]
    assert chaos_lr == result.suggestion and default_lr == 0.1
    assert chaos_steps is not None and (default_steps is None or chaos_steps < default_steps)
    printed = capsys.readouterr().out
    assert f"suggestion lr={result.suggestion:.3g}" in printed and "steps to 95%" in printed
