"""Both callbacks are configurable from YAML and the command line through LightningCLI."""


import pytest

from conftest import EXAMPLES, load_example

from lightning_chaos import ChaosLRFinder, ChaosProbe

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")


def test_yaml_config_with_command_line_overrides_runs_the_probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = load_example("cli").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "chaos_probe.yaml"),
            "--trainer.max_steps=6",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.num_shadows=2",
        ]
    )
    probes = [cb for cb in cli.trainer.callbacks if isinstance(cb, ChaosProbe)]
    assert len(probes) == 1
    probe = probes[0]
    assert probe.num_shadows == 2 and probe.monitor == "val_acc" and probe.target == 0.9
    assert probe.distances.shape == (7, 2)


def test_finder_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = load_example("cli").main(
        [
            "fit",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=lightning_chaos.ChaosLRFinder",
            "--trainer.callbacks.min_lr=0.01",
            "--trainer.callbacks.max_lr=10",
            "--trainer.callbacks.num_lrs=3",
            "--trainer.callbacks.steps_per_lr=10",
            "--trainer.callbacks.refine=0",
            "--trainer.callbacks.update_attr=false",
        ]
    )
    finder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ChaosLRFinder))
    assert finder.result is not None and len(finder.result.lrs) == 3
