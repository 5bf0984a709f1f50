"""Onset of chaos along a learning-rate sweep: which η are chaotic, where chaos begins, and what to suggest."""

import math
from typing import Optional

import torch
from torch import Tensor

ONSET_RULES = ("efold", "baseline", "positive")
_NOTHING_LEARNED = (
    "the network learned at no learning rate of the grid within the probe window: widen the grid or raise"
    " `steps_per_lr`"
)


def chaotic_mask(
    exponents: Tensor,
    steps: int,
    rule: str = "efold",
    efolds: float = 1.0,
    baseline_factor: float = 10.0,
    baseline_points: int = 3,
) -> Tensor:
    """Which runs are chaotic, by an onset rule, from exponents Λ measured over ``steps`` optimizer steps.

    Rules:

    * ``"efold"`` (default): Λ·steps ≥ ``efolds``: the separation grew by at least e^efolds within the probe window.
      Minibatch SGD has a small near-neutral positive exponent (about 1e-4 to 1e-3 per step on small MLPs) across its
      whole stable range, which this rule ignores for probe windows of a few hundred steps, while the rise near
      divergence (1e-2 to 1e-1 per step) crosses it. The threshold scales with the window: a 100-step window needs
      Λ ≥ 0.01 per step.
    * ``"baseline"``: Λ ≥ ``baseline_factor`` × the neutral level, the median |Λ| of the ``baseline_points``
      smallest η of the sweep (their first axis). For sweeps whose windows are too long for the e-fold rule.
    * ``"positive"``: Λ > 0, the seed papers' definition, meaningful for full-batch GD from their N(0, 1)
      initialisation, where Λ(η) changes sign; under minibatch noise nearly every η is "positive".

    Non-finite exponents (a diverged shadow) count as chaotic when +inf or NaN-from-divergence is not
    distinguishable; callers flag diverged references separately.

    Args:
        exponents: Λ, shape [num_lrs] or [num_lrs, num_inits], first axis ordered by increasing η.
        steps: optimizer steps each Λ was measured over.
        rule: one of ``"efold"``, ``"baseline"``, ``"positive"``.
        efolds: e-foldings for ``"efold"``.
        baseline_factor: factor over the neutral level for ``"baseline"``.
        baseline_points: how many of the smallest η define the neutral level.

    Returns:
        A bool tensor shaped like ``exponents``.

    Raises:
        ValueError: for an unknown rule or non-positive parameters.
    """
    if rule not in ONSET_RULES:
        raise ValueError(f"`rule` must be one of {ONSET_RULES}, got {rule!r}")
    if steps <= 0:
        raise ValueError(f"`steps` must be positive, got {steps}")
    exponents = torch.as_tensor(exponents, dtype=torch.float64)
    diverged = torch.isnan(exponents) | (exponents == math.inf)
    if rule == "positive":
        chaotic = exponents > 0
    elif rule == "efold":
        if efolds <= 0:
            raise ValueError(f"`efolds` must be positive, got {efolds}")
        chaotic = exponents * steps >= efolds
    else:
        if baseline_factor <= 1 or baseline_points < 1:
            raise ValueError("`baseline_factor` must exceed 1 and `baseline_points` be at least 1")
        reference = exponents[:baseline_points].abs()
        neutral = reference[torch.isfinite(reference)].median() if torch.isfinite(reference).any() else torch.tensor(0.0)
        chaotic = exponents >= baseline_factor * max(neutral.item(), 1e-12)
    return chaotic | diverged


def regime(exponent: float, steps: int, efolds: float = 1.0) -> str:
    """The regime in words: ``"chaotic"``, ``"contracting"`` or ``"neutral"``, by the e-fold criterion.

    Over ``steps`` steps a separation growing (or shrinking) by at least e^efolds, |Λ|·steps ≥ efolds, is a clear
    departure; anything smaller is neutral at that horizon (minibatch SGD's weak positive drift usually is).
    Returns ``"undetermined"`` for a non-finite exponent.
    """
    if not math.isfinite(exponent):
        return "undetermined"
    if exponent * steps >= efolds:
        return "chaotic"
    if exponent * steps <= -efolds:
        return "contracting"
    return "neutral"


def onset_index(sensitive_fraction: Tensor, min_fraction: float = 0.5) -> Optional[int]:
    """Index of the first η (in increasing order) whose fraction ρ of chaotic runs reaches ``min_fraction``."""
    hits = (torch.as_tensor(sensitive_fraction) >= min_fraction).nonzero()
    return None if hits.numel() == 0 else int(hits[0, 0])


def edge_of_chaos_suggestion(
    lrs: Tensor,
    sensitive_fraction: Tensor,
    learning: Tensor,
    exponents: Tensor,
    margin: float = 1.5,
    min_fraction: float = 0.5,
) -> tuple[Optional[float], Optional[float], str]:
    """The learning rate at the edge of chaos approached from the ordered side: onset η* divided by ``margin``.

    η* is the first η whose fraction of chaotic runs ρ reaches ``min_fraction``. When that happens below every η
    at which the network learns (chaos on an initial loss plateau, seen on small CNNs), the whole learning band is
    chaotic and η* is taken as the first η above it at which learning fails. There is an edge to approach when
    the network still learns at η* (chaos while learning, the seed paper's band), or when it learns just below η*
    with a positive exponent there: the trajectory is already sensitive while learning, and the edge lies between
    the two grid points. When every learning η contracts (Λ ≤ 0) and chaos begins only where learning fails, as for
    gradient descent on a quadratic, there is no edge to use and the answer is None.

    The suggestion is η* / margin: it steps back from the rise, where training is sensitive enough to explore but not
    yet slowed by it; the default margin comes from the measurements in benchmarks/RESULTS.md.

    Args:
        lrs: the swept η, increasing.
        sensitive_fraction: ρ(η).
        learning: whether the reference run still learned at each η.
        exponents: Λ(η), mean over initialisations.
        margin: factor ≥ 1 to step back below the onset.
        min_fraction: ρ that marks the onset.

    Returns:
        ``(suggestion, onset, reason)``: None for both when no usable onset exists, with ``reason`` saying what to
        widen or why; ``reason`` is empty on success.
    """
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    learning = torch.as_tensor(learning, dtype=torch.bool)
    learning_indices = learning.nonzero()
    if learning_indices.numel() == 0:
        return None, None, _NOTHING_LEARNED
    first_learning = int(learning_indices[0, 0])
    index = onset_index(sensitive_fraction, min_fraction)
    if index is None:
        return None, None, (
            f"no learning rate up to max_lr={lrs[-1].item():.3g} was chaotic: widen the grid with a larger `max_lr`"
        )
    if index < first_learning:
        # Chaos begins on a loss plateau, before the network learns within the window: the whole learning band is
        # chaotic, and its edge is the first learning rate above it at which learning fails.
        failing = [i for i in range(first_learning, len(lrs)) if not learning[i]]
        if not failing:
            return None, None, (
                f"learning never fails up to max_lr={lrs[-1].item():.3g} and the whole learning band is chaotic:"
                " widen the grid with a larger `max_lr`"
            )
        edge = lrs[failing[0]].item()
        return edge / margin, edge, ""
    onset = lrs[index].item()
    if index == 0:
        return None, onset, (
            f"training is already chaotic at min_lr={onset:.3g}: lower `min_lr` to see the ordered side"
        )
    exponents = torch.as_tensor(exponents, dtype=torch.float64)
    sensitive_below = bool(learning[index - 1]) and bool(exponents[index - 1] > 0)
    if not learning[index] and not sensitive_below:
        return None, onset, (
            f"chaos appears at lr={onset:.3g} only where learning has already failed (loss did not decrease) and"
            " the trajectory contracts wherever it learns: there is no learning chaotic band in the grid; pick a"
            " learning rate below it"
        )
    return onset / margin, onset, ""


def past_the_edge(exponents: Tensor, learned: Tensor, steps: int, rule: str = "efold") -> bool:
    """Whether a sweep trained in increasing η is past its edge: its latest η is chaotic (ρ ≥ ½ by ``rule``) and no
    longer learns (by majority), after some smaller η learned. Larger η then only fail faster.

    Args:
        exponents: Λ per η (increasing) and initialisation, [num_lrs, num_inits].
        learned: whether each run learned, the same shape.
        steps: the optimizer steps each Λ was measured over.
        rule: the onset rule (:func:`chaotic_mask`).
    """
    learning = torch.as_tensor(learned, dtype=torch.float64).mean(1) >= 0.5
    if bool(learning[-1]) or not bool(learning.any()):
        return False
    return bool(chaotic_mask(exponents, steps, rule=rule)[-1].double().mean() >= 0.5)


def refinement_bracket(lrs: Tensor, anchor: Optional[float], below: bool) -> Optional[tuple[float, float]]:
    """The grid interval next to ``anchor`` worth refining: the one just below it (``below``, the onset of chaos,
    which is the first chaotic η) or just above it (the top of the learning band, the last η that learns well).
    None without an anchor or when it is the grid's end on that side."""
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    if anchor is None:
        return None
    if below:
        return None if anchor <= lrs[0].item() else (lrs[lrs < anchor][-1].item(), anchor)
    return None if anchor >= lrs[-1].item() else (anchor, lrs[lrs > anchor][0].item())


LEARNS_WELL_TOLERANCE = 1.25  # trainability_edge_suggestion's default: "learns well" = within 1.25x the best loss ratio


def learns_well_threshold(best_ratio: float, tolerance: float = LEARNS_WELL_TOLERANCE) -> float:
    """The largest loss ratio that still "learns well": ``tolerance`` × the best ratio for a positive best, and the
    same distance above it, (``tolerance`` − 1)·|best|, when the loss crossed zero (best ≤ 0)."""
    return best_ratio + (tolerance - 1) * abs(best_ratio)


def learning_band(
    lrs: Tensor, loss_ratio: Tensor, learning: Tensor, tolerance: float = LEARNS_WELL_TOLERANCE
) -> Optional[tuple[float, float]]:
    """The smallest and the largest η that learn *well*: that learn, and whose loss ratio is within ``tolerance`` ×
    the sweep's best (the same distance above it when the best is ≤ 0; :func:`learns_well_threshold`).

    The range for a cyclic schedule: ``CyclicLR(base_lr=low, max_lr=high)`` cycles through η that all learned within
    ``tolerance`` of the best over the sweep's window, and ``OneCycleLR(max_lr=high)`` peaks at the largest η that
    still did at a constant rate (its warm-up and annealing spend most steps below it). Between the two ends an η may
    learn less well (a band with a hole); the ends are read off the grid, so they are as fine as the grid there (the
    finder refines it just above the top, not at the bottom).

    Args:
        lrs: the swept η, increasing.
        loss_ratio: the loss ratio per η (NaN for a diverged run).
        learning: whether the reference run still learned at each η.
        tolerance: how much worse than the best loss ratio still counts as learning well (≥ 1).

    Returns:
        ``(low, high)``, or None when nothing learns.

    Raises:
        ValueError: for a ``tolerance`` below 1.
    """
    if not tolerance >= 1:
        raise ValueError(f"`tolerance` must be >= 1, got {tolerance!r}")
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    loss_ratio = torch.as_tensor(loss_ratio, dtype=torch.float64)
    learning = torch.as_tensor(learning, dtype=torch.bool) & torch.isfinite(loss_ratio)
    if not learning.any():
        return None
    well = (learning & (loss_ratio <= learns_well_threshold(loss_ratio[learning].min().item(), tolerance))).nonzero()
    return lrs[int(well[0, 0])].item(), lrs[int(well[-1, 0])].item()


SPEED_LEVEL = 0.9  # speed_band_top's default: how far down from the first loss to the sweep's best end-of-window loss


def speed_band_top(
    lrs: Tensor,
    losses: Tensor,
    learning: Tensor,
    level: float = SPEED_LEVEL,
    tolerance: float = LEARNS_WELL_TOLERANCE,
    smoothing: int = 5,
) -> Optional[float]:
    """The largest η that gets down *fast*: the top of the speed band of a learning-rate sweep.

    The loss level is L* = L_0 − ``level`` · (L_0 − min_η L̄_end), ``level`` of the way from the first loss L_0 (at the
    initial parameters, the same for every η) down to the best end-of-window loss of the sweep (L̄_end: the mean over
    the window's last quarter). For each η that learned and stayed finite, s(η) is the first step at which the running
    mean of its loss over ``smoothing`` steps falls below L*. The band is the η with s(η) ≤ ``tolerance`` · min s + 1,
    and its top is returned.

    Why: the end-of-window band (:func:`learning_band`) sees where an η ends the window, not how fast it got there. On
    an easy task every η from 1e-3 to 10 can end the window low, and the band's top then lies 10× above the fastest η
    (benchmarks/FINDER_RESULTS.md, fifth held-out set). A level 90 % of the way down separates the η that get there in a
    few steps from those that need the whole window; half way is reached early by almost every η that learns. The
    running mean keeps one lucky minibatch from counting; the + 1 step keeps a band at all when the fewest is 1–3
    steps.

    Failure modes: taken alone it rewards η that get down fast and then stall or blow up just after the level (on a
    deep ReLU MLP its suggestion never reached the target), which is why the finder caps it by the end-of-window band's
    top (:func:`trainability_edge_suggestion` with ``losses``). Like the end band it reads the training loss of the
    window: it cannot see an η whose validation accuracy first touches a target while its loss is not yet low (a 2-D
    toy task, `moons_sgd`, where every rule missed).

    Args:
        lrs: the swept η, increasing.
        losses: the training loss per η and optimizer step, [num_lrs, steps] (NaN after a diverged run stopped).
        learning: whether each η learned.
        level: the share of the way down that defines the level, in (0, 1].
        tolerance: how many times the fewest steps still count as fast (≥ 1).
        smoothing: the running mean's width in steps (≥ 1).

    Returns:
        The top of the band, or None when no η learned or reached the level.

    Raises:
        ValueError: for ``level`` outside (0, 1], ``tolerance`` below 1 or ``smoothing`` below 1.
    """
    if not 0 < level <= 1 or not tolerance >= 1 or isinstance(smoothing, bool) or not smoothing >= 1:
        raise ValueError(
            f"`level` must be in (0, 1], `tolerance` >= 1 and `smoothing` >= 1, got {level!r}, {tolerance!r} and"
            f" {smoothing!r}"
        )
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    ok = torch.as_tensor(learning, dtype=torch.bool) & torch.isfinite(losses).all(1)
    if not ok.any() or losses.shape[1] < smoothing:
        return None
    quarter = max(1, losses.shape[1] // 4)
    first = losses[ok, 0].median()
    level_loss = first - level * (first - losses[ok, -quarter:].mean(1).min())
    running = losses.unfold(1, smoothing, 1).mean(2)  # running[i, j]: the mean of steps j … j + smoothing − 1
    below = (running < level_loss) & ok[:, None]
    reached = below.any(1)
    if not reached.any():
        return None
    steps = below.double().argmax(1) + (smoothing - 1)  # the step at which that running mean is first known
    fast = reached & (steps <= tolerance * steps[reached].min() + 1)
    return lrs[fast].max().item()


def trainability_edge_suggestion(
    lrs: Tensor,
    loss_ratio: Tensor,
    learning: Tensor,
    margin: float = 1.5,
    tolerance: float = LEARNS_WELL_TOLERANCE,
    losses: Optional[Tensor] = None,
) -> tuple[Optional[float], Optional[float], str]:
    """The learning rate just below the top of the learning band: its edge η_edge divided by ``margin``.

    η_edge is the largest η that learns *well* within the probe window: the loss ratio (mean loss over the window's
    last quarter / loss at the initial parameters) is within ``tolerance`` × the best ratio of the sweep (for a best
    ratio ≤ 0, a loss that crossed zero: within (``tolerance`` − 1)·|best| above it). "Learns at
    all" (ratio < 0.95) is too lenient: near divergence a run can lower its loss by 10-20 % in the window and then
    never reach a good accuracy (seen on a small CNN on Fashion-MNIST). With ``losses`` (each η's loss per step, as
    the finder passes them) η_edge is also capped by the top of the speed band (:func:`speed_band_top`): where the
    window's end cannot tell η apart, how fast they got down can.

    Why this anchor (the finder's default): on 14 of the first 15 benchmark tasks (benchmarks/FINDER_RESULTS.md) the
    fastest η sat at or just below the largest η that still learns well (under adaptive optimizers 2–3× below it),
    and the trajectory was already chaotic there. On tanh networks under SGD the onset of chaos coincides with that
    edge. On ReLU MLPs and under Adam the onset lies far below it, and :func:`edge_of_chaos_suggestion` suggests too
    small an η. On CNNs whose initial loss plateau is already chaotic the onset rule falls back to the first failing η
    above the band, and its suggestion can land where training never reaches a good accuracy.

    Defaults: ``tolerance`` 1.25 was set on eight tasks and tested on seven more. ``margin`` 1.5 was chosen for the
    onset anchor on five tasks and kept. Below the edge τ grows about like 1/η under SGD, so ``margin`` is also
    roughly what the step back costs when the edge is exact. Under adaptive optimizers the end band's top lies further
    above the fastest η, and :class:`~lightning_chaos.ChaosLRFinder` by default divides by 2 there (2.5 before the
    speed band capped the top; both chosen on design tasks and adopted by rules fixed before held-out sets ran;
    benchmarks/FINDER_RESULTS.md).

    Failure modes: where τ(η) is flat over a wide band and the loss keeps improving past the fastest η (adaptive
    optimizers), the end band's top lies 2–3× above the fastest η (edge/1.5 cost 1.31× the best τ on the digits MLP
    under Adam); the speed band and the larger margin correct most of it. Where the edge sits at the fastest η, a
    margin costs what it steps back. On tasks that reach the target in a few steps a margin costs steps the target
    allows few of (1.71× on a breast-cancer MLP under AdamW: 12 steps against 7), and where the fastest η lies above
    what the window still sees learning (a 2-D toy whose accuracy swings around the target) every margin overshoots
    the other way. A window too short for the loss to separate the η (``steps_per_lr``) blurs the band's top. The
    loss is measured on the training batches of the window, so a band top set by overfitting would not show.

    Reference: the same idea as the LR range test (L. N. Smith, "Cyclical learning rates for training neural
    networks", WACV 2017, arXiv:1506.01186), which reads the usable learning rates off the loss, but with a fixed
    η per run instead of a ramp. That large learning rates train fastest up to a sharp trainability boundary is the
    "catapult" picture of Lewkowycz et al., "The large learning rate phase of deep learning" (arXiv:2003.02218).

    Args:
        lrs: the swept η, increasing.
        loss_ratio: the loss ratio per η (NaN for a diverged run).
        learning: whether the reference run still learned at each η.
        margin: factor ≥ 1 to step back below the edge.
        tolerance: how much worse than the sweep's best loss ratio still counts as learning well.
        losses: each η's training loss per step, [num_lrs, steps] (NaN after a diverged run stopped): caps the edge
            by the speed band's top. None: the end band alone.

    Returns:
        ``(suggestion, edge, reason)``. The suggestion is None, with ``reason``, when nothing learns (then the edge is
        None too) or when the band reaches ``max_lr`` (then the edge is the last η).

    Raises:
        ValueError: for a ``margin`` or ``tolerance`` below 1.
    """
    if not margin >= 1 or not tolerance >= 1:
        raise ValueError(f"`margin` and `tolerance` must be >= 1, got {margin!r} and {tolerance!r}")
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    band = learning_band(lrs, loss_ratio, learning, tolerance)
    if band is None:
        return None, None, _NOTHING_LEARNED
    edge = band[1]
    if losses is not None:  # how fast, not only where the window ends: the lower of the two tops
        fast = speed_band_top(lrs, losses, learning, tolerance=tolerance)
        edge = edge if fast is None else min(edge, fast)
    if edge == lrs[-1].item():
        return None, edge, (
            f"the network still learns well at max_lr={edge:.3g}: widen the grid with a larger `max_lr`"
        )
    return edge / margin, edge, ""
