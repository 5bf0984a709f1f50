"""Pure estimators on tensors: distances between parameter vectors, Lyapunov exponents of the training trajectory,
the edge of chaos of the network's own map, and the tangent-space pieces (QR renormalisation, the sharpness, the
optimizers' linearised updates).

Everything here works on recorded arrays without a Trainer, in the spirit of ``torchmetrics.functional``.
"""

from lightning_chaos.functional.distance import flat_norm, parameter_distance
from lightning_chaos.functional.edge import (
    OrderParameters,
    asymptotic_jacobian_norm,
    edge_of_chaos_boundary,
    map_lyapunov_exponent,
    mean_field_chi,
    order_parameters,
)
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
from lightning_chaos.functional.guideline import (
    EdgeOfChaosGuideline,
    edge_of_chaos_guideline,
)
from lightning_chaos.functional.tangent import (
    TopEigen,
    adam_preconditioner,
    adam_sharpness_threshold,
    adam_tangent_step,
    clip_tangent,
    gd_sharpness_threshold,
    hessian_top_eigenvalue,
    kaplan_yorke_dimension,
    qr_renormalize,
    sgd_tangent_step,
)

__all__ = [
    "EdgeOfChaosGuideline",
    "OrderParameters",
    "TopEigen",
    "WindowFit",
    "adam_preconditioner",
    "adam_sharpness_threshold",
    "adam_tangent_step",
    "asymptotic_jacobian_norm",
    "benettin_exponent",
    "best_window_fit",
    "clip_tangent",
    "default_fit_windows",
    "edge_of_chaos_boundary",
    "edge_of_chaos_guideline",
    "finite_time_exponent",
    "flat_norm",
    "gd_sharpness_threshold",
    "hessian_top_eigenvalue",
    "kaplan_yorke_dimension",
    "map_lyapunov_exponent",
    "mean_field_chi",
    "network_mle",
    "order_parameters",
    "parameter_distance",
    "qr_renormalize",
    "saturation_cut",
    "sgd_tangent_step",
    "window_fit_before_saturation",
]
