"""Workloads the demo, the assessment, the planner and the load test run on, and the default one: a small CNN
trained on scikit-learn's 8x8 digits (shipped with scikit-learn, so nothing is downloaded).

The commands take a workload as ``--workload MODULE:FUNCTION``, a function returning a :class:`Workload`,
so a task of one's own needs no change here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

INPUT_SHAPE = (1, 8, 8)

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Train images, held-out images, train labels, held-out labels."""


@dataclass(frozen=True)
class Workload:
    """A task: the shape of one input, its labelled data, and the model trained on it.

    ``data`` returns images shaped ``(N, *input_shape)`` with values in [0, 1] (the privacy assessment
    scores reconstructions of them); ``train`` returns a trained model with the held-out images and labels.
    ``model_name`` names that model in plans, and as the MODEL of ``heclave assess`` and ``heclave plan``.
    """

    name: str
    model_name: str
    input_shape: tuple[int, ...]
    data: Callable[[], Split]
    train: Callable[[], tuple[nn.Module, np.ndarray, np.ndarray]]


def digits_split(seed: int = 0) -> Split:
    """Train and held-out test images scaled to [0, 1], shape (N, 1, 8, 8), and their labels."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def digits_cnn() -> nn.Module:
    """Conv + batch-norm + ReLU + max-pool, then two dense layers: every import path exercised."""
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread, for training small models: a second thread only adds synchronisation, which on a
    busy 2-core machine made training the digits CNN take 31 s instead of 1.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_digits_cnn(epochs: int = 12, seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Train the CNN in a second or two on CPU; returns the model and the held-out images and labels."""
    with single_threaded():
        return _train_digits_cnn(epochs, seed)


def _train_digits_cnn(epochs: int, seed: int) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = digits_split(seed)
    model = digits_cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(xs), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
            optimiser.step()
    model.eval()
    return model, x_test, y_test


def digits() -> Workload:
    """The default workload: :func:`digits_cnn` trained on scikit-learn's 8x8 digits."""
    return Workload("digits", "digits-cnn", INPUT_SHAPE, digits_split, train_digits_cnn)
