"""A workload other than digits, for checking that the commands take theirs from ``--workload``: 4x4 images
of random noise, labelled by whether their mean is over a half, and a two-layer network trained on them in
a fraction of a second."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from heclave.workloads import Split, Workload

SHAPE = (1, 4, 4)


def tiny_data() -> Split:
    """60 images for the attacker's side, 20 held out, values in [0, 1]."""
    images = np.random.default_rng(7).uniform(0, 1, (80, *SHAPE)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    return images[:60], images[60:], labels[:60], labels[60:]


def tiny_train() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(7)
    x_train, x_test, y_train, y_test = tiny_data()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x_train)), torch.from_numpy(y_train)).backward()
        optimiser.step()
    return model.eval(), x_test, y_test


def tiny() -> Workload:
    return Workload("noise", "tiny-net", SHAPE, tiny_data, tiny_train)
