r"""Tangent-space estimators: the Lyapunov spectrum by QR re-orthonormalisation, the Kaplan–Yorke dimension, the top
Hessian eigenvalue (sharpness) by power iteration on Hessian-vector products, and the exact linearisation of one
optimizer step (SGD with momentum/Nesterov, Adam/AdamW) in torch's conventions.

The training step is a map on the whole state s = (θ, optimizer state): s(t+1) = U_t(s(t)). A tangent vector evolves
as u(t+1) = J_{U_t}(s(t)) u(t), with no finite ε (Benettin, Galgani, Giorgilli & Strelcyn 1980). The only second
derivative of the loss a step needs is one Hessian-vector product H·u_θ per tangent; the rest of the Jacobian is the
optimizer's own arithmetic, linearised here by hand, one small function per optimizer family, each checked against
finite differences of torch's real ``step()`` in the tests.

Everything here works on plain tensors without a Trainer. Time is counted in optimizer steps, so every exponent is
*per optimizer step*.
"""

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor


def qr_renormalize(tangents: Tensor) -> tuple[Tensor, Tensor]:
    r"""Re-orthonormalise k tangent vectors by a QR decomposition, returning the growth of each (Benettin's step).

    With the k vectors as the columns of U = QR (reduced QR, R upper triangular with a *positive* diagonal), Q is the
    orthonormal frame to continue from and ln R_ii is how much the i-th direction grew beyond the span of the
    previous ones since the last re-orthonormalisation. Summed over time and divided by the number of steps, the
    ln R_ii are the k largest Lyapunov exponents (ChaosTools.jl ``lyapunovspectrum``; Geist, Parlitz & Lauterborn
    1990).

    The signs of R's diagonal are moved into Q (``torch.linalg.qr`` leaves them to LAPACK), so that Q changes
    continuously with U and a vector that did not rotate is returned as it was.

    Failure modes: a column that is (numerically) a combination of the previous ones gives R_ii = 0 and ln R_ii = −inf
    (the map is singular in that direction, or k exceeds the dimension); a non-finite tangent gives NaN.

    Args:
        tangents: ``[D, k]`` with k ≤ D, the k tangent vectors as columns, any floating dtype.

    Returns:
        ``(q, log_r)``: ``q`` ``[D, k]`` in the input's dtype with orthonormal columns, and ``log_r`` ``[k]`` float64,
        ln |R_ii|.

    Raises:
        ValueError: if ``tangents`` is not a 2-D floating tensor with at least as many rows as columns.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import qr_renormalize
        >>> q, log_r = qr_renormalize(torch.tensor([[2.0, 0.0], [0.0, -0.5]], dtype=torch.float64))
        >>> q.abs().sum(0)  # unit columns; R's diagonal (2, 0.5) is positive, the sign went into Q
        tensor([1., 1.], dtype=torch.float64)
        >>> log_r.exp()
        tensor([2.0000, 0.5000], dtype=torch.float64)
    """
    if not isinstance(tangents, Tensor) or tangents.dim() != 2 or not tangents.is_floating_point():
        raise ValueError(f"`tangents` must be a 2-D floating tensor [D, k], got {getattr(tangents, 'shape', tangents)}")
    if tangents.shape[1] > tangents.shape[0]:
        raise ValueError(
            f"`tangents` must have k <= D columns (k vectors of dimension D), got shape {tuple(tangents.shape)}"
        )
    q, r = torch.linalg.qr(tangents, mode="reduced")
    diagonal = torch.diagonal(r)
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)
    return q * signs, diagonal.abs().to(torch.float64).log()


def kaplan_yorke_dimension(exponents: Tensor) -> float:
    r"""The Kaplan–Yorke (Lyapunov) dimension of a spectrum.

    .. math::  D_{KY} = j + \frac{\sum_{i \le j} \lambda_i}{|\lambda_{j+1}|}

    with the exponents sorted in descending order and j the largest index whose partial sum Σ_{i≤j} λ_i is ≥ 0.
    0 when λ_1 < 0 (a contracting training); k when every partial sum of the k exponents given is ≥ 0 (then only a
    lower bound: more exponents are needed, as in ChaosTools.jl ``kaplanyorke_dim``).

    Failure modes: it needs the spectrum down to where the partial sums turn negative; with too few exponents it
    saturates at k. NaN exponents give NaN.

    Args:
        exponents: ``[k]`` Lyapunov exponents, any order.

    Returns:
        D_KY as a float.

    Raises:
        ValueError: if ``exponents`` is not a non-empty 1-D tensor.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import kaplan_yorke_dimension
        >>> kaplan_yorke_dimension(torch.tensor([0.5, -1.0]))  # Hénon-like: 1 + 0.5 / 1
        1.5
        >>> kaplan_yorke_dimension(torch.tensor([-0.1, -0.2]))
        0.0
    """
    if not isinstance(exponents, Tensor) or exponents.dim() != 1 or exponents.numel() == 0:
        raise ValueError(f"`exponents` must be a non-empty 1-D tensor, got {getattr(exponents, 'shape', exponents)}")
    values = sorted(exponents.double().tolist(), reverse=True)
    if any(math.isnan(v) for v in values):
        return math.nan
    total = 0.0
    for j, value in enumerate(values):
        if total + value < 0:
            return j + total / abs(value)
        total += value
    return float(len(values))


class TopEigen(NamedTuple):
    """Result of :func:`hessian_top_eigenvalue`."""

    value: float
    """The largest (algebraic) eigenvalue found."""
    vector: Tensor
    """Its unit eigenvector, to warm-start the next call."""
    iterations: int
    """Hessian-vector products spent."""
    converged: bool
    """Whether the Rayleigh quotient settled within ``tol`` before ``iterations`` ran out."""


def hessian_top_eigenvalue(
    hvp: Callable[[Tensor], Tensor],
    dim_or_init: Union[int, Tensor],
    iterations: int = 20,
    tol: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> TopEigen:
    r"""The top eigenvalue of a symmetric operator known only through its products, by power iteration.

    Repeats u ← Hu / ‖Hu‖ and stops once the Rayleigh quotient λ = uᵀHu changes by at most ``tol``·|λ|. Power
    iteration finds the eigenvalue of largest *modulus*; if that one is negative (a saddle sharper than the valley),
    it is run again on H − λI, whose top eigenvalue is λ_max − λ, so the result is always the largest algebraic
    eigenvalue: the sharpness of the edge-of-stability literature (Cohen et al. 2021).

    Defaults: 20 products and a relative tolerance of 1e-3, enough for a curve of the sharpness against 2/η, when
    warm-started from the previous step's eigenvector (``dim_or_init``): the sharpness moves slowly between steps and
    a warm start converges in a few products. Cohen et al. use Lanczos (scipy ``eigsh``) instead, which converges
    faster from a cold start.

    Failure modes: the convergence rate is |λ₂/λ₁|; with two nearly equal top eigenvalues it is slow, and the value
    returned is a lower bound (``converged=False``). An operator that is not symmetric gives no meaningful answer.

    Args:
        hvp: u ↦ H u on flat vectors ``[D]``.
        dim_or_init: D, to start from a random vector (from ``generator``), or a start vector ``[D]`` (a warm start).
        iterations: the most products to spend per run (≥ 1); the negative-eigenvalue rerun has its own budget.
        tol: relative change of the Rayleigh quotient at which to stop (> 0).
        generator: for the random start; the global RNG is never drawn from.

    Returns:
        :class:`TopEigen` (value, unit vector, products spent, converged).

    Raises:
        ValueError: for ``iterations < 1``, ``tol <= 0`` or a start vector that is not 1-D.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import hessian_top_eigenvalue
        >>> a = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))
        >>> top = hessian_top_eigenvalue(lambda u: a @ u, 3, iterations=200, tol=1e-12)
        >>> round(top.value, 6)
        3.0
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations` must be an integer >= 1, got {iterations!r}")
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"`tol` must be a number > 0, got {tol!r}")
    if isinstance(dim_or_init, Tensor):
        if dim_or_init.dim() != 1:
            raise ValueError(
                f"`dim_or_init` must be an int or a 1-D start vector, got shape {tuple(dim_or_init.shape)}"
            )
        start = dim_or_init.detach().clone()
    else:
        start = torch.randn(int(dim_or_init), generator=generator, dtype=torch.float64)
    value, vector, spent, converged = _power_iteration(hvp, start, iterations, tol, shift=0.0)
    if value < 0:
        shifted, vector2, spent2, converged = _power_iteration(hvp, vector, iterations, tol, shift=value)
        spent += spent2
        if shifted + value > value:
            value, vector = shifted + value, vector2
    return TopEigen(value, vector, spent, converged)


def _power_iteration(hvp: Callable[[Tensor], Tensor], start: Tensor, iterations: int, tol: float,
                     shift: float) -> tuple[float, Tensor, int, bool]:
    """Power iteration on H − shift·I from ``start``: (Rayleigh quotient, unit vector, products, converged)."""
    norm = start.norm()
    vector = start / norm if norm > 0 else torch.ones_like(start) / math.sqrt(start.numel())
    value = math.nan
    for i in range(1, iterations + 1):
        product = hvp(vector)
        if shift:
            product = product - shift * vector
        previous, value = value, torch.dot(vector.to(product.dtype), product).item()
        size = product.norm()
        if not torch.isfinite(size) or size == 0:
            return value, vector, i, size == 0
        vector = product / size
        if abs(value - previous) <= tol * abs(value):
            return value, vector, i, True
    return value, vector, iterations, False


# -- the sharpness thresholds ------------------------------------------------------------------------------------------


def gd_sharpness_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""The sharpness above which (torch's) SGD is unstable on a quadratic: where its tangent map gets an eigenvalue −1.

    Plain GD: 2/η. Heavy ball (b ← μb + (1−d)g, θ ← θ − ηb): 2(1 + μ)/((1 − d)η). Nesterov (θ ← θ − η(g + μb)):
    2(1 + μ)/(η(1 + μ + μ(1 − d))), which is Cohen et al.'s (2 + 2μ)/(η(1 + 2μ)) for d = 0.

    Example:
        >>> from lightning_chaos.functional.tangent import gd_sharpness_threshold
        >>> round(gd_sharpness_threshold(0.1), 6), round(gd_sharpness_threshold(0.1, momentum=0.9), 6)
        (20.0, 38.0)
    """
    c = 1.0 - dampening
    if momentum == 0:
        return 2.0 / lr
    if nesterov:
        return 2.0 * (1.0 + momentum) / (lr * (1.0 + momentum + momentum * c))
    return 2.0 * (1.0 + momentum) / (c * lr)


def adam_sharpness_threshold(lr: float, beta1: float) -> float:
    r"""The preconditioned-sharpness threshold of Adam, (2 + 2β₁)/((1 − β₁)η): 38/η at β₁ = 0.9 (Cohen et al. 2022,
    arXiv 2207.14484), where the sharpness of P⁻¹H (P Adam's preconditioner, :func:`adam_preconditioner`)
    equilibrates.

    Example:
        >>> from lightning_chaos.functional.tangent import adam_sharpness_threshold
        >>> round(adam_sharpness_threshold(1e-3, 0.9), 6)
        38000.0
    """
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


# -- the optimizer linearisations --------------------------------------------------------------------------------


def clip_tangent(
    grads: list[Tensor], products: list[Tensor], clip_val: float, algorithm: str = "norm", eps: float = 1e-6
) -> tuple[list[Tensor], list[Tensor]]:
    r"""Gradient clipping and its linearisation: the clipped gradient and the clipped tangent products.

    As Lightning clips (``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` over the optimizer's parameters):

    * by norm, n = ‖g‖ over all parameters, c = clip_val / (n + eps): when c < 1, g_c = c g and

      .. math::  \delta g_c = c\,\delta g - \text{clip\_val}\; g\, \frac{g \cdot \delta g}{n (n + \text{eps})^2},

      otherwise g_c = g and δg_c = δg (torch multiplies by min(c, 1));
    * by value, g_c = clamp(g, −clip_val, clip_val), δg_c = δg where |g| ≤ clip_val and 0 elsewhere.

    Failure modes: at n = clip_val − eps exactly (by norm) or |g_i| = clip_val (by value) the map has a kink and the
    one-sided derivative is taken; such ties have measure zero.

    Args:
        grads: the unclipped gradient, one tensor per parameter.
        products: δg = H u per parameter, each [k, *shape] for k tangents.
        clip_val: the clipping value (> 0).
        algorithm: ``"norm"`` or ``"value"``.
        eps: torch's 1e-6 in the norm's denominator.

    Returns:
        ``(clipped_grads, clipped_products)`` in the inputs' layout.

    Raises:
        ValueError: for ``clip_val <= 0`` or an unknown ``algorithm``.

    Example:
        >>> import torch
        >>> g, dg = [torch.tensor([3.0, 4.0])], [torch.tensor([[1.0, 0.0]])]  # ‖g‖ = 5, clipped to 1
        >>> gc, dgc = clip_tangent(g, dg, 1.0)
        >>> torch.allclose(gc[0], torch.tensor([0.6, 0.8]), atol=1e-6)
        True
        >>> torch.allclose(dgc[0], torch.tensor([[0.128, -0.096]]), atol=1e-6)  # the radial part removed, scaled
        True
    """
    if not clip_val > 0:
        raise ValueError(f"`clip_val` must be positive, got {clip_val!r}")
    if algorithm == "value":
        masks = [(g.abs() <= clip_val).to(g.dtype) for g in grads]
        return [g.clamp(-clip_val, clip_val) for g in grads], [d * m for d, m in zip(products, masks)]
    if algorithm != "norm":
        raise ValueError(f"`algorithm` must be 'norm' or 'value', got {algorithm!r}")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = clip_val / (norm + eps)
    if coef >= 1:
        return list(grads), list(products)
    k = products[0].shape[0]
    dots = torch.stack([(g.unsqueeze(0) * d).reshape(k, -1).sum(dim=1) for g, d in zip(grads, products)]).sum(dim=0)
    scale = clip_val / (norm * (norm + eps) ** 2)
    clipped_products = [coef * d - scale * dots.view(k, *[1] * g.dim()) * g.unsqueeze(0)  # dots: g·δg per tangent
                        for g, d in zip(grads, products)]
    return [coef * g for g in grads], clipped_products




def sgd_tangent_step(
    v_param: Tensor,
    hvp: Tensor,
    v_buffer: Optional[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    r"""The tangent of one ``torch.optim.SGD`` step of one parameter: (u_θ, u_b) ↦ J (u_θ, u_b), exactly.

    torch's step: d = ±g + λθ; with momentum b ← μb + (1 − d_amp)·d (b ← d at the first step, which ignores the old
    buffer), d ← d + μb (Nesterov) or d ← b; θ ← θ − η d. Differentiated: u_d = ±H u_θ + λ u_θ; u_b ← μ u_b +
    (1 − d_amp) u_d (u_d at the first step); u_θ ← u_θ − η (u_d + μ u_b or u_b). For plain GD this is (I − ηH) u_θ.

    Every tensor may carry a leading batch dimension of k tangents (the primal quantities broadcast).

    Args:
        v_param: u_θ, the tangent of the parameter.
        hvp: H u_θ, the loss Hessian applied to it (same shape).
        v_buffer: u_b, the tangent of the momentum buffer (ignored, may be None, without momentum or at the first
            step).
        lr, momentum, dampening, weight_decay, nesterov, maximize: the param group's values at this step.
        first_step: the momentum buffer does not exist yet (torch creates it as b = d).

    Returns:
        ``(u_θ', u_b')``; ``u_b'`` is None without momentum.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import sgd_tangent_step
        >>> h = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> u = torch.tensor([1.0, 1.0])
        >>> sgd_tangent_step(u, h @ u, None, lr=0.1)[0]  # (I − 0.1 H) u
        tensor([0.8000, 0.9500])
    """
    thetas, buffers = sgd_tangent_steps(
        [v_param], [hvp], None if v_buffer is None else [v_buffer], lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
    )
    return thetas[0], None if buffers is None else buffers[0]


def sgd_tangent_steps(
    v_params: list[Tensor],
    hvps: list[Tensor],
    v_buffers: Optional[list[Tensor]],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> tuple[list[Tensor], Optional[list[Tensor]]]:
    r""":func:`sgd_tangent_step` on several parameters of one param group at once, with the same arithmetic (the
    same results, bit for bit) in torch's ``_foreach`` kernels: a handful of calls per step instead of a handful per
    parameter, which is most of the cost on small models.

    Args:
        v_params, hvps: u_θ and H u_θ, one tensor per parameter (each may carry a leading batch dimension of k).
        v_buffers: the momentum buffers' tangents, one per parameter (None without momentum or at the first step).
        lr, momentum, dampening, weight_decay, nesterov, maximize, first_step: as :func:`sgd_tangent_step`.

    Returns:
        ``(u_θ', u_b')`` as lists; ``u_b'`` is None without momentum.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import sgd_tangent_steps
        >>> u = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
        >>> sgd_tangent_steps(u, [torch.tensor([2.0, 0.5]), torch.tensor([1.0])], None, lr=0.1)[0]  # u − 0.1 H u
        [tensor([0.8000, 0.9500]), tensor([1.9000])]
    """
    v_d = list(torch._foreach_neg(hvps)) if maximize else list(hvps)
    if weight_decay:
        v_d = list(torch._foreach_add(v_d, torch._foreach_mul(v_params, weight_decay)))
    if not momentum:
        return list(torch._foreach_sub(v_params, torch._foreach_mul(v_d, lr))), None
    if first_step or v_buffers is None:
        v_b = v_d
    else:
        v_b = list(torch._foreach_add(torch._foreach_mul(v_buffers, momentum),
                                      torch._foreach_mul(v_d, 1.0 - dampening)))
    step = torch._foreach_add(v_d, torch._foreach_mul(v_b, momentum)) if nesterov else v_b
    return list(torch._foreach_sub(v_params, torch._foreach_mul(step, lr))), v_b


def adam_preconditioner(exp_avg_sq: Tensor, step: float, *, beta1: float, beta2: float, eps: float) -> Tensor:
    r"""Adam's diagonal preconditioner P after a step, so that the step is θ ← θ − η P⁻¹ m (m the new first moment,
    not bias-corrected): P = (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε), with v the new second moment and t the new step count
    (Cohen et al. 2022, eq. 2). Its threshold is :func:`adam_sharpness_threshold`."""
    return (1.0 - beta1**step) * ((exp_avg_sq / (1.0 - beta2**step)).sqrt() + eps)


def adam_tangent_step(
    v_param: Tensor,
    hvp: Tensor,
    v_exp_avg: Tensor,
    v_exp_avg_sq: Tensor,
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The tangent of one ``torch.optim.Adam``/``AdamW`` step of one parameter (θ, m, v) ↦ (θ', m', v'), exactly.

    torch's step (``amsgrad=False``): t ← t + 1; d = ±g (+ λθ for Adam's L2 decay); m' = β₁m + (1 − β₁)d;
    v' = β₂v + (1 − β₂)d²; θ' = θ(1 − ηλ if decoupled, AdamW) − (η / (1 − β₁ᵗ)) m' / (√v' / √(1 − β₂ᵗ) + ε).
    Differentiated, with u_d = ±H u_θ (+ λ u_θ):

    .. math::
        u_m' = β_1 u_m + (1 - β_1) u_d, \quad u_v' = β_2 u_v + 2 (1 - β_2)\, d\, u_d, \\
        u_θ' = c\,u_θ - \frac{η}{1 - β_1^t} \Big(\frac{u_m'}{δ} - \frac{m'\, u_v'}{2 δ^2 \sqrt{v'} \sqrt{1 - β_2^t}}\Big),
        \quad δ = \frac{\sqrt{v'}}{\sqrt{1-β_2^t}} + ε

    (c = 1 − ηλ for AdamW, else 1). √v' is not differentiable where v' = 0 (a coordinate that never had a
    gradient); that term is taken as 0 there, its one-sided limit along directions that keep v' = 0.

    Every tangent may carry a leading batch dimension of k tangents (the primal quantities broadcast).

    Args:
        v_param, v_exp_avg, v_exp_avg_sq: the tangents u_θ, u_m, u_v.
        hvp: H u_θ.
        param, grad, exp_avg, exp_avg_sq: θ, g (the gradient the optimizer will use), m and v *before* the step.
        step: the step count before the step (0 before the first).
        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize: the param group's values.

    Returns:
        ``(u_θ', u_m', u_v')``.

    Example:
        >>> import torch
        >>> from lightning_chaos.functional.tangent import adam_tangent_step
        >>> zero = torch.zeros(1)
        >>> u = adam_tangent_step(torch.ones(1), zero, zero, zero, torch.ones(1), torch.ones(1), zero, zero, 0,
        ...                       lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
        >>> u[0]  # a flat loss: θ' = θ − 0.1·sign-like step, whose derivative in θ is 1
        tensor([1.])
    """
    d = -grad if maximize else grad
    v_d = -hvp if maximize else hvp
    if weight_decay and not decoupled_weight_decay:
        d = d + weight_decay * param
        v_d = v_d + weight_decay * v_param
    t = step + 1
    m_new = beta1 * exp_avg + (1.0 - beta1) * d
    v_new = beta2 * exp_avg_sq + (1.0 - beta2) * d * d
    u_m = beta1 * v_exp_avg + (1.0 - beta1) * v_d
    u_v = beta2 * v_exp_avg_sq + 2.0 * (1.0 - beta2) * d * v_d
    correction2 = math.sqrt(1.0 - beta2**t)
    root = v_new.sqrt()
    denom = root / correction2 + eps
    positive = root > 0
    u_denom = torch.where(positive, u_v / (2.0 * torch.where(positive, root, 1.0) * correction2), 0.0)
    step_size = lr / (1.0 - beta1**t)
    shrink = 1.0 - lr * weight_decay if (weight_decay and decoupled_weight_decay) else 1.0
    u_param = shrink * v_param - step_size * (u_m / denom - m_new * u_denom / (denom * denom))
    return u_param, u_m, u_v
