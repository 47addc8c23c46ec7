"""Privacy assessment: how well can an adversary rebuild the input from the feature map at each cut?

A ``plain`` placement from some layer on hands the server the activation at
that cut. Two attacks are trained or run against every candidate cut (the input
itself, then the activation after each stage of the imported model):

- a learned decoder (black box, with auxiliary data from the same
  distribution), in the style of Origami's and the layer-partitioning work's
  inversion networks: an MLP from feature map to image, trained with MSE;
- optimisation-based reconstruction (white box, knows the weights; rMLE): start
  from a grey image and follow the gradient of the feature-map distance, with a
  small total-variation prior.

Reconstructions are scored with SSIM and PSNR against the originals. No cut is
called safe by this module: the report states the attacks and their budgets,
and the model owner sets the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .activation_import import torch_step
from .importer import ImportedModel


@dataclass(frozen=True)
class Budget:
    """How hard each attack tries."""

    decoder_epochs: int = 60
    decoder_hidden: int = 256
    rmle_steps: int = 200
    rmle_images: int = 16
    seed: int = 0


def ssim(a: np.ndarray, b: np.ndarray, window: int = 3) -> float:
    """Mean structural similarity of two images ``(C, H, W)`` in [0, 1], uniform ``window`` x ``window``."""
    c1, c2 = 0.01**2, 0.03**2
    ta = torch.as_tensor(a, dtype=torch.float64)[None]
    tb = torch.as_tensor(b, dtype=torch.float64)[None]
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    mu_a, mu_b = pool(ta), pool(tb)
    var_a = pool(ta * ta) - mu_a**2
    var_b = pool(tb * tb) - mu_b**2
    cov = pool(ta * tb) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean().clamp(0.0, 1.0))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def cut_functions(imported: ImportedModel) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The server's view at each candidate cut, as differentiable torch functions of the input batch."""
    cuts: list[tuple[str, Callable]] = [("input", lambda x: x.reshape(len(x), -1))]
    for i, (affine, ops) in enumerate(imported.stages[:-1]):
        done = [
            (torch.from_numpy(a.weight), torch.from_numpy(a.bias), o, imported.source(j))
            for j, (a, o) in enumerate(imported.stages[: i + 1])
        ]

        def view(x: torch.Tensor, done=done) -> torch.Tensor:
            values = {0: x.reshape(len(x), -1)}
            for j, (weight, bias, steps, source) in enumerate(done):
                h = values[source] @ weight.T + bias
                for op in steps:
                    h = torch_step(op, values)(h)
                values[j + 1] = h
            return values[len(done)]

        label = "+".join(["linear"] + [op.kind.value for op in ops])
        cuts.append((f"after stage {i + 1} ({label}, {affine.out_shape})", view))
    return cuts


def _decoder_attack(view, x_train, x_test, shape, budget: Budget) -> np.ndarray:
    torch.manual_seed(budget.seed)
    with torch.no_grad():
        f_train, f_test = view(x_train), view(x_test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    n = int(np.prod(shape))
    decoder = nn.Sequential(
        nn.Linear(f_train.shape[1], budget.decoder_hidden), nn.ReLU(), nn.Linear(budget.decoder_hidden, n), nn.Sigmoid()
    ).double()
    optimiser = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    target = x_train.reshape(len(x_train), -1)
    generator = torch.Generator().manual_seed(budget.seed)
    for _ in range(budget.decoder_epochs):
        for batch in torch.randperm(len(f_train), generator=generator).split(128):
            optimiser.zero_grad()
            F.mse_loss(decoder((f_train[batch] - mean) / std), target[batch]).backward()
            optimiser.step()
    with torch.no_grad():
        return decoder((f_test - mean) / std).reshape(len(x_test), *shape).numpy()


def _optimisation_attack(view, x_test, shape, budget: Budget) -> np.ndarray:
    with torch.no_grad():
        target = view(x_test)
    logits = torch.zeros((len(x_test), *shape), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    scale = target.abs().mean() + 1e-9
    for _ in range(budget.rmle_steps):
        optimiser.zero_grad()
        image = torch.sigmoid(logits)
        tv = (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., 1:] - image[..., :-1]).abs().mean()
        (F.mse_loss(view(image), target) / scale**2 + 1e-3 * tv).backward()
        optimiser.step()
    return torch.sigmoid(logits).detach().numpy()


def assess(
    imported: ImportedModel,
    x_train: np.ndarray,
    x_test: np.ndarray,
    budget: Budget = Budget(),
    threshold: float | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    """SSIM and PSNR of both attacks at every cut; reconstructions kept for the figure."""
    shape = imported.input_shape
    train = torch.as_tensor(x_train, dtype=torch.float64)
    test = torch.as_tensor(x_test[: budget.rmle_images], dtype=torch.float64)
    originals = test.numpy()
    cuts = []
    for depth, (name, view) in enumerate(cut_functions(imported)):
        say(f"cut {depth}: {name}")
        attacks = {
            "decoder": _decoder_attack(view, train, test, shape, budget),
            "optimisation": _optimisation_attack(view, test, shape, budget),
        }
        scores = {
            attack: {
                "ssim": float(np.mean([ssim(o, r) for o, r in zip(originals, recon)])),
                "psnr_db": float(np.mean([min(psnr(o, r), 99.0) for o, r in zip(originals, recon)])),
            }
            for attack, recon in attacks.items()
        }
        worst = max(s["ssim"] for s in scores.values())
        cuts.append(
            {
                "depth": depth,
                "cut": name,
                "feature_size": int(view(test[:1]).shape[1]),
                "attacks": scores,
                "max_ssim": worst,
                "below_threshold": None if threshold is None else worst < threshold,
                "reconstructions": {k: v[:4] for k, v in attacks.items()},
            }
        )
    return {
        "attacks": [
            {
                "name": "decoder",
                "kind": "learned inversion network (black box, auxiliary data)",
                "budget": {
                    "epochs": budget.decoder_epochs,
                    "hidden": budget.decoder_hidden,
                    "training_images": len(x_train),
                },
            },
            {
                "name": "optimisation",
                "kind": "white-box reconstruction (rMLE) with a total-variation prior",
                "budget": {"steps": budget.rmle_steps, "images": len(originals)},
            },
        ],
        "threshold": threshold,
        "note": "No cut is safe by default: the model owner chooses the SSIM threshold.",
        "originals": originals[:4],
        "cuts": cuts,
    }


def figure(report: dict, path: str) -> None:
    """Reconstructions beside the originals per cut, and SSIM against depth, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts, originals = report["cuts"], report["originals"]
    shown = len(originals)
    fig = plt.figure(figsize=(2 * shown * 0.9 + 5, 1.1 * (len(cuts) + 1) + 1))
    grid = fig.add_gridspec(len(cuts) + 1, 2 * shown + 1, width_ratios=[1] * (2 * shown) + [2.5 * shown / 2])

    def show(row: int, column: int, image: np.ndarray, title: str = "") -> None:
        ax = fig.add_subplot(grid[row, column])
        ax.imshow(np.moveaxis(image, 0, -1).squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")

    for j in range(shown):
        show(0, j, originals[j], "originals" if j == 0 else "")
    for row, cut in enumerate(cuts, start=1):
        for a, attack in enumerate(("decoder", "optimisation")):
            for j in range(shown):
                label = f"depth {cut['depth']}\n{attack}" if j == 0 else ""
                show(row, a * shown + j, cut["reconstructions"][attack][j], label)
    plot = fig.add_subplot(grid[:, -1])
    for attack in ("decoder", "optimisation"):
        plot.plot([c["depth"] for c in cuts], [c["attacks"][attack]["ssim"] for c in cuts], marker="o", label=attack)
    if report["threshold"] is not None:
        plot.axhline(report["threshold"], linestyle="--", color="grey", label="owner's threshold")
    plot.set_xlabel("cut depth (0 = the input)")
    plot.set_ylabel("SSIM of reconstructions")
    plot.set_ylim(0, 1)
    plot.set_xticks([c["depth"] for c in cuts])
    plot.legend(fontsize=7)
    fig.suptitle("Inversion attacks per cut: reconstructions (left) and SSIM against depth (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
