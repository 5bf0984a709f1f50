"""What the probe writes reaches TensorBoard and any other logger; time-to-target is recorded and can stop training."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader

from conftest import DropoutMLP, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe
from lightning_chaos import logging as chaos_logging


def fit(probe, logger, max_epochs=2, model=None, **kwargs):
    L.seed_everything(0, verbose=False)
    loader = DataLoader(random_classification(), batch_size=16, shuffle=True)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[probe], logger=logger, **kwargs)
    trainer.fit(model or DropoutMLP(), loader)
    return trainer


def test_tensorboard_event_files_hold_the_chaos_tags_layout_and_histogram(tmp_path):
    probe = ChaosProbe(num_shadows=2, log_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(probe, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        chaos_logging.DISTANCE_MEAN,
        chaos_logging.LOG_DISTANCE_MEAN,
        chaos_logging.shadow_distance_tag(0),
        chaos_logging.shadow_distance_tag(1),
        chaos_logging.shadow_log_distance_tag(0),
        chaos_logging.shadow_log_distance_tag(1),
        chaos_logging.RUNNING_EXPONENT,
        chaos_logging.RUNNING_EXPONENT_MIN,
        chaos_logging.RUNNING_EXPONENT_MAX,
        chaos_logging.LOCAL_EXPONENT,
        chaos_logging.LOCAL_EXPONENT_R2,
    }
    assert expected <= scalars
    # 12 optimizer steps logged every 2 steps, plus d(0) at attach: 7 points of d(t).
    distance_points = events.Scalars(chaos_logging.DISTANCE_MEAN)
    assert [p.step for p in distance_points] == [0, 2, 4, 6, 8, 10, 12]
    assert distance_points[0].value == pytest.approx(probe.distances[0].mean().item(), rel=1e-6)
    assert distance_points[-1].value == pytest.approx(probe.distances[-1].mean().item(), rel=1e-6)
    assert chaos_logging.EXPONENT_HISTOGRAM in events.Tags()["histograms"]
    layout_event = events.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)[0]
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_event.tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    assert any("d(t)" in title for title in charts)
    margin = next(chart for chart in charts.values() if chart.HasField("margin"))
    assert margin.margin.series[0].value == chaos_logging.RUNNING_EXPONENT


def test_csv_logger_receives_the_chaos_metrics(tmp_path):
    probe = ChaosProbe(log_every_n_steps=3)
    logger = CSVLogger(tmp_path, name="csv")
    fit(probe, logger)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get(chaos_logging.DISTANCE_MEAN)]
    assert [int(row["step"]) for row in logged] == [0, 3, 6, 9, 12]
    assert float(logged[-1][chaos_logging.DISTANCE_MEAN]) == pytest.approx(probe.distances[-1, 0].item(), rel=1e-6)


def test_without_a_logger_it_warns_and_keeps_results_on_the_callback():
    probe = ChaosProbe()
    with pytest.warns(UserWarning, match="no logger"):
        trainer = fit(probe, logger=False)
    assert probe.distances.shape == (trainer.global_step + 1, 1)


class ValidatedMLP(DropoutMLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())


def test_time_to_target_is_recorded_and_can_stop_training(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    probe = ChaosProbe(monitor="val_acc", target=0.5, stop_at_target=True)
    L.seed_everything(0, verbose=False)
    data = random_classification()
    trainer = quiet_trainer(max_epochs=50, callbacks=[probe], logger=logger)
    trainer.fit(ValidatedMLP(), DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=96))
    reached = probe.time_to_target
    assert reached is not None
    assert trainer.callback_metrics["val_acc"] >= 0.5
    assert trainer.current_epoch < 49  # stopped early
    assert reached["step"] == trainer.global_step
    assert reached["epoch"] == trainer.current_epoch - 1 or reached["epoch"] == trainer.current_epoch
    assert reached["seconds"] > 0


def test_time_to_target_stays_none_when_never_reached():
    probe = ChaosProbe(monitor="val_acc", target=1.01)
    data = random_classification()
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[probe]).fit(
        ValidatedMLP(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=96)
    )
    assert probe.time_to_target is None


def test_end_of_fit_summary_reports_each_shadow_and_the_regime(caplog):
    import logging

    probe = ChaosProbe(num_shadows=2, monitor="val_acc", target=1.01)
    data = random_classification()
    L.seed_everything(0, verbose=False)
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_epochs=3, callbacks=[probe]).fit(
            ValidatedMLP(lr=3.0), DataLoader(data, batch_size=16), DataLoader(data, batch_size=96)
        )
    summary = next(r.getMessage() for r in caplog.records if "ChaosProbe summary" in r.getMessage())
    assert "18 optimizer steps" in summary
    assert summary.count("\n  0 ") + summary.count("\n  1 ") == 2
    assert "chaotic over 18 steps" in summary  # lr = 3 separates the shadows fast
    assert "val_acc never reached 1.01" in summary


def test_hparams_session_holds_lr_epsilon_and_the_final_exponent(tmp_path):
    from pathlib import Path

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    probe = ChaosProbe(num_shadows=2, epsilon=1e-3)
    logger = TensorBoardLogger(tmp_path, name="hp")
    fit(probe, logger, model=DropoutMLP(lr=0.3))
    sessions = []
    for path in Path(logger.log_dir).glob("events.out.tfevents*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    sessions.append(data.session_start_info.hparams)
    assert sessions, "no HParams session was written"
    hparams = {k: v.number_value for k, v in sessions[-1].items()}
    assert hparams["lr"] == pytest.approx(0.3)
    assert hparams["chaos/epsilon"] == pytest.approx(1e-3)
    assert hparams["chaos/num_shadows"] == 2
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Scalars(chaos_logging.HPARAM_EXPONENT)[-1].value == pytest.approx(probe.lyapunov_exponent, rel=1e-5)


class MemoryLogger(Logger):
    """A third-party-style logger (as W&B, MLflow, Neptune): only the generic Logger interface."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_any_lightning_logger_receives_the_metrics():
    logger = MemoryLogger()
    probe = ChaosProbe(num_shadows=2, log_every_n_steps=4)
    fit(probe, logger)
    chaos_rows = [(step, m) for step, m in logger.rows if chaos_logging.DISTANCE_MEAN in m]
    assert [step for step, _ in chaos_rows] == [0, 4, 8, 12]
    assert chaos_rows[-1][1][chaos_logging.RUNNING_EXPONENT] == pytest.approx(
        probe.running_exponents.mean().item(), rel=1e-6
    )


def test_finder_figure_and_curve_reach_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    from conftest import Quadratic, dummy_loader

    from lightning_chaos import find_chaos_lr

    logger = TensorBoardLogger(tmp_path, name="finder")
    result = find_chaos_lr(
        quiet_trainer(max_steps=5, precision="64-true", logger=logger), Quadratic((1.0, 2.0), 0.1),
        train_dataloaders=dummy_loader(5), min_lr=0.1, max_lr=2.0, num_lrs=4, steps_per_lr=20, refine=0,
        update_attr=False,
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert f"{chaos_logging.FINDER_PREFIX}/sweep" in events.Tags()["images"]
    curve = events.Scalars(f"{chaos_logging.FINDER_PREFIX}/exponent")
    assert [p.value for p in curve] == pytest.approx(result.exponents.tolist(), rel=1e-5)
    losses = events.Scalars(f"{chaos_logging.FINDER_PREFIX}/loss_ratio")
    assert [p.value for p in losses] == pytest.approx(result.loss_ratio.tolist(), rel=1e-5, nan_ok=True)


def test_finder_result_without_loss_ratios_still_logs_its_exponents(tmp_path):
    from lightning_chaos.finder import ChaosLRFinderResult

    logger = TensorBoardLogger(tmp_path, name="finder")
    result = ChaosLRFinderResult(lrs=torch.tensor([0.1, 1.0]), exponents=torch.tensor([-0.01, 0.2]),
                                 sensitive_fraction=torch.tensor([0.0, 1.0]), learning=torch.tensor([True, False]),
                                 suggestion=None)  # a result built by hand or saved before loss ratios existed
    chaos_logging.write_finder_result(logger, result)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [p.value for p in events.Scalars(f"{chaos_logging.FINDER_PREFIX}/exponent")] == pytest.approx([-0.01, 0.2])
    assert f"{chaos_logging.FINDER_PREFIX}/loss_ratio" not in events.Tags()["scalars"]
