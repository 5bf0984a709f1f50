"""The edge-of-chaos guideline for weight decay: balance the growth of the coupling spread J² against the decay.

Zhang, Feng, Chen & Lai (2021) train 784 → Dense(784, tanh) → Dense(10) on Fashion-MNIST with heavy-ball SGD and find
that, in the ordered phase, the order parameter J² = N·Var(W) of the square hidden weight grows linearly in time,

    J²(t) ≈ 0.25 + A·t,   A ≈ k · η / ((1 − α) B)  per epoch of S samples,   k ≈ 11 (Fashion-MNIST),

so that J² is a function of τ = Σ_steps η/(1 − α), the time of the gradient flow that heavy ball follows at small η,
alone (an epoch of S samples lasts τ_epoch = S·η/((1 − α)B)). Weight decay pulls the other way; J settles where the
two balance, and the authors' guideline is to pick the decay that holds J at the edge, J = 1. This module turns that
balance into a formula a user can apply to their own model from one short measured run.

References:
    Zhang, Feng, Chen & Lai, "Edge of chaos as a guiding principle for modern neural network training",
    arXiv 2107.09437 (2021).
    Feng, Zhang & Lai, "Optimal machine intelligence at the edge of chaos", arXiv 1909.05176 (2019).
"""

import math
from typing import NamedTuple

SCALING_LIMIT = 0.005
"""Largest s = η/((1 − α)B) at which J²(τ) stayed on one curve for the papers' model on Fashion-MNIST (examples/
reproduce_edge_of_chaos.py): up to 0.005, configurations with the same s agreed within 3 % and k rose only from 10 to
12 between s = 0.00125 and 0.005; at s = 0.01 gradient noise added 20–30 % more growth, at 0.02 J² ran away. The step
must also be stable on its own: η/(1 − α) = 0.64 diverged at α = 0.5 and trained at α = 0.9."""


class EdgeOfChaosGuideline(NamedTuple):
    """The suggestion of :func:`edge_of_chaos_guideline`."""

    weight_decay: float
    """λ of an L2 penalty λ‖W‖² added to the loss (Keras ``l2(λ)``, the papers' convention): the gradient gains 2λW."""
    torch_weight_decay: float
    """2λ: the same decay as ``torch.optim.SGD(..., weight_decay=2λ)`` (which adds weight_decay·W to the gradient)."""
    growth_rate: float
    """g: the growth of J² per unit of τ = Σ η/(1 − α) that the decay must balance (measured slope plus the decay's
    share, 4λ₀J², when the measured run already had a decay λ₀)."""
    coefficient: float
    """k = g·S: the papers' coefficient in A = k·η/((1 − α)B) per epoch (≈ 11 on their Fashion-MNIST model)."""
    relaxation_epochs: float
    """Epochs, at the given η, B, α, for the distance of J² to its balance to shrink by a factor e: 1/(4λ) in τ."""
    max_learning_rate: float
    """The largest η with η/((1 − α)B) ≤ ``scaling_limit``: the fastest setting expected to keep the growth law
    (and so the balance) of the measured run, provided the step itself is stable (check the loss)."""


def _positive(name: str, value: object, allow_zero: bool = False) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {bound} finite number, got {value!r}")
    return number


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def edge_of_chaos_guideline(
    j2_slope: float,
    learning_rate: float,
    batch_size: int,
    num_samples: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    j2: float = 0.0,
    target_j: float = 1.0,
    scaling_limit: float = SCALING_LIMIT,
) -> EdgeOfChaosGuideline:
    """The weight decay λ that holds the order parameter J of a square tanh layer at ``target_j`` (the edge: 1).

    Measure J² = N·Var(W) of the square weight for a few epochs of heavy-ball SGD (learning rate η, momentum α, batch
    B, S samples per epoch), e.g. with :class:`~lightning_chaos.EdgeOfChaosMonitor` or
    :func:`~lightning_chaos.functional.order_parameters`, and fit its slope A per epoch. With τ = Σ η/(1 − α) the
    gradient-flow time, τ_epoch = S·η/((1 − α)B), an L2 penalty λ‖W‖² (gradient 2λW, so with the momentum's gain W
    shrinks at rate 2λ and J² at rate 4λ per unit τ):

        dJ²/dτ = g − 4λJ²,   g = A / τ_epoch + 4 λ₀ J²₀,   balance J²_∞ = g / (4λ),

        λ = g / (4 J_target²),   torch weight_decay = 2λ,   relaxation 1/(4λ) in τ = 1/(4λ τ_epoch) epochs,

    where λ₀ is the decay the measured run had (0 for the papers' recipe: a plain run) and J²₀ its mean J² over the
    fitted window. With the papers' recorded slopes, A = 11·η/((1 − α)B), so g = 11/S and λ = 11/(4S) = 4.6e-5 on
    Fashion-MNIST (S = 60 000) whatever η, B and α: the balance does not depend on the speed, only the time to reach it
    does, which is why the guideline then takes the largest η/((1 − α)B) that keeps the growth law
    (``max_learning_rate``).

    Defaults and why: ``target_j = 1`` is the mean-field edge of x ↦ tanh(Wx) for |J0/J| < 1 (beyond it the edge moves
    up, see :func:`~lightning_chaos.functional.edge_of_chaos_boundary`); ``scaling_limit = 0.005`` is where the growth
    law held on Fashion-MNIST (:data:`SCALING_LIMIT`).

    Failure modes:

    * g is not a constant. Measured on Fashion-MNIST (examples/reproduce_edge_of_chaos.py), the growth *under* decay
      is 1.4–2.0× the growth of a plain run (the decay keeps the loss, and so the gradient, larger), so the naive
      balance 11/(4S) = 4.6e-5 is too small: J settles at 1 for λ ≈ 7e-5 there. Apply the function again to a run
      at a trial λ (pass ``weight_decay`` and its window's ``j2``): a round multiplies λ by J²_measured/J²_target, and
      since J² fell like λ^−0.9 there, one round shrinks the error in ln λ about tenfold (from a trial λ = 1e-3,
      fourteen times too large, one round gave 9.2e-5).
    * A plain run's early slope includes a fast transient; on a small data set that the network fits, J² grows
      ever more slowly (it is not linear at all): the slope then depends on the window, and only the second round
      (a run with decay, which has a true balance) is reliable.
    * The law is for heavy-ball SGD with a constant η. Adam's step does not scale with the gradient, so g and the
      decay's rate are both different: do not use this for Adam or AdamW.
    * J = 1 is the edge for |J0/J| < 1 and i.i.d.-looking weights; check the measured J0 and, for the map itself,
      :func:`~lightning_chaos.functional.map_lyapunov_exponent`.

    Args:
        j2_slope: A, the fitted slope of J² per epoch (of ``num_samples`` samples) over the measured window.
        learning_rate: η of the measured run (> 0).
        batch_size: B of the measured run (≥ 1).
        num_samples: S, the samples per epoch (≥ 1).
        momentum: α of the measured run's heavy ball, 0 ≤ α < 1 (torch's ``momentum``, Keras's ``momentum``).
        weight_decay: λ₀, the L2 coefficient (Keras ``l2``, half of torch's ``weight_decay``) of the measured run
            (≥ 0).
        j2: J²₀, the mean J² over the fitted window; needed (> 0) when ``weight_decay`` > 0, ignored otherwise.
        target_j: the J to hold (> 0), default the edge, 1.
        scaling_limit: the largest η/((1 − α)B) that keeps the growth law (> 0), for ``max_learning_rate``.

    Returns:
        An :class:`EdgeOfChaosGuideline`.

    Raises:
        ValueError: for an argument out of its range (the message names it), a missing ``j2`` with a decay, or a
            growth g ≤ 0 (J² is not growing: there is nothing to balance).

    Example:
        >>> # the papers' law at their defaults (η = 0.02, B = 32, α = 0.5): A = 11·0.02/(0.5·32) per epoch
        >>> g = edge_of_chaos_guideline(11 * 0.02 / (0.5 * 32), 0.02, 32, 60_000, momentum=0.5)
        >>> f"{g.weight_decay:.3g}", f"{g.torch_weight_decay:.3g}", round(g.coefficient, 6), round(g.relaxation_epochs)
        ('4.58e-05', '9.17e-05', 11.0, 73)
        >>> round(g.max_learning_rate, 3)  # η/((1 − α)B) = 0.005
        0.08
        >>> # a second round from a run at that decay that settled at J² = 1.5 (slope 0): λ grows by 1.5
        >>> again = edge_of_chaos_guideline(0.0, 0.02, 32, 60_000, 0.5, weight_decay=g.weight_decay, j2=1.5)
        >>> f"{again.weight_decay:.3g}"
        '6.88e-05'
    """
    if isinstance(j2_slope, bool) or not isinstance(j2_slope, (int, float)) or not math.isfinite(j2_slope):
        raise ValueError(f"`j2_slope` must be a finite number (J² per epoch), got {j2_slope!r}")
    eta = _positive("learning_rate", learning_rate)
    batch = _count("batch_size", batch_size)
    samples = _count("num_samples", num_samples)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be a number with 0 <= momentum < 1, got {momentum!r}")
    decay = _positive("weight_decay", weight_decay, allow_zero=True)
    j2_0 = _positive("j2", j2, allow_zero=True)
    if decay > 0 and j2_0 == 0:
        raise ValueError(f"`j2` must be the measured window's mean J² (> 0) when `weight_decay` > 0, got {j2!r}")
    target = _positive("target_j", target_j)
    limit = _positive("scaling_limit", scaling_limit)

    tau_per_epoch = samples * eta / ((1.0 - momentum) * batch)
    growth = j2_slope / tau_per_epoch + 4.0 * decay * j2_0
    if growth <= 0:
        raise ValueError(
            f"`j2_slope` = {j2_slope!r} with weight_decay = {decay!r}, j2 = {j2_0!r} gives a growth g = {growth:.3g} "
            "<= 0 per unit τ: J² is not growing, so there is no growth for a decay to balance"
        )
    lam = growth / (4.0 * target * target)
    return EdgeOfChaosGuideline(
        weight_decay=lam,
        torch_weight_decay=2.0 * lam,
        growth_rate=growth,
        coefficient=growth * samples,
        relaxation_epochs=1.0 / (4.0 * lam * tau_per_epoch),
        max_learning_rate=limit * (1.0 - momentum) * batch,
    )
