"""A LeNet-style CNN on scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, shipped
inside scikit-learn: no download), trained twice side by side: built from fastconv layers, and
the same model on ``torch.nn``, from the same initial weights and the same batches."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fastconv


def lenet(num_classes: int = 10) -> nn.Sequential:
    """LeNet-style CNN for (N, 1, 8, 8) digits, in ``torch.nn`` layers (convert it to train
    on fastconv): conv 3x3 -> max pool 2 -> conv 3x3 -> avg pool 2 -> two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),    # 32 x 2 x 2
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, num_classes))


def load(test_fraction: float = 0.25, seed: int = 0):
    """The digits as ((x_train, y_train), (x_test, y_test)); x float32 (N, 1, 8, 8), y int64.
    The split is stratified and fixed by ``seed``; pixels (0..16) are standardised with the
    training set's mean and standard deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                   stratify=digits.target)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


@dataclass
class History:
    """Per-epoch training loss, test accuracy and seconds spent training."""

    name: str
    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    seconds: list = field(default_factory=list)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def train(epochs: int = 15, batch: int = 32, lr: float = 1e-2, seed: int = 0, progress=None):
    """Train the fastconv LeNet and the ``torch.nn`` one, epoch by epoch in turn.

    ``progress(description)``, if given, is called after each model's epoch. Returns
    ``(fastconv_history, torch_history)``.
    """
    (x_train, y_train), (x_test, y_test) = load(seed=seed)
    torch.manual_seed(seed)
    reference = lenet()
    models = {"fastconv": fastconv.convert(copy.deepcopy(reference)), "torch.nn": reference}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    histories = {name: History(name) for name in models}
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(y_train), generator=order)  # same batches for both models
        for name, model in models.items():
            start, total = time.perf_counter(), 0.0
            for i in range(0, len(perm), batch):
                idx = perm[i:i + batch]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                total += loss.item() * len(idx)
            h = histories[name]
            h.seconds.append(time.perf_counter() - start)
            h.loss.append(total / len(y_train))
            h.accuracy.append(_accuracy(model, x_test, y_test))
            if progress is not None:
                progress(f"epoch {epoch + 1}/{epochs} {name}: test accuracy "
                         f"{h.accuracy[-1]:.1%}")
    return histories["fastconv"], histories["torch.nn"]


def plot(histories, path: str) -> str:
    """Save loss and test-accuracy curves of each history to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for h, style in zip(histories, ("-o", "--s")):
        epochs = range(1, len(h.loss) + 1)
        ax_loss.plot(epochs, h.loss, style, label=h.name, markersize=4)
        ax_acc.plot(epochs, [100 * a for a in h.accuracy], style, label=h.name, markersize=4)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log",
                title="LeNet on sklearn digits: loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
