"""Pure estimators on tensors: distances between parameter vectors and Lyapunov exponents.

Everything here works on recorded arrays without a Trainer, in the spirit of ``torchmetrics.functional``.
"""

from lightning_chaos.functional.distance import flat_norm, parameter_distance
from lightning_chaos.functional.exponents import (
    WindowFit,
    benettin_exponent,
    best_window_fit,
    default_fit_windows,
    finite_time_exponent,
    network_mle,
    saturation_cut,
    window_fit_before_saturation,
)

__all__ = [
    "WindowFit",
    "benettin_exponent",
    "best_window_fit",
    "default_fit_windows",
    "finite_time_exponent",
    "flat_norm",
    "network_mle",
    "parameter_distance",
    "saturation_cut",
    "window_fit_before_saturation",
]
