"""Write the files the README's by-hand walkthrough uses: a trained digits CNN and a few digits.

    python -m examples.export_digits [--out DIR] [--samples N]

``cnn.pt`` is a state dict (load it with ``torch.load(weights_only=True)``, as
``heclave model-owner deploy --state-dict`` does); ``digits.npy`` holds held-out
images of shape (N, 1, 8, 8) and ``labels.npy`` their labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from heclave.workloads import train_digits_cnn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args(argv)
    model, x_test, y_test = train_digits_cnn()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "cnn.pt")
    np.save(args.out / "digits.npy", x_test[: args.samples])
    np.save(args.out / "labels.npy", y_test[: args.samples])
    print(f"wrote cnn.pt, digits.npy and labels.npy ({args.samples} digits) to {args.out}")


if __name__ == "__main__":
    main()
