"""Small ready-made pieces for the quickstart, examples, tests and benchmarks: real offline data and an MLP.

Nothing here is needed to use the callbacks; it needs scikit-learn (the ``examples``/``test`` extras) for the data.
"""

from typing import Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


def load_digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits (1797 real 8×8 images, 10 classes), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits data needs scikit-learn: pip install 'lightning-chaos[examples]'"
        ) from error
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=dtype), torch.tensor(labels, dtype=torch.long)


class DigitsDataModule(LightningDataModule):
    """scikit-learn digits split into a fixed training set and validation set (a seeded shuffle, no download).

    Args:
        batch_size: training batch size; ``None`` for full-batch gradient descent.
        val_fraction: share of the 1797 images held out for validation.
        split_seed: seed of the split (independent of the global RNG).
        dtype: floating dtype of the images (``torch.float64`` for the papers' protocol).
    """

    def __init__(
        self,
        batch_size: Optional[int] = 64,
        val_fraction: float = 0.25,
        split_seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be None or >= 1, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must lie in (0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.dtype = dtype

    def setup(self, stage: str) -> None:
        images, labels = load_digits_tensors(self.dtype)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        num_val = int(round(self.val_fraction * len(labels)))
        self.train_set = TensorDataset(images[order[num_val:]], labels[order[num_val:]])
        self.val_set = TensorDataset(images[order[:num_val]], labels[order[:num_val]])

    def train_dataloader(self) -> DataLoader:
        batch_size = self.batch_size or len(self.train_set)
        return DataLoader(self.train_set, batch_size=batch_size, shuffle=self.batch_size is not None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class _Classifier(LightningModule):
    """What the demo classifiers share: cross-entropy, ``train_loss``/``val_loss``/``val_acc`` logging, SGD on ``lr``."""

    net: nn.Module

    def __init__(self, num_classes: int, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", self.val_accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class MLPClassifier(_Classifier):
    """A multilayer perceptron classifier trained with SGD; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Args:
        in_features: input size (64 for the 8×8 digits).
        hidden: sizes of the hidden layers.
        num_classes: number of classes.
        lr: learning rate of SGD.
        momentum: SGD momentum.
        dropout: dropout probability after each hidden layer.
        activation: ``"tanh"`` or ``"relu"``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] = (128,),
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.0,
        dropout: float = 0.0,
        activation: str = "tanh",
    ) -> None:
        super().__init__(num_classes, lr, momentum)
        self.save_hyperparameters()
        if activation not in ("tanh", "relu"):
            raise ValueError(f"`activation` must be 'tanh' or 'relu', got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh() if activation == "tanh" else nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(root: str = FASHION_MNIST_DIR, limit: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's training images (as shipped by Debian's ``dataset-fashion-mnist``), [N, 1, 28, 28] in [0, 1]."""
    import gzip
    from pathlib import Path

    import numpy as np

    def read(name: str, offset: int) -> "np.ndarray":
        with gzip.open(Path(root) / name, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)

    images = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = read("train-labels-idx1-ubyte.gz", 8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.tensor(images, dtype=torch.float32) / 255.0, torch.tensor(labels, dtype=torch.long)


class OfflineImagesDataModule(DigitsDataModule):
    """Real offline images: Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed, else the digits.

    Args:
        dataset: ``"auto"`` (Fashion-MNIST if present, else digits), ``"fashion"`` or ``"digits"``.
        limit: use the first ``limit`` Fashion-MNIST images (all 60 000 by default: slow on a CPU).
        batch_size: as :class:`DigitsDataModule`.
        val_fraction: as :class:`DigitsDataModule`.
        split_seed: as :class:`DigitsDataModule`.
    """

    def __init__(
        self, dataset: str = "auto", limit: Optional[int] = 10000, batch_size: Optional[int] = 64,
        val_fraction: float = 0.25, split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, split_seed=split_seed)
        if dataset not in ("auto", "fashion", "digits"):
            raise ValueError(f"`dataset` must be 'auto', 'fashion' or 'digits', got {dataset!r}")
        import os

        self.dataset = ("fashion" if os.path.isdir(FASHION_MNIST_DIR) else "digits") if dataset == "auto" else dataset
        self.limit = limit

    @property
    def num_features(self) -> int:
        """Pixels per image: 784 for Fashion-MNIST, 64 for the digits."""
        return 784 if self.dataset == "fashion" else 64

    def setup(self, stage: str) -> None:
        if self.dataset == "digits":
            return super().setup(stage)
        images, labels = load_fashion_mnist(limit=self.limit)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        num_val = int(round(self.val_fraction * len(labels)))
        self.train_set = TensorDataset(images[order[num_val:]], labels[order[num_val:]])
        self.val_set = TensorDataset(images[order[:num_val]], labels[order[:num_val]])


class SmallCNN(_Classifier):
    """A small convolutional classifier for square grey images of any size (8×8 digits, 28×28 Fashion-MNIST).

    Two 3×3 convolutions with ReLU and max-pooling, adaptive max-pooling to 2×2, a linear read-out; SGD on ``lr``.

    Args:
        channels: output channels of the two convolutions.
        num_classes: as :class:`MLPClassifier`.
        lr: as :class:`MLPClassifier`.
        momentum: as :class:`MLPClassifier`.
        in_features: accepted for configuration symmetry with the MLP and ignored.
    """

    def __init__(
        self, channels: tuple[int, int] = (8, 16), num_classes: int = 10, lr: float = 0.1, momentum: float = 0.0,
        in_features: Optional[int] = None,
    ) -> None:
        super().__init__(num_classes, lr, momentum)
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * 4, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # flat pixels: back to a square image
            side = int(round(x.shape[1] ** 0.5))
            x = x.view(-1, 1, side, side)
        return self.net(x)
