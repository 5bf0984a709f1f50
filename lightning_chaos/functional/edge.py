"""The edge of chaos of a network's own map: order parameters, the mean-field boundary, layer-map exponents.

Where :mod:`~lightning_chaos.functional.exponents` measures the chaos of the *training trajectory* θ(t), this module
measures the network *as a map*: a square layer x ↦ φ(Wx + b), or a square sub-network F from the input to a layer of
the input's size, iterated x_{t+1} = F(x_t). The map is ordered when nearby orbits converge (exponent < 0), chaotic
when they separate (exponent > 0); the boundary between the two is the *edge of chaos*, where Feng, Zhang & Lai (2019)
find models generalise best and to which Zhang, Feng, Chen & Lai (2021) find training drives them.

Mean-field results (``edge_of_chaos_boundary``, ``mean_field_chi``) take the Gaussian averages ∫Dz f(z) by the
trapezoid rule on a grid that resolves f (agreeing with adaptive quadrature to ~1e-10). Orbit results
(``map_lyapunov_exponent``, ``asymptotic_jacobian_norm``) use ``torch.func`` on the map itself.

References:
    Feng, Zhang & Lai, "Optimal machine intelligence at the edge of chaos", arXiv 1909.05176 (2019).
    Zhang, Feng, Chen & Lai, "Edge of chaos as a guiding principle for modern neural network training",
    arXiv 2107.09437 (2021).
    Poole, Lahiri, Raghu, Sohl-Dickstein & Ganguli, "Exponential expressivity in deep neural networks through
    transient chaos", NeurIPS 2016. Schoenholz, Gilmer, Ganguli & Sohl-Dickstein, "Deep information propagation",
    ICLR 2017.
    Sompolinsky, Crisanti & Sommers, "Chaos in random neural networks", PRL 61 (1988).
"""

import math
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

ACTIVATIONS = ("tanh", "relu")
ESCAPE_NORM = 1e10
"""The authors' bounds on the mean orbit norm: beyond 1e10 the orbit has escaped, below 1e-10 it has collapsed."""
COLLAPSE_NORM = 1e-10


class OrderParameters(NamedTuple):
    """Sherrington–Kirkpatrick-style order parameters of a square weight matrix (see :func:`order_parameters`)."""

    j0: float
    """J0 = N·mean(W_ij): the mean coupling, scaled by the fan-in N."""
    j: float
    """J = √N·std(W_ij): the spread of the couplings, scaled by √N."""


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


@lru_cache(maxsize=64)
def _gaussian_grid(spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid nodes and weights for ∫Dz f(z) on z ∈ [−12, 12], fine enough for f varying on a z-scale of 1/spread.

    The trapezoid rule is spectrally accurate for smooth integrands under a Gaussian; Gauss–Hermite is not, once
    tanh(J0 u + J√q z) has a step narrower than its node spacing (J√q of 10 or more, near the edge for J0/J ≳ 1.5).
    """
    step = min(0.05, 0.05 / spread)
    nodes = np.linspace(-12.0, 12.0, 2 * math.ceil(12.0 / step) + 1)
    weights = np.exp(-0.5 * nodes * nodes)
    return nodes, weights / weights.sum()


def _gaussian_mean(function: Callable[[np.ndarray], np.ndarray], spread: float = 1.0) -> float:
    """∫Dz f(z) for an f varying on a z-scale of 1/spread or more."""
    nodes, weights = _gaussian_grid(float(2.0 ** math.ceil(math.log2(max(spread, 1.0)))))
    return float(np.dot(weights, function(nodes)))


def _bisect(function: Callable[[float], float], low: float, high: float, iterations: int = 200) -> float:
    """The root of ``function`` between ``low`` and ``high`` (opposite signs), to float precision."""
    f_low = function(low)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        f_middle = function(middle)
        if (f_middle > 0) == (f_low > 0):
            low, f_low = middle, f_middle
        else:
            high = middle
    return 0.5 * (low + high)


def order_parameters(weight: Tensor) -> OrderParameters:
    """The order parameters (J0, J) of a weight matrix, the axes of the Sherrington–Kirkpatrick phase diagram.

    For couplings W_ij ~ N(J0/N, J²/N) with N the fan-in (columns of a ``torch.nn.Linear`` weight):

        J0 = N · mean(W_ij),    J = √N · std(W_ij)   (population standard deviation over all entries).

    For the map x ↦ tanh(Wx) in the mean-field limit, |J0/J| < 1 is ordered for J < 1 and chaotic for J > 1; beyond
    |J0/J| = 1 the boundary bends (:func:`edge_of_chaos_boundary`). Zhang et al. (2021) plot training paths in the
    plane (x, y) = (J0/J, 1/J).

    Failure modes: the statistics say nothing about structure beyond i.i.d. entries (low rank, sparsity,
    correlations); for a trained matrix compare them with the map's own exponent (:func:`map_lyapunov_exponent`).

    Args:
        weight: a 2-D tensor [fan-out, fan-in] (the ``torch.nn.Linear`` layout).

    Returns:
        :class:`OrderParameters` ``(j0, j)`` as floats.

    Raises:
        ValueError: if ``weight`` is not 2-D or has fewer than two entries.

    Example:
        >>> import torch
        >>> w = torch.randn(2000, 2000, generator=torch.Generator().manual_seed(0)) * 0.5 / 2000**0.5
        >>> j0, j = order_parameters(w)
        >>> round(j, 2), abs(j0) < 0.1
        (0.5, True)
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() < 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"`weight` must be a 2-D tensor [fan_out, fan_in] with at least two entries, got {shape}")
    w = weight.detach().double()
    fan_in = w.shape[1]
    return OrderParameters(float(fan_in * w.mean()), float(math.sqrt(fan_in) * w.std(correction=0)))


def _tanh_field(j0: float, j: float, iterations: int = 2000) -> tuple[float, float, float]:
    """The mean-field fixed point (u, q) of x ↦ tanh(Wx) at (J0, J) and its stability J²∫Dz sech⁴(h)."""
    nodes, weights = _gaussian_grid(float(2.0 ** math.ceil(math.log2(max(j, 1.0)))))
    u, q = 1.0, 1.0
    for _ in range(iterations):
        t = np.tanh(j0 * u + j * math.sqrt(q) * nodes)
        new_u, new_q = float(np.dot(weights, t)), float(np.dot(weights, t * t))
        converged = abs(new_u - u) < 1e-14 and abs(new_q - q) < 1e-14
        u, q = new_u, new_q
        if converged:
            break
    sech2 = 1.0 - np.tanh(j0 * u + j * math.sqrt(q) * nodes) ** 2
    return u, q, j * j * float(np.dot(weights, sech2 * sech2))


def _relu_moments(a: float) -> tuple[float, float, float]:
    """P(a + z > 0), E relu(a + z), E relu(a + z)² for z ~ N(0, 1)."""
    cdf = 0.5 * (1.0 + math.erf(a / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return cdf, a * cdf + pdf, (a * a + 1.0) * cdf + a * pdf


def _boundary_one(ratio: float, activation: str) -> float:
    if activation == "relu":
        # x ↦ relu(Wx) is homogeneous, so only the orbit's direction has a fixed point: s = E relu / √E relu² at
        # h = (r s + z) in units of J√q. The edge is where a tangent keeps its length: J² P(h > 0) = 1.
        s = 0.0
        for _ in range(1000):
            _, first, second = _relu_moments(ratio * s)
            s_new = first / math.sqrt(second)
            if abs(s_new - s) < 1e-15:
                break
            s = s_new
        return 1.0 / math.sqrt(_relu_moments(ratio * s)[0])
    ratio = abs(ratio)  # J0 < 0 gives an orbit alternating in sign with the same stability
    if ratio <= 1.0:
        return 1.0

    def excess(j: float) -> float:
        return _tanh_field(ratio * j, j)[2] - 1.0

    high = 2.0
    while excess(high) < 0.0:  # J_c grows like e^{r²/2} for large r: bracket by doubling
        high *= 2.0
        if high > 1e12:
            return math.inf
    return _bisect(excess, 1.0, high, iterations=80)


def edge_of_chaos_boundary(
    j0_over_j: Union[float, Tensor, np.ndarray], activation: str = "tanh"
) -> Union[float, Tensor]:
    """J_c(J0/J): the coupling spread J on the mean-field edge of chaos of x ↦ φ(Wx), W_ij ~ N(J0/N, J²/N).

    tanh (Zhang et al. 2021, their "Eq. 3"): the edge is where the fixed point (u, q) of

        u = ∫Dz tanh(J0 u + J√q z),   q = ∫Dz tanh²(J0 u + J√q z)

    loses stability, J² ∫Dz sech⁴(J0 u + J√q z) = 1. For |J0/J| ≤ 1 the fixed point is u = q = 0 and the edge is J = 1;
    beyond it the ferromagnetic fixed point (u ≠ 0) moves the edge up fast: J_c = 1.509, 1.912, 2.376, 3.642 at
    J0/J = 1.1, 1.2, 1.3, 1.5 (growing like e^{r²/2}). J0 < 0 mirrors J0 > 0 (the orbit alternates in sign).

    relu: the tangent norm is kept when J² P(h > 0) = 1, with h's mean set by the self-consistent direction of the
    (homogeneous) orbit; J_c = √2 at J0 = 0, the He initialisation.

    The chaotic side is J > J_c; in the plane (x, y) = (J0/J, 1/J) it lies *below* the curve y = 1/J_c(x).

    Failure modes: mean field is exact as N → ∞ for i.i.d. couplings; finite N smears the edge by O(1/√N), and a
    trained matrix need not be i.i.d. — compare with :func:`map_lyapunov_exponent` of the real layer.

    Args:
        j0_over_j: the ratio r = J0/J: a float, or a tensor/array of ratios.
        activation: ``"tanh"`` or ``"relu"``.

    Returns:
        J_c: a float for a float input, otherwise a float64 tensor of the input's shape.

    Raises:
        ValueError: for an unknown ``activation`` or a non-finite ratio.

    Example:
        >>> round(edge_of_chaos_boundary(1.2), 3), edge_of_chaos_boundary(0.5)
        (1.912, 1.0)
        >>> round(edge_of_chaos_boundary(0.0, activation="relu"), 4)
        1.4142
    """
    _check_activation(activation)
    ratios = torch.as_tensor(j0_over_j, dtype=torch.float64)
    if not bool(torch.isfinite(ratios).all()):
        raise ValueError(f"`j0_over_j` must be finite, got {j0_over_j!r}")
    values = torch.tensor([_boundary_one(float(r), activation) for r in ratios.flatten().tolist()], dtype=torch.float64)
    if isinstance(j0_over_j, (int, float)):
        return float(values[0])
    return values.reshape(ratios.shape)


def mean_field_chi(sigma_w: float, sigma_b: float = 0.0, activation: str = "tanh") -> float:
    """χ₁ of deep signal propagation (Poole et al. 2016): the mean squared stretch of a small perturbation per layer.

    For a deep random network with weights N(0, σ_w²/N) and biases N(0, σ_b²), the pre-activation variance settles at
    q* = σ_w² ∫Dz φ(√q* z)² + σ_b², and

        χ₁ = σ_w² ∫Dz φ′(√q* z)².

    χ₁ < 1 is ordered (perturbations shrink), χ₁ > 1 chaotic; the correlation depth is ξ_c = −1/ln χ₁. tanh with
    σ_b = 0: q* = 0 and χ₁ = σ_w² for σ_w ≤ 1 (edge at σ_w = 1), χ₁ = 1.3627 at σ_w = 2. ReLU: χ₁ = σ_w²/2 whatever q*
    (edge at σ_w² = 2). For i.i.d. W the recurrent map x ↦ tanh(Wx) with J = σ_w has exponent ½ ln χ₁ above the edge.

    q* is the largest root of the variance map, found by bisection (not by iterating the map, which converges
    arbitrarily slowly near the edge).

    Args:
        sigma_w: σ_w > 0, the weights' standard deviation times √N.
        sigma_b: σ_b ≥ 0, the biases' standard deviation.
        activation: ``"tanh"`` or ``"relu"``.

    Returns:
        χ₁ as a float.

    Raises:
        ValueError: for σ_w ≤ 0, σ_b < 0 or an unknown ``activation``.

    Example:
        >>> round(mean_field_chi(2.0), 4), round(mean_field_chi(0.5), 4), round(mean_field_chi(2**0.5, activation="relu"), 12)
        (1.3627, 0.25, 1.0)
    """
    _check_activation(activation)
    if not (isinstance(sigma_w, (int, float)) and math.isfinite(sigma_w) and sigma_w > 0):
        raise ValueError(f"`sigma_w` must be a positive finite number, got {sigma_w!r}")
    if not (isinstance(sigma_b, (int, float)) and math.isfinite(sigma_b) and sigma_b >= 0):
        raise ValueError(f"`sigma_b` must be a non-negative finite number, got {sigma_b!r}")
    if activation == "relu":
        return sigma_w * sigma_w * 0.5
    if sigma_b == 0.0 and sigma_w <= 1.0:
        return sigma_w * sigma_w  # tanh² < x²: q = 0 is the only fixed point, and φ′(0) = 1
    def excess(q: float) -> float:
        return sigma_w**2 * _gaussian_mean(lambda z: np.tanh(math.sqrt(q) * z) ** 2, sigma_w) + sigma_b**2 - q

    q_star = _bisect(excess, 1e-300, sigma_w**2 + sigma_b**2 + 1.0)
    return sigma_w**2 * _gaussian_mean(lambda z: (1.0 - np.tanh(math.sqrt(q_star) * z) ** 2) ** 2, sigma_w)


def _points(x0: Tensor, name: str = "x0") -> Tensor:
    if not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] < 1 or x0.shape[1:].numel() < 1:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"`{name}` must be a tensor [num_starts, *point_shape] of starting points, got {shape}")
    if not x0.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {x0.dtype}")
    return x0.detach()


def _detached(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A module as a map of its input only: its parameters enter detached, else torch.func's jvp and jacrev trace
    their graph too (20-40x slower on a small layer)."""
    if not isinstance(fn, torch.nn.Module):
        return fn
    state = {name: tensor.detach() for name, tensor in fn.state_dict(keep_vars=True).items()}
    return lambda x: torch.func.functional_call(fn, state, (x,))


def _check_square(fn: Callable[[Tensor], Tensor], x: Tensor) -> None:
    if not callable(fn):
        raise ValueError(f"`fn` must be a callable mapping one point to a point of the same shape, got {fn!r}")
    with torch.no_grad():
        image = torch.func.vmap(fn)(x[:1])
    if not isinstance(image, Tensor) or image.shape != x[:1].shape:
        shape = tuple(image.shape[1:]) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(
            f"`fn` must map a point of shape {tuple(x.shape[1:])} to the same shape (a square map), got {shape}"
        )


def _check_steps(steps: int, transient: int = 0) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}")
    if not isinstance(transient, int) or isinstance(transient, bool) or not 0 <= transient < steps:
        raise ValueError(f"`transient` must be an int with 0 <= transient < steps ({steps}), got {transient!r}")


def _flushed(x: Tensor) -> Tensor:
    """x with entries below √(smallest normal float) set to 0: an orbit falling to 0 otherwise reaches subnormal
    floats, on which CPU arithmetic runs 30-70x slower; at that size an entry changes nothing of O(1) quantities."""
    return x.masked_fill(x.abs() < math.sqrt(torch.finfo(x.dtype).tiny), 0.0)


def _mean_norm(x: Tensor) -> float:
    return float(x.flatten(1).norm(dim=1).mean())


def map_lyapunov_exponent(
    fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    steps: int = 500,
    transient: int = 100,
    generator: Optional[torch.Generator] = None,
) -> float:
    """The maximal Lyapunov exponent of the iterated map x_{t+1} = fn(x_t), by a renormalised tangent vector.

    From each starting point, a unit tangent v is pushed through the map's Jacobian with forward-mode AD
    (``torch.func.jvp``, vmapped over the starting points) and renormalised every iteration (Benettin et al. 1980):

        v_{t+1} = J(x_t) v_t / ‖J(x_t) v_t‖,    λ = (1 / (T − T₀)) Σ_{t=T₀}^{T−1} ln ‖J(x_t) v_t‖,

    averaged over the starting points. Exact in the ε → 0 limit (no finite separation to saturate), in the map's
    units: per iteration. For x ↦ tanh(Wx) with W ~ N(0, g²/N): λ = ln g below the edge (g < 1; the orbit falls to 0
    and the tangent is iterated at that fixed point) and ½ ln χ₁ above it (0.0652, 0.1547, 0.3103 at g = 1.5, 2, 3).

    Defaults: 500 iterations with the first 100 left out, as Feng et al. (2019) iterate their maps (the transient lets
    the orbit reach its attractor and the tangent align with the most expanding direction; the error of λ falls like
    1/(T − T₀)).

    Failure modes, each ending the iteration early with a warning that names the iteration: the orbit escapes (mean
    ‖x‖ > 1e10) or turns non-finite — λ is then taken over the iterations before; a tangent collapses to exactly 0
    (e.g. every ReLU dead), so λ = −∞. An orbit collapsing to the fixed point 0 is *not* a failure here: the tangent
    keeps going through the Jacobian there. At the edge itself λ → 0 slowly; ``steps`` bounds the error, not the
    critical slowing down.

    Args:
        fn: the map, taking one point (a tensor of ``x0.shape[1:]``) to a point of the same shape. It is vmapped over
            the starting points, so it must be vmap-compatible (no ``.item()``, no in-place change of its input;
            modules in eval mode). An ``nn.Module`` is called with its parameters detached; a closure over parameters
            that require grad is correct but 20-40x slower (detach them).
        x0: starting points [num_starts, *point_shape]; their dtype and device are used throughout.
        steps: T, the number of iterations (≥ 1).
        transient: T₀, the iterations left out at the start (0 ≤ T₀ < T).
        generator: draws the initial tangents; default a fixed seed, so the result is reproducible and the global
            RNG is not touched.

    Returns:
        λ per iteration, as a float (NaN if the orbit left before the transient ended).

    Raises:
        ValueError: for bad ``x0``, ``steps`` or ``transient``, or an ``fn`` that is not a square map.

    Example:
        >>> import torch
        >>> w = torch.randn(500, 500, generator=torch.Generator().manual_seed(0)) * 2.0 / 500**0.5
        >>> x0 = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
        >>> 0.12 < map_lyapunov_exponent(lambda x: torch.tanh(w @ x), x0, steps=300) < 0.19  # ½ ln χ₁ = 0.1547
        True
    """
    x = _points(x0)
    _check_steps(steps, transient)
    _check_square(fn, x)
    fn = _detached(fn)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    batched = torch.func.vmap(fn)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    counted = 0
    # torch.func's jvp runs 30-60x slower under no_grad (measured, torch 2.13): grad mode on, and nothing here carries
    # a graph (x and v are detached, and so are a module's parameters, see _detached)
    with torch.enable_grad():
        for t in range(steps):
            new_x, new_v = (out.detach() for out in torch.func.jvp(batched, (x,), (v,)))
            growth = new_v.flatten(1).norm(dim=1)
            reason = _escaped(new_x, t)
            if reason is None and not bool(torch.isfinite(growth).all()):
                reason = f"a tangent turned non-finite at iteration {t}"
            if reason is not None:
                warnings.warn(f"map_lyapunov_exponent: {reason}; the exponent is taken over the {counted} iterations "
                              "before", RuntimeWarning, stacklevel=2)
                break
            if t >= transient:
                total += growth.double().log()
                counted += 1
            if bool((growth == 0).any()):
                warnings.warn(f"map_lyapunov_exponent: a tangent collapsed to 0 at iteration {t} (the Jacobian "
                              "annihilates it, e.g. every ReLU dead): the exponent is -inf", RuntimeWarning,
                              stacklevel=2)
                return -math.inf
            x, v = _flushed(new_x), _flushed(new_v / growth.view(-1, *[1] * (x.dim() - 1)))
    if counted == 0:
        return math.nan
    return float((total / counted).mean())


def _escaped(x: Tensor, t: int) -> Optional[str]:
    if not bool(torch.isfinite(x).all()):
        return f"the orbit turned non-finite at iteration {t}"
    if _mean_norm(x) > ESCAPE_NORM:
        return f"the orbit escaped (mean norm > {ESCAPE_NORM:g}) at iteration {t}"
    return None


def asymptotic_jacobian_norm(fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int = 500) -> float:
    """Seed paper 1's order parameter: (1/√N)·‖∂fn/∂x‖_F at the end of the orbit, averaged over the starting points.

    Each starting point is iterated x_{t+1} = fn(x_t) for ``steps`` iterations; at the last iterate x* the full
    Jacobian J* = ∂fn/∂x (``torch.func.jacrev``, chunked over the starting points) gives

        ‖J*‖ = (1/√N) ‖J*‖_F,   N = the number of entries of a point,

    the root-mean-square singular value of J*. Feng, Zhang & Lai (2019) put the edge of chaos at ‖J*‖ = 1. For
    x ↦ tanh(Wx) with W ~ N(0, g²/N) it tends to g below the edge (x* = 0, J* = W) and to √χ₁ above it (1.364 at
    g = 3), so it agrees with the mean-field criterion.

    Defaults and the stopping rule are the authors': 500 iterations, ending early when the mean ‖x‖ leaves
    [1e-10, 1e10]. Collapse below 1e-10 means the orbit has reached the fixed point 0, and J* is taken there (no
    warning: that is the ordered phase). Escape beyond 1e10, or a non-finite iterate, is a failure: the iteration ends
    with a warning naming the iteration and J* is taken at the last finite iterate. Memory: N² entries per starting
    point in a chunk (chunks keep a batch under ~256 MB).

    Args:
        fn: the square map on one point, vmapped over the starting points (see :func:`map_lyapunov_exponent`).
        x0: starting points [num_starts, *point_shape].
        steps: the number of iterations before the Jacobian is taken (≥ 1).

    Returns:
        The mean over the starting points of (1/√N)‖J*‖_F, as a float.

    Raises:
        ValueError: for bad ``x0`` or ``steps``, or an ``fn`` that is not a square map.

    Example:
        >>> import torch
        >>> w = torch.randn(400, 400, generator=torch.Generator().manual_seed(0)) * 0.5 / 400**0.5
        >>> x0 = torch.randn(3, 400, generator=torch.Generator().manual_seed(1))
        >>> round(asymptotic_jacobian_norm(lambda x: torch.tanh(w @ x), x0), 1)  # g = 0.5, ordered
        0.5
    """
    x = _points(x0)
    _check_steps(steps)
    _check_square(fn, x)
    fn = _detached(fn)
    step = torch.func.vmap(fn)
    with torch.no_grad():
        for t in range(steps):
            new_x = step(x)
            reason = _escaped(new_x, t)
            if reason is not None:
                warnings.warn(f"asymptotic_jacobian_norm: {reason}; the Jacobian is taken at the last finite iterate",
                              RuntimeWarning, stacklevel=2)
                break
            x = _flushed(new_x)
            if _mean_norm(x) < COLLAPSE_NORM:
                break
    size = x[0].numel()
    chunk = max(1, (1 << 26) // (size * size))
    with torch.enable_grad():  # see map_lyapunov_exponent
        jacobians = torch.func.vmap(torch.func.jacrev(fn), chunk_size=chunk)(x).detach()
    norms = jacobians.reshape(x.shape[0], -1).double().norm(dim=1) / math.sqrt(size)
    return float(norms.mean())
