"""Shared models and trainers for the tests: small, CPU, no network."""

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: on a shared 2-core machine more threads only thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet_trainer(**kwargs):
    """A Trainer without progress bar, checkpoints, model summary or sanity check: only what a test asks for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class Quadratic(L.LightningModule):
    """Full-batch GD on L(θ) = ½ θᵀAθ with A = Q diag(a) Qᵀ: θ ← (I − ηA)θ, exponent ln max_i |1 − η a_i|."""

    def __init__(self, eigenvalues, lr, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(eigenvalues) @ q.T)
        self.weight = nn.Parameter(torch.randn(len(eigenvalues), generator=g, dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return 0.5 * self.weight @ self.a @ self.weight

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dummy_loader(steps):
    """One batch per optimizer step; the quadratic model ignores its contents."""
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


class DropoutMLP(L.LightningModule):
    """A small MLP with dropout, SGD with momentum and a configurable LR scheduler."""

    def __init__(self, lr=0.2, scheduler=None, optimizer="sgd", dropout=0.2, log_metrics=True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
        self.lr = lr
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.log_metrics = log_metrics

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.log_metrics:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr / 20)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.scheduler == "epoch":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)]
        return optimizer


def random_classification(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


@pytest.fixture
def classification_loader():
    return DataLoader(random_classification(), batch_size=16, shuffle=True)


def parameters_of(module):
    return [p.detach().clone() for p in module.parameters()]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """Import ``examples/<name>.py`` as a module, so tests run the scripts users run."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_sweeps_agree_where_learning(stacked, sequential, at_least):
    """Λ and the loss ratio of two finder sweeps agree at every η both ran where the one-at-a-time sweep learns (where
    training fails, chaos amplifies their different rounding)."""
    common = [lr for lr in sequential.lrs[sequential.learning].tolist() if lr in stacked.lrs.tolist()]
    assert len(common) >= at_least
    pick = lambda result, values: values[[result.lrs.tolist().index(lr) for lr in common]]  # noqa: E731
    torch.testing.assert_close(pick(stacked, stacked.exponents), pick(sequential, sequential.exponents),
                               rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(pick(stacked, stacked.loss_ratio), pick(sequential, sequential.loss_ratio),
                               rtol=1e-4, atol=1e-6)
