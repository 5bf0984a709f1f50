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


def _gradients(rows, step):
    torch.manual_seed(100 + step)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for module in rows:
        loss = nn.functional.cross_entropy(module(x), y)
        grads.append(torch.autograd.grad(loss, list(module.parameters())))
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


def test_restacking_a_subset_of_rows_carries_their_state_on():
    """The finder's path when candidates diverge: unstack, stack the rest anew with their state, go on. The rows that
    remain end where their own optimizers would have taken them; the row left out steps on alone, also as expected."""
    make_optimizer = OPTIMIZERS["adam_amsgrad_wd"]
    expected, _ = _train_separately(make_optimizer, steps=6)
    rows, optimizers = _make_rows(make_optimizer)
    stepper = StackedOptimizer(StackedShadows(rows, NAMES), optimizers)
    for step in range(3):
        stepper.accumulate_gradients(_gradients(rows, step), zero_grad=True)
        stepper.step()
    stepper.unstack()
    keep = [0, 1, 3]
    stepper = StackedOptimizer(StackedShadows([rows[k] for k in keep], NAMES), [optimizers[k] for k in keep])
    for step in range(3, 6):
        grads = _gradients(rows, step)
        stepper.accumulate_gradients([g[keep] for g in grads], zero_grad=True)
        stepper.step()
        for p, g in zip(rows[2].parameters(), grads):  # the row left out, on its own optimizer
            p.grad = g[2].clone()
        optimizers[2].step()
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
