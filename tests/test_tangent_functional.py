"""The tangent-space estimators: QR re-orthonormalisation, Kaplan–Yorke, power iteration, and the optimizer
linearisations checked against finite differences of torch's real ``step()`` in float64."""

import math

import pytest
import torch

from lightning_chaos.functional.tangent import (
    adam_preconditioner,
    adam_sharpness_threshold,
    adam_tangent_step,
    gd_sharpness_threshold,
    hessian_top_eigenvalue,
    kaplan_yorke_dimension,
    qr_renormalize,
    sgd_tangent_step,
    sgd_tangent_steps,
)

torch.set_num_threads(1)


def test_qr_renormalize_of_a_diagonal_map_gives_its_exponents():
    """ChaosTools' check: a diagonal linear map iterated with QR every step gives ln|d_i|, here to 1e-12."""
    d = torch.tensor([1.5, -0.8, 0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    q, _ = qr_renormalize(torch.randn(3, 3, generator=g, dtype=torch.float64))
    total, steps = torch.zeros(3, dtype=torch.float64), 200
    increments = []
    for _ in range(steps):
        q, log_r = qr_renormalize(d[:, None] * q)
        total += log_r
        increments.append(log_r)
    torch.testing.assert_close(increments[-1], d.abs().log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(total / steps, d.abs().log(), rtol=0, atol=0.05)  # the alignment transient ~ 1/t
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_qr_renormalize_moves_the_signs_into_q_and_keeps_dtype():
    u = torch.tensor([[-2.0, 1.0], [0.0, -3.0], [0.0, 0.0]])
    q, log_r = qr_renormalize(u)
    assert q.dtype == torch.float32 and log_r.dtype == torch.float64
    torch.testing.assert_close(q[:, 0], torch.tensor([-1.0, 0.0, 0.0]))  # R_11 = +2: the sign stays in Q
    torch.testing.assert_close(log_r, torch.tensor([2.0, 3.0], dtype=torch.float64).log())
    assert torch.isneginf(qr_renormalize(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))[1][1])  # a dependent column


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.long), [[1.0]]])
def test_qr_renormalize_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="tangents"):
        qr_renormalize(bad)


@pytest.mark.parametrize(
    "exponents, expected",
    [([0.5, -1.0], 1.5), ([-0.1, -0.2], 0.0), ([0.3, 0.1], 2.0), ([0.2, -0.1, -0.4], 2.25), ([-1.0, 0.5], 1.5)],
)
def test_kaplan_yorke_dimension(exponents, expected):
    assert kaplan_yorke_dimension(torch.tensor(exponents)) == pytest.approx(expected)


def test_kaplan_yorke_dimension_nan_and_errors():
    assert math.isnan(kaplan_yorke_dimension(torch.tensor([math.nan, 0.1])))
    with pytest.raises(ValueError, match="exponents"):
        kaplan_yorke_dimension(torch.tensor([]))


def _symmetric(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_hessian_top_eigenvalue_finds_the_largest_algebraic_eigenvalue():
    a = _symmetric([2.0, 0.5, -0.3, -5.0])  # the dominant one in modulus is negative: the shifted rerun is needed
    top = hessian_top_eigenvalue(lambda u: a @ u, 4, iterations=500, tol=1e-13, generator=torch.Generator())
    assert top.value == pytest.approx(2.0, abs=1e-9)
    torch.testing.assert_close(a @ top.vector, 2.0 * top.vector, rtol=0, atol=1e-5)


def test_hessian_top_eigenvalue_warm_start_converges_at_once():
    a = _symmetric([3.0, 1.0, 0.2])
    cold = hessian_top_eigenvalue(lambda u: a @ u, 3, iterations=200, tol=1e-10)
    warm = hessian_top_eigenvalue(lambda u: a @ u, cold.vector, iterations=200, tol=1e-10)
    assert warm.converged and warm.iterations <= 2 < cold.iterations
    assert warm.value == pytest.approx(3.0, rel=1e-10)


def test_hessian_top_eigenvalue_of_zero_and_bad_arguments():
    assert hessian_top_eigenvalue(lambda u: 0 * u, 3).value == 0.0
    with pytest.raises(ValueError, match="iterations"):
        hessian_top_eigenvalue(lambda u: u, 3, iterations=0)
    with pytest.raises(ValueError, match="tol"):
        hessian_top_eigenvalue(lambda u: u, 3, tol=0)
    with pytest.raises(ValueError, match="dim_or_init"):
        hessian_top_eigenvalue(lambda u: u, torch.zeros(2, 2))


# -- the optimizer linearisations against finite differences of the real step ---------------------------------------

_W = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _loss(theta):
    """A non-quadratic loss, so that the Hessian depends on θ."""
    return torch.tanh(_W @ theta).pow(2).sum() + 0.1 * theta.pow(4).sum()


def _real_step(optimizer_class, kwargs, theta, state_tensors, step_count):
    """One torch optimizer step from (θ, state): the new θ and state tensors."""
    param = torch.nn.Parameter(theta.clone())
    optimizer = optimizer_class([param], **kwargs)
    if state_tensors:
        state = {name: value.clone() for name, value in state_tensors.items()}
        if step_count is not None:
            state["step"] = torch.tensor(float(step_count), dtype=torch.float64)
        optimizer.state[param] = state
    param.grad = torch.autograd.grad(_loss(param), param)[0]
    optimizer.step()
    new_state = optimizer.state[param]
    return param.detach(), {name: new_state[name].detach() for name in state_tensors or new_state if name != "step"}


def _finite_difference(step, theta, state, u_theta, u_state, h=1e-6):
    plus = step(theta + h * u_theta, {k: v + h * u_state[k] for k, v in state.items()})
    minus = step(theta - h * u_theta, {k: v - h * u_state[k] for k, v in state.items()})
    return (plus[0] - minus[0]) / (2 * h), {k: (plus[1][k] - minus[1][k]) / (2 * h) for k in plus[1]}


def _hvp(theta, u):
    return torch.func.jvp(torch.func.grad(_loss), (theta,), (u,))[1]


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.1, weight_decay=0.05, maximize=True),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
    ],
)
def test_sgd_tangent_step_matches_finite_differences_of_torch_sgd(kwargs, first_step):
    g = torch.Generator().manual_seed(2)
    theta, u_theta = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    momentum = kwargs.get("momentum", 0)
    with_buffer = bool(momentum) and not first_step
    state = {"momentum_buffer": torch.randn(4, generator=g, dtype=torch.float64)} if with_buffer else {}
    u_state = {"momentum_buffer": torch.randn(4, generator=g, dtype=torch.float64)} if with_buffer else {}

    def step(t, s):
        new_theta, new_state = _real_step(torch.optim.SGD, kwargs, t, s, None)
        return new_theta, {k: v for k, v in new_state.items() if v is not None and momentum}

    fd_theta, fd_state = _finite_difference(step, theta, state, u_theta, u_state)
    exact_theta, exact_buffer = sgd_tangent_step(
        u_theta, _hvp(theta, u_theta), u_state.get("momentum_buffer"), lr=kwargs["lr"], momentum=momentum,
        dampening=kwargs.get("dampening", 0.0), weight_decay=kwargs.get("weight_decay", 0.0),
        nesterov=kwargs.get("nesterov", False), maximize=kwargs.get("maximize", False), first_step=not with_buffer,
    )
    torch.testing.assert_close(exact_theta, fd_theta, rtol=1e-7, atol=1e-8)
    if momentum:
        torch.testing.assert_close(exact_buffer, fd_state["momentum_buffer"], rtol=1e-7, atol=1e-8)
    else:
        assert exact_buffer is None


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.1, weight_decay=0.05, maximize=True),
        dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02, maximize=True),
    ],
)
def test_sgd_tangent_steps_is_sgd_tangent_step_on_each_parameter_bit_for_bit(kwargs, first_step):
    """The probe's foreach version, over parameters of several shapes with k = 3 tangents each."""
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4, 2), (3, 5), (3, 1)]
    u, hu, ub = ([torch.randn(shape, generator=g) for shape in shapes] for _ in range(3))
    buffers = ub if kwargs.get("momentum") else None
    thetas, new_buffers = sgd_tangent_steps(u, hu, buffers, first_step=first_step, **kwargs)
    for i in range(len(shapes)):
        theta, buffer = sgd_tangent_step(u[i], hu[i], None if buffers is None else buffers[i], first_step=first_step,
                                         **kwargs)
        assert torch.equal(thetas[i], theta)
        assert (new_buffers is None) == (buffer is None)
        if buffer is not None:
            assert new_buffers is not None and torch.equal(new_buffers[i], buffer)


@pytest.mark.parametrize("step_count", [0, 7])
@pytest.mark.parametrize(
    "optimizer_class, kwargs",
    [
        (torch.optim.Adam, dict(lr=0.01)),
        (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, maximize=True)),
        (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.3)),
    ],
)
def test_adam_tangent_step_matches_finite_differences_of_torch_adam(optimizer_class, kwargs, step_count):
    """The whole Adam step (θ, m, v) linearised: bias corrections, ε and both weight decays, in float64."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(4, generator=g, dtype=torch.float64)
    if step_count:
        state = {"exp_avg": 0.1 * torch.randn(4, generator=g, dtype=torch.float64),
                 "exp_avg_sq": 0.01 * torch.rand(4, generator=g, dtype=torch.float64) + 1e-3}
    else:
        state = {"exp_avg": torch.zeros(4, dtype=torch.float64), "exp_avg_sq": torch.zeros(4, dtype=torch.float64)}
    u_theta = torch.randn(4, generator=g, dtype=torch.float64)
    u_state = {"exp_avg": torch.randn(4, generator=g, dtype=torch.float64),
               "exp_avg_sq": 1e-3 * torch.randn(4, generator=g, dtype=torch.float64)}
    if not step_count:  # from the zero state, only directions that keep v ≥ 0 are steps torch can take
        u_state = {k: torch.zeros_like(v) for k, v in u_state.items()}

    fd_theta, fd_state = _finite_difference(
        lambda t, s: _real_step(optimizer_class, kwargs, t, s, step_count), theta, state, u_theta, u_state)
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    param = torch.nn.Parameter(theta.clone())
    grad = torch.autograd.grad(_loss(param), param)[0]
    exact = adam_tangent_step(
        u_theta, _hvp(theta, u_theta), u_state["exp_avg"], u_state["exp_avg_sq"], theta, grad, state["exp_avg"],
        state["exp_avg_sq"], step_count, lr=kwargs["lr"], beta1=beta1, beta2=beta2, eps=kwargs.get("eps", 1e-8),
        weight_decay=kwargs.get("weight_decay", 0.0), decoupled_weight_decay=optimizer_class is torch.optim.AdamW,
        maximize=kwargs.get("maximize", False),
    )
    torch.testing.assert_close(exact[0], fd_theta, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(exact[1], fd_state["exp_avg"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exact[2], fd_state["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_adam_tangent_step_batches_over_k_tangents():
    g = torch.Generator().manual_seed(4)
    theta, grad = torch.randn(3, generator=g), torch.randn(3, generator=g)
    m, v = torch.randn(3, generator=g), torch.rand(3, generator=g)
    u = [torch.randn(2, 3, generator=g) for _ in range(4)]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    batched = adam_tangent_step(u[0], u[1], u[2], u[3], theta, grad, m, v, 3, **kwargs)
    for row in range(2):
        single = adam_tangent_step(u[0][row], u[1][row], u[2][row], u[3][row], theta, grad, m, v, 3, **kwargs)
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[row], b)


@pytest.mark.parametrize("momentum, dampening, nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.7, 0.2, False),
                                                            (0.9, 0.0, True), (0.5, 0.3, True)])
def test_gd_sharpness_threshold_is_where_the_quadratic_tangent_map_reaches_minus_one(momentum, dampening, nesterov):
    lr = 0.1
    a = gd_sharpness_threshold(lr, momentum, dampening, nesterov)
    u = torch.eye(2, dtype=torch.float64)
    columns = [sgd_tangent_step(u[i, :1], a * u[i, :1], u[i, 1:], lr=lr, momentum=momentum, dampening=dampening,
                                nesterov=nesterov) for i in range(2)]
    jacobian = torch.stack([torch.cat([c[0], c[1] if c[1] is not None else torch.zeros(1)]) for c in columns], 1)
    if not momentum:
        jacobian = jacobian[:1, :1]
    moduli = torch.linalg.eigvals(jacobian).abs()
    assert moduli.max().item() == pytest.approx(1.0, abs=1e-9)


def test_adam_threshold_and_preconditioner():
    assert adam_sharpness_threshold(0.001, 0.9) == pytest.approx(38_000)
    p = adam_preconditioner(torch.tensor([4.0]), 1, beta1=0.9, beta2=0.999, eps=0.0)
    # after the first step v' = 0.001 g², m' = 0.1 g and the update η m'/P is η·sign(g): P = 0.1·|g| = 0.1·√(v'/0.001)
    torch.testing.assert_close(p, torch.tensor([0.1 * (4.0 / 0.001) ** 0.5]))


@pytest.mark.parametrize("algorithm, clip_val", [("norm", 0.5), ("value", 0.3), ("norm", 50.0)])
def test_clip_tangent_is_the_derivative_of_torchs_clipping(algorithm, clip_val):
    """Against central differences of torch's own clip_grad_norm_ / clip_grad_value_ in float64."""
    from lightning_chaos.functional import clip_tangent

    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    products = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
                torch.randn(2, 5, generator=g, dtype=torch.float64)]

    def torch_clip(gs):
        params = [torch.nn.Parameter(torch.zeros_like(x)) for x in gs]
        for p, x in zip(params, gs):
            p.grad = x.clone()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        return [p.grad for p in params]

    clipped, tangents = clip_tangent(grads, products, clip_val, algorithm)
    for a, b in zip(clipped, torch_clip(grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    h = 1e-6
    for k in range(2):
        plus = torch_clip([x + h * d[k] for x, d in zip(grads, products)])
        minus = torch_clip([x - h * d[k] for x, d in zip(grads, products)])
        for t, p, m in zip(tangents, plus, minus):
            torch.testing.assert_close(t[k], (p - m) / (2 * h), rtol=1e-6, atol=1e-8)


def test_clip_tangent_refuses_bad_input():
    from lightning_chaos.functional import clip_tangent

    with pytest.raises(ValueError, match="`clip_val` must be positive"):
        clip_tangent([torch.ones(2)], [torch.ones(1, 2)], 0.0)
    with pytest.raises(ValueError, match="`algorithm` must be 'norm' or 'value'"):
        clip_tangent([torch.ones(2)], [torch.ones(1, 2)], 1.0, "l1")
