"""StackedOptimizer: one optimizer step for rows that differ only in learning rate, against one optimizer per row."""

import copy

import pytest
import torch
from torch import nn

from lightning_chaos.vectorized import NotVectorizable, StackedOptimizer, StackedShadows

LRS = [0.003, 0.03, 0.3, 1.7]  # 1.7 > 1: the row moves past the η = 1 step

OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd_nesterov_wd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adam_amsgrad_wd": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True, weight_decay=1e-2),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
    "adamax": lambda p, lr: torch.optim.Adamax(p, lr=lr),
    "nadam_decoupled": lambda p, lr: torch.optim.NAdam(p, lr=lr, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda p, lr: torch.optim.RAdam(p, lr=lr),
    "rmsprop_centered_momentum": lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.5, centered=True),
    "adadelta": lambda p, lr: torch.optim.Adadelta(p, lr=lr),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
}


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def _param_groups(module):  # two groups, the second with its own LR factor: each row keeps both
    return [{"params": module.hidden.parameters()}, {"params": module.out.parameters(), "lr_factor": 0.5}]


def _make_rows(make_optimizer):
    torch.manual_seed(0)
    base = TwoLayer().double()  # in float64 the two ways agree to rounding; float32 rounding grows over the steps
    rows, optimizers = [], []
    for lr in LRS:
        module = copy.deepcopy(base)
        with torch.no_grad():  # rows apart, as shadows are
            for p in module.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        groups = _param_groups(module)
        optimizer = make_optimizer(groups, lr)
        optimizer.param_groups[1]["lr"] = lr * 0.5
        rows.append(module)
        optimizers.append(optimizer)
    return rows, optimizers


def _gradients(rows, step, names=None):
    """Per trainable parameter (``names``, default all), the rows' gradients on one seeded batch, stacked."""
    torch.manual_seed(100 + step)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for module in rows:
        loss = nn.functional.cross_entropy(module(x), y)
        parameters = list(module.parameters()) if names is None else [module.get_parameter(n) for n in names]
        grads.append(torch.autograd.grad(loss, parameters))
    return [torch.stack(column) for column in zip(*grads)]


def _train_separately(make_optimizer, steps):
    rows, optimizers = _make_rows(make_optimizer)
    for step in range(steps):
        grads = _gradients(rows, step)
        for k, (module, optimizer) in enumerate(zip(rows, optimizers)):
            for p, g in zip(module.parameters(), grads):
                p.grad = g[k].clone()
            optimizer.step()
    return rows, optimizers


NAMES = ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_stacked_step_moves_every_row_as_its_own_optimizer_would(name):
    make_optimizer = OPTIMIZERS[name]
    expected, expected_optimizers = _train_separately(make_optimizer, steps=6)
    rows, optimizers = _make_rows(make_optimizer)
    stepper = StackedOptimizer(StackedShadows(rows, NAMES), optimizers)
    for step in range(6):
        stepper.accumulate_gradients(_gradients(rows, step), zero_grad=True)
        stepper.step()
        stepper.release_gradients()
    for module, reference in zip(rows, expected):
        for p, q in zip(module.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    # each row's optimizer sees its own state, as the separate optimizer built it
    for optimizer, reference in zip(optimizers, expected_optimizers):
        for p, q in zip(optimizer.param_groups[0]["params"], reference.param_groups[0]["params"]):
            for key, value in reference.state[q].items():
                torch.testing.assert_close(optimizer.state[p][key], value, rtol=1e-9, atol=1e-10)


def test_row_state_is_a_view_so_an_in_place_pull_back_reaches_the_stacked_state():
    rows, optimizers = _make_rows(OPTIMIZERS["adam"])
    stepper = StackedOptimizer(StackedShadows(rows, NAMES), optimizers)
    stepper.accumulate_gradients(_gradients(rows, 0), zero_grad=True)
    stepper.step()
    first = next(rows[2].parameters())
    optimizers[2].state[first]["exp_avg"].mul_(0.0)
    stacked_first = stepper.stacked_params[0]
    assert torch.all(stepper.optimizer.state[stacked_first]["exp_avg"][2] == 0)
    assert torch.all(stepper.optimizer.state[stacked_first]["exp_avg"][1] != 0)


def _train_stacked_with_a_restack(rows, optimizers, names, steps=6, keep=(0, 1, 3)):
    """Half the steps stacked, then unstack and stack the rows in ``keep`` anew, as the finder does when a candidate
    diverges; the row left out steps on with its own optimizer."""
    stepper = StackedOptimizer(StackedShadows(rows, names), optimizers)
    for step in range(steps // 2):
        stepper.accumulate_gradients(_gradients(rows, step, names), zero_grad=True)
        stepper.step()
    stepper.unstack()
    keep = list(keep)
    (left_out,) = set(range(len(rows))) - set(keep)
    stepper = StackedOptimizer(StackedShadows([rows[k] for k in keep], names), [optimizers[k] for k in keep])
    for step in range(steps // 2, steps):
        grads = _gradients(rows, step, names)
        stepper.accumulate_gradients([g[keep] for g in grads], zero_grad=True)
        stepper.step()
        for name, g in zip(names, grads):
            rows[left_out].get_parameter(name).grad = g[left_out].clone()
        optimizers[left_out].step()


def test_restacking_a_subset_of_rows_carries_their_state_on():
    """The finder's path when candidates diverge: unstack, stack the rest anew with their state, go on. The rows that
    remain end where their own optimizers would have taken them; the row left out steps on alone, also as expected."""
    make_optimizer = OPTIMIZERS["adam_amsgrad_wd"]
    expected, _ = _train_separately(make_optimizer, steps=6)
    rows, optimizers = _make_rows(make_optimizer)
    _train_stacked_with_a_restack(rows, optimizers, NAMES)
    for module, reference in zip(rows, expected):
        for p, q in zip(module.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_unstack_hands_each_row_its_accumulated_gradients():
    rows, optimizers = _make_rows(OPTIMIZERS["sgd"])
    stepper = StackedOptimizer(StackedShadows(rows, NAMES), optimizers)
    grads = _gradients(rows, 0)
    stepper.accumulate_gradients(grads, zero_grad=True)
    stepper.accumulate_gradients(grads, zero_grad=False)
    stepper.unstack()
    for k, module in enumerate(rows):
        for p, g in zip(module.parameters(), grads):
            torch.testing.assert_close(p.grad, 2 * g[k])
    assert all(p.grad is None for p in stepper.stacked_params)


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    "make_optimizer, reason",
    [
        (lambda p, lr: torch.optim.ASGD(p, lr=lr), "ASGD"),
        (lambda p, lr: torch.optim.Rprop(p, lr=lr), "Rprop"),
        (lambda p, lr: torch.optim.Adagrad(p, lr=lr, lr_decay=0.1), "lr_decay"),
        (lambda p, lr: _MySGD(p, lr=lr), "_MySGD"),
    ],
)
def test_optimizers_not_linear_in_the_learning_rate_are_refused(make_optimizer, reason):
    rows, optimizers = _make_rows(make_optimizer)
    with pytest.raises(NotVectorizable, match=reason):
        StackedOptimizer(StackedShadows(rows, NAMES), optimizers)


def test_rows_that_differ_in_another_hyperparameter_are_refused():
    rows, optimizers = _make_rows(OPTIMIZERS["adam"])
    optimizers[1].param_groups[0]["betas"] = (0.8, 0.999)
    with pytest.raises(NotVectorizable, match="besides the learning rate"):
        StackedOptimizer(StackedShadows(rows, NAMES), optimizers)


class WithTemperatureAndFrozenStem(nn.Module):
    """A 0-dim trainable parameter (a learnable temperature) and a frozen layer that the optimizer still holds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 5)
        self.stem.requires_grad_(False)
        self.out = nn.Linear(5, 3)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.out(torch.tanh(self.stem(x))) / self.temperature


TRAINABLE = ["out.weight", "out.bias", "temperature"]


def _odd_rows(make_optimizer, clear_state=False):
    torch.manual_seed(0)
    base = WithTemperatureAndFrozenStem().double()
    rows = [copy.deepcopy(base) for _ in LRS]
    optimizers = [make_optimizer(module.parameters(), lr) for module, lr in zip(rows, LRS)]
    if clear_state:  # no state at all: torch before 2.13 cannot step Adagrad so, a fresh stacked optimizer can
        for optimizer in optimizers:
            optimizer.state.clear()
    return rows, optimizers


def _train_odd_rows_separately(make_optimizer, steps):
    rows, optimizers = _odd_rows(make_optimizer)
    for step in range(steps):
        grads = _gradients(rows, step, TRAINABLE)
        for k, (module, optimizer) in enumerate(zip(rows, optimizers)):
            for name, g in zip(TRAINABLE, grads):
                module.get_parameter(name).grad = g[k].clone()
            optimizer.step()
    return rows


def _assert_rows_match(rows, expected):
    for module, reference in zip(rows, expected):
        for p, q in zip(module.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_optimizer_defaults_reach_state_made_after_a_cleared_start():
    """Adagrad makes its accumulators from the constructor's initial_accumulator_value, not the group's: the stacked
    optimizer, built over rows without state, must be given it (it used to start from 0)."""
    make_optimizer = lambda p, lr: torch.optim.Adagrad(p, lr=lr, initial_accumulator_value=1.0)  # noqa: E731
    expected = _train_odd_rows_separately(make_optimizer, steps=4)  # from the state Adagrad makes when built
    rows, optimizers = _odd_rows(make_optimizer, clear_state=True)
    stepper = StackedOptimizer(StackedShadows(rows, TRAINABLE), optimizers)
    assert all(torch.all(state["sum"] == 1.0) for state in stepper.optimizer.state.values())
    for step in range(4):
        stepper.accumulate_gradients(_gradients(rows, step, TRAINABLE), zero_grad=True)
        stepper.step()
    _assert_rows_match(rows, expected)


def test_frozen_parameters_in_the_optimizer_and_a_scalar_parameter_restack_exactly():
    """A frozen layer the optimizer holds (not in the stack) used to raise KeyError; a 0-dim parameter's momentum was
    taken as a shared scalar at a restack and broke the next step."""
    make_optimizer = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)  # noqa: E731
    expected = _train_odd_rows_separately(make_optimizer, steps=6)
    rows, optimizers = _odd_rows(make_optimizer)
    _train_stacked_with_a_restack(rows, optimizers, TRAINABLE)
    _assert_rows_match(rows, expected)


def test_the_pull_back_leaves_nadams_shared_mu_product_alone():
    """NAdam's mu_product is one tensor shared by the rows; for a 0-dim parameter it has the parameter's shape, and
    the pull-back's (shadow − reference)·scale + reference zeroed it when shadow and reference were the same tensor."""
    from lightning_chaos.shadow import ShadowEnsemble

    rows, optimizers = _odd_rows(lambda p, lr: torch.optim.NAdam(p, lr=lr))
    stepper = StackedOptimizer(StackedShadows(rows, TRAINABLE), optimizers)
    for step in range(3):
        stepper.accumulate_gradients(_gradients(rows, step, TRAINABLE), zero_grad=True)
        stepper.step()
    ensemble = ShadowEnsemble.__new__(ShadowEnsemble)  # row 0 as the reference, row 1 as its shadow
    ensemble.real_optimizer = optimizers[0]
    ensemble.real_params = [rows[0].get_parameter(n) for n in TRAINABLE]
    mu_product = optimizers[0].state[rows[0].temperature]["mu_product"].clone()
    assert mu_product != 0
    ensemble._scale_optimizer_state(optimizers[1], [rows[1].get_parameter(n) for n in TRAINABLE], torch.tensor(0.5))
    assert optimizers[1].state[rows[1].temperature]["mu_product"] == mu_product


def test_an_optimizer_holding_a_trainable_parameter_outside_the_stack_is_refused():
    rows, optimizers = _odd_rows(lambda p, lr: torch.optim.SGD(p, lr=lr))
    with pytest.raises(NotVectorizable, match="not in the stack"):
        StackedOptimizer(StackedShadows(rows, ["out.weight", "out.bias"]), optimizers)
