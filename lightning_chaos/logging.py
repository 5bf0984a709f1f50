"""Tags, the TensorBoard layout and logger plumbing for the chaos metrics.

Logger-agnostic first: metrics go to every logger of the trainer through ``Logger.log_metrics``, the way Lightning's
own ``LearningRateMonitor`` logs from a callback. TensorBoard extras (custom-scalars layout, histograms) are added
when a ``TensorBoardLogger`` is present.
"""

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

if TYPE_CHECKING:  # the finder imports this module
    from lightning_chaos.finder import ChaosLRFinderResult

PREFIX = "chaos"
DISTANCE_MEAN = f"{PREFIX}/distance/mean"
LOG_DISTANCE_MEAN = f"{PREFIX}/log_distance/mean"
RUNNING_EXPONENT = f"{PREFIX}/lyapunov/running"
RUNNING_EXPONENT_MIN = f"{PREFIX}/lyapunov/running_min"
RUNNING_EXPONENT_MAX = f"{PREFIX}/lyapunov/running_max"
LOCAL_EXPONENT = f"{PREFIX}/lyapunov/local"
LOCAL_EXPONENT_R2 = f"{PREFIX}/lyapunov/local_r2"
TIME_TO_TARGET = f"{PREFIX}/time_to_target"
EXPONENT_HISTOGRAM = f"{PREFIX}/local_exponents"
SENTINEL_DRIFT = f"{PREFIX}/sentinel/max_drift"
TRUSTED = f"{PREFIX}/trusted"


EDGE_PHASE_DIAGRAM = f"{PREFIX}/edge/phase_diagram"


def edge_tag(layer: str, quantity: str) -> str:
    return f"{PREFIX}/edge/{layer}/{quantity}"


def shadow_distance_tag(index: int) -> str:
    return f"{PREFIX}/distance/shadow_{index}"


def shadow_log_distance_tag(index: int) -> str:
    return f"{PREFIX}/log_distance/shadow_{index}"


def custom_scalars_layout() -> dict:
    """TensorBoard custom-scalars layout: every shadow's d(t) on one chart, the running exponent with its band."""
    return {
        "chaos": {
            "d(t) of every shadow": ["Multiline", [rf"{PREFIX}/distance/shadow_\d+", DISTANCE_MEAN]],
            "ln d(t) of every shadow (a straight rising line: exponential divergence)": [
                "Multiline",
                [rf"{PREFIX}/log_distance/shadow_\d+", LOG_DISTANCE_MEAN],
            ],
            "running Lyapunov exponent (band across shadows)": [
                "Margin",
                [RUNNING_EXPONENT, RUNNING_EXPONENT_MIN, RUNNING_EXPONENT_MAX],
            ],
            "local exponent and fit R²": ["Multiline", [LOCAL_EXPONENT, LOCAL_EXPONENT_R2]],
            "time to target": ["Multiline", [rf"{TIME_TO_TARGET}/.*"]],
        }
    }


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_metrics(trainer: Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send plain-float metrics to every logger of the trainer (each logger writes on rank 0 only).

    ``step`` is the number t of optimizer steps taken, so d(t) is plotted at t; Lightning logs a training_step's loss
    at t − 1, the step *before* that batch's update, which is the same moment seen from the other side.
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def write_layout(trainer: Trainer) -> None:
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_custom_scalars(custom_scalars_layout())


def write_exponent_histogram(trainer: Trainer, exponents: Tensor, step: int) -> None:
    finite = exponents[torch.isfinite(exponents)]
    if finite.numel() == 0:
        return
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_histogram(EXPONENT_HISTOGRAM, finite, global_step=step)


HPARAM_EXPONENT = f"{PREFIX}/hparams/lyapunov_exponent"
HPARAM_TIME_TO_TARGET = f"{PREFIX}/hparams/time_to_target_step"


def write_hparams(trainer: Trainer, params: Mapping[str, float], metrics: Mapping[str, float]) -> None:
    """HParams entries, so the runs of an η sweep can be compared in TensorBoard's HParams dashboard.

    The run's own hyperparameters (what Lightning logged at fit start) are kept and the probe's added; the session
    is written again at the end, with the final exponent and time-to-target as its metrics.
    """
    for logger in tensorboard_loggers(trainer):
        logger.log_hyperparams({**dict(logger.hparams), **params}, metrics=dict(metrics))


FINDER_PREFIX = "chaos_lr_finder"


def write_finder_result(logger: TensorBoardLogger, result: "ChaosLRFinderResult") -> None:
    """The finder's figure under Images and Λ(η), ρ(η) and the loss ratio as scalars indexed by grid position (η logged
    beside)."""
    writer = logger.experiment
    for index, (lr, exponent, fraction) in enumerate(
        zip(result.lrs.tolist(), result.exponents.tolist(), result.sensitive_fraction.tolist())
    ):
        writer.add_scalar(f"{FINDER_PREFIX}/lr", lr, index)
        writer.add_scalar(f"{FINDER_PREFIX}/exponent", exponent, index)
        writer.add_scalar(f"{FINDER_PREFIX}/sensitive_fraction", fraction, index)
    if result.loss_ratio.numel() == result.lrs.numel():
        for index, ratio in enumerate(result.loss_ratio.tolist()):
            writer.add_scalar(f"{FINDER_PREFIX}/loss_ratio", ratio, index)
    add_figure(logger, f"{FINDER_PREFIX}/sweep", result.plot, step=None, owner="ChaosLRFinder")


def add_figure(logger: TensorBoardLogger, tag: str, draw: Callable[[], Any], step: Optional[int], owner: str) -> None:
    """Draw a matplotlib figure and add it under Images; a figure never fails the fit (matplotlib is optional)."""
    try:
        figure = draw()
    except ImportError:
        return
    except Exception as error:  # noqa: BLE001
        rank_zero_warn(f"{owner}: could not draw the figure {tag!r} for TensorBoard: {error!r}")
        return
    logger.experiment.add_figure(tag, figure, global_step=step, close=True)


# -- tangent-space exponents and the sharpness (TangentProbe) -----------------------------------------------------------

TANGENT_PREFIX = f"{PREFIX}/tangent"
TANGENT_NUM_POSITIVE = f"{TANGENT_PREFIX}/num_positive"
TANGENT_KAPLAN_YORKE = f"{TANGENT_PREFIX}/kaplan_yorke"
SHARPNESS = f"{PREFIX}/sharpness"
SHARPNESS_THRESHOLD = f"{PREFIX}/sharpness_threshold"
PRECONDITIONED_SHARPNESS = f"{PREFIX}/preconditioned_sharpness"
PRECONDITIONED_SHARPNESS_THRESHOLD = f"{PREFIX}/preconditioned_sharpness_threshold"


def tangent_exponent_tag(index: int) -> str:
    return f"{TANGENT_PREFIX}/exponent_{index}"


def tangent_layout() -> dict:
    """Custom-scalars charts of the tangent spectrum, and the sharpness with its stability threshold (2/η for GD)
    on one chart: the edge of stability is where the two lines meet."""
    return {
        "chaos tangent": {
            "tangent Lyapunov spectrum (per optimizer step)": ["Multiline", [rf"^{TANGENT_PREFIX}/exponent_\d+$"]],
            "positive exponents and Kaplan-Yorke dimension": [
                "Multiline", [rf"^{TANGENT_NUM_POSITIVE}$", rf"^{TANGENT_KAPLAN_YORKE}$"]],
            "sharpness and its threshold (2/lr for GD)": [
                "Multiline", [rf"^{SHARPNESS}$", rf"^{SHARPNESS_THRESHOLD}$"]],
            "preconditioned sharpness and (2 + 2 beta1)/((1 - beta1) lr) (Adam)": [
                "Multiline", [rf"^{PRECONDITIONED_SHARPNESS}$", rf"^{PRECONDITIONED_SHARPNESS_THRESHOLD}$"]],
        }
    }


def write_tangent_layout(trainer: Trainer, with_chaos_layout: bool) -> None:
    """Write the tangent charts (with the shadows' charts too when ``with_chaos_layout``: one layout per writer)."""
    layout = {**custom_scalars_layout(), **tangent_layout()} if with_chaos_layout else tangent_layout()
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_custom_scalars(layout)
