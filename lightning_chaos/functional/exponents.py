"""Lyapunov-exponent estimators on recorded distances d(t) between a trajectory and its perturbed copy.

All functions take plain tensors and work without a Trainer. Time is counted in optimizer steps (one step of the
training map θ(t+1) = U(θ(t), batch_t, η_t)), so every exponent is *per optimizer step*.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class WindowFit(NamedTuple):
    """Result of :func:`best_window_fit`; every field has one entry per fitted series."""

    exponent: Tensor
    """Slope Λ of ln d(t) on the chosen window (per step)."""
    intercept: Tensor
    """ln d at the window's first step, as fitted."""
    r2: Tensor
    """Coefficient of determination of the chosen window (NaN when no window held finite, varying data)."""
    start: Tensor
    """First step of the chosen window."""
    width: Tensor
    """Number of points in the chosen window."""


def default_fit_windows(num_points: int) -> tuple[list[int], list[int]]:
    """The window grid of the best-R² search, scaled to a series of ``num_points`` values.

    Danovski, Soriano & Lacasa (2024) fit 201-point series on windows starting at t₁ = 0, 5, …, 100 with widths
    w = 30, 35, …, 100. This grid keeps those proportions for any length T: a stride s = max(1, T // 40), starts
    0, s, …, up to (T − 1) / 2 and widths from 15 % to 50 % of the series (at least 3 points), so that for T = 201 it
    is exactly the paper's grid.

    Args:
        num_points: T, the length of the series (t = 0 included).

    Returns:
        ``(starts, widths)``; only windows with ``start + width <= num_points`` are meant to be used.

    Raises:
        ValueError: if ``num_points < 4`` (too short to tell a slope from noise).
    """
    if num_points < 4:
        raise ValueError(f"`num_points` must be at least 4 to fit a slope, got {num_points}")
    stride = max(1, num_points // 40)
    last = num_points - 1
    starts = list(range(0, last // 2 + 1, stride))
    min_width = max(3, round(0.15 * last))
    max_width = max(min_width, last // 2)
    widths = list(range(min_width, max_width + 1, stride))
    return starts, widths


def best_window_fit(
    log_distances: Tensor, starts: Optional[list[int]] = None, widths: Optional[list[int]] = None
) -> WindowFit:
    """Local Lyapunov exponent Λ by the best-R² window search (free evolution, no renormalisation).

    In the chaotic regime ln d(t) ≈ ln d(0) + Λ t during an exponential phase that ends when the separation
    saturates. The phase is found by fitting a least-squares line to ln d on every window [t₁, t₁ + w) of the grid
    and keeping the window with the largest R² (Danovski, Soriano & Lacasa, arXiv 2404.05782, 2024):

        Λ = Σ (t − t̄)(y − ȳ) / Σ (t − t̄)²,   R² = [Σ (t − t̄)(y − ȳ)]² / [Σ (t − t̄)² Σ (y − ȳ)²],   y = ln d.

    All windows are evaluated at once from prefix sums, O(T + windows).

    Failure modes: once d saturates the best window may sit on the plateau (Λ ≈ 0 with a poor R²): read R², and
    shorten the run or shrink ε. A window touching a non-finite value (d = 0, or a diverged shadow) is skipped; a
    perfectly flat series has no defined R² (NaN) and slope 0. A contracting series is fitted the same way and gives
    Λ < 0. Too short a series (T < 4) raises.

    Args:
        log_distances: ln d(t), shape [T] or [T, K] (K series fitted independently).
        starts: first steps t₁ of the windows; default from :func:`default_fit_windows`.
        widths: window lengths w (≥ 3 points); default from :func:`default_fit_windows`.

    Returns:
        A :class:`WindowFit` of float64 tensors of shape [] for a [T] input, [K] for a [T, K] input.

    Raises:
        ValueError: for a series shorter than 4 points, widths below 3, or a grid with no window inside the series.

    Example:
        >>> t = torch.arange(50, dtype=torch.float64)
        >>> fit = best_window_fit(-3.0 + 0.2 * t)
        >>> round(fit.exponent.item(), 6), round(fit.r2.item(), 6)
        (0.2, 1.0)
    """
    y = torch.as_tensor(log_distances).detach().to("cpu", torch.float64)
    squeeze = y.dim() == 1
    if squeeze:
        y = y.unsqueeze(1)
    if y.dim() != 2:
        raise ValueError(f"`log_distances` must have shape [T] or [T, K], got {tuple(log_distances.shape)}")
    num_points = y.shape[0]
    default_starts, default_widths = default_fit_windows(num_points)
    starts = default_starts if starts is None else list(starts)
    widths = default_widths if widths is None else list(widths)
    if any(w < 3 for w in widths):
        raise ValueError(f"`widths` must all be at least 3, got {widths}")
    pairs = [(s, w) for s in starts for w in widths if s >= 0 and s + w <= num_points]
    if not pairs:
        raise ValueError(f"no window of starts={starts}, widths={widths} fits in a series of {num_points} points")

    finite = torch.isfinite(y)
    # Shift by a finite reference so that the prefix sums of y² do not cancel catastrophically.
    reference = torch.where(finite, y, torch.nan).nanmean(0).nan_to_num(0.0)
    yc = torch.where(finite, y - reference, torch.zeros_like(y))
    t = torch.arange(num_points, dtype=torch.float64).unsqueeze(1)

    def prefix(values: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(values[:1]), values.cumsum(0)])

    p_y, p_ty, p_yy = prefix(yc), prefix(t * yc), prefix(yc * yc)
    p_bad = prefix((~finite).to(torch.float64))

    s = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    w = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    e = s + w
    n = w.to(torch.float64).unsqueeze(1)
    t_mean = s.to(torch.float64).unsqueeze(1) + (n - 1) / 2
    sum_y = p_y[e] - p_y[s]
    s_ty = (p_ty[e] - p_ty[s]) - t_mean * sum_y  # Σ (t − t̄) y
    s_tt = n * (n * n - 1) / 12  # Σ (t − t̄)² of n consecutive integers, exact
    s_yy = (p_yy[e] - p_yy[s]) - sum_y * sum_y / n  # Σ (y − ȳ)²
    slope = s_ty / s_tt
    r2 = s_ty * s_ty / (s_tt * s_yy)
    valid = (p_bad[e] - p_bad[s]) == 0
    r2 = torch.where(valid & (s_yy > 0), r2.clamp(max=1.0), torch.nan)

    # Best R² per series; a series without any valid window falls back to its widest all-finite window (or NaN).
    best = torch.where(torch.isnan(r2), -math.inf, r2).argmax(0)
    no_fit = torch.isnan(r2).all(0)
    if no_fit.any():
        widest = torch.where(valid, n.expand_as(valid), -1.0).argmax(0)
        best = torch.where(no_fit, widest, best)
    cols = torch.arange(y.shape[1])
    exponent = slope[best, cols]
    exponent = torch.where(valid[best, cols], exponent, torch.nan)
    intercept = (sum_y[best, cols] / n[best, 0]) + reference - exponent * (n[best, 0] - 1) / 2
    fit = WindowFit(exponent, intercept, r2[best, cols], s[best].to(torch.float64), w[best].to(torch.float64))
    if squeeze:
        fit = WindowFit(*(f.squeeze(0) for f in fit))
    return fit


def saturation_cut(log_distances: Tensor, margin: float = 1.0, min_growth: float = 3.0) -> Tensor:
    """Where the exponential phase ends: the first t at which ln d(t) comes within ``margin`` of its maximum.

    Returns, per series, the number of points to keep, [0, cut): the end of the series when it did not grow by at
    least ``min_growth`` e-folds above its start (contracting, neutral or slowly drifting separations have no
    saturation to cut off), else one past the first point within ``margin`` of the maximum.

    Args:
        log_distances: ln d(t), shape [T] or [T, K].
        margin: distance below the maximum, in e-folds, that counts as saturated (1: within a factor e).
        min_growth: e-folds of growth above ln d(0) below which nothing is cut.

    Returns:
        A long tensor of shape [] or [K].
    """
    y = torch.as_tensor(log_distances).detach().to("cpu", torch.float64)
    squeeze = y.dim() == 1
    y = y.unsqueeze(1) if squeeze else y
    cuts = torch.full((y.shape[1],), y.shape[0], dtype=torch.long)
    for k in range(y.shape[1]):
        column = y[:, k]
        finite = torch.isfinite(column)
        if not finite.any() or not torch.isfinite(column[0]):
            continue
        top = column[finite].max()
        if top - column[0] >= min_growth:
            cuts[k] = int(torch.nonzero(finite & (column >= top - margin))[0, 0]) + 1
    return cuts.squeeze(0) if squeeze else cuts


def window_fit_before_saturation(log_distances: Tensor, margin: float = 1.0, min_growth: float = 3.0) -> WindowFit:
    """:func:`best_window_fit` of each series restricted to its exponential phase, before :func:`saturation_cut`.

    The papers' grid has windows of at least 15 % of the series: a separation that grows for only 20 of 200 steps
    and then saturates is fitted on its plateau (Λ ≈ 0 with a high R², measured on the seed paper's MNIST protocol
    at large η). Cutting each series where it saturates first and scaling the window grid to what is left recovers
    the exponential phase; series that never grew by ``min_growth`` e-folds are fitted whole, exactly as
    :func:`best_window_fit` does. Too short a phase (under 4 points) falls back to the whole series.

    Args:
        log_distances: ln d(t), shape [T] or [T, K].
        margin: see :func:`saturation_cut`.
        min_growth: see :func:`saturation_cut`.

    Returns:
        A :class:`WindowFit` like :func:`best_window_fit`'s, windows indexed in the original series.
    """
    y = torch.as_tensor(log_distances).detach().to("cpu", torch.float64)
    squeeze = y.dim() == 1
    y = y.unsqueeze(1) if squeeze else y
    cuts = saturation_cut(y, margin, min_growth)
    fits = [best_window_fit(y[: int(cut) if cut >= 4 else None, k]) for k, cut in enumerate(cuts.tolist())]
    fit = WindowFit(*(torch.stack(field) for field in zip(*fits)))
    return WindowFit(*(f.squeeze(0) for f in fit)) if squeeze else fit


def finite_time_exponent(distances: Tensor) -> Tensor:
    """Finite-time exponent over the whole series: Λ_T = ln(d(T) / d(0)) / T.

    The crudest estimate: right when the whole run is one exponential phase, biased towards 0 once d saturates
    (then prefer :func:`best_window_fit`) and by the alignment transient of the first steps.

    Args:
        distances: d(t), shape [T + 1] or [T + 1, K] with T ≥ 1.

    Returns:
        float64 tensor of shape [] or [K].

    Raises:
        ValueError: if fewer than 2 points are given.
    """
    d = torch.as_tensor(distances).detach().to("cpu", torch.float64)
    if d.shape[0] < 2:
        raise ValueError(f"`distances` needs at least 2 points, got {d.shape[0]}")
    return torch.log(d[-1] / d[0]) / (d.shape[0] - 1)


def benettin_exponent(log_growth_sum: Tensor, steps: int) -> Tensor:
    """Maximal Lyapunov exponent by the two-trajectory method with renormalisation (Benettin et al. 1980).

    Every N steps the separation is measured, ln(d / d_prev) is added to a sum and the perturbed trajectory is
    pulled back along the separation to d0 (d_prev: the distance right after the previous pull-back). Then

        λ = Σ ln(d / d_prev) / elapsed steps.

    Renormalising keeps the separation infinitesimal, so λ never saturates, and aligns it with the fastest-growing
    direction (as ChaosTools.jl's ``lyapunov``). The first segments carry the alignment transient: the bias decays as
    1 / steps, so run long enough (hundreds of steps) for a tight estimate.

    Args:
        log_growth_sum: Σ ln(d / d_prev) per shadow (any shape).
        steps: elapsed optimizer steps (> 0).

    Returns:
        ``log_growth_sum / steps``; ±inf and NaN pass through (a separation that overflowed, a retired shadow).

    Raises:
        ValueError: if ``steps`` is not positive.
    """
    if steps <= 0:
        raise ValueError(f"`steps` must be positive, got {steps}")
    return torch.as_tensor(log_growth_sum) / steps


def network_mle(
    exponents: Tensor, r2: Tensor, min_r2: float = 0.9, min_exponent: float = 0.05
) -> tuple[float, float, int]:
    """Network maximal Lyapunov exponent λ_nMLE: mean and std of the local exponents of well-fitted chaotic runs.

    The selection of Danovski, Soriano & Lacasa (2024): keep initial conditions whose best window has R² > ``min_r2``
    and Λ > ``min_exponent`` (defaults 0.9 and 0.05 per step, theirs); λ_nMLE is the mean of the kept Λ and the
    error bar their (population) std. The fraction kept is ρ, the share of chaotic initial conditions. A non-finite Λ
    (a separation that overflowed, a retired shadow) is never kept.

    Args:
        exponents: Λ per initial condition, shape [N].
        r2: R² of each fit, shape [N].
        min_r2: R² threshold (exclusive).
        min_exponent: Λ threshold (exclusive), in the series' time unit.

    Returns:
        ``(mean, std, kept)``: NaN mean and std when no fit is kept.
    """
    exponents = torch.as_tensor(exponents, dtype=torch.float64).flatten()
    r2 = torch.as_tensor(r2, dtype=torch.float64).flatten()
    kept = exponents[(r2 > min_r2) & (exponents > min_exponent) & torch.isfinite(exponents)]
    if kept.numel() == 0:
        return math.nan, math.nan, 0
    return kept.mean().item(), kept.std(unbiased=False).item(), kept.numel()
