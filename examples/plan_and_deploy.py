"""A model owner assesses and plans a digits CNN, then deploys the plan; a data owner uses it.

    python -m examples.plan_and_deploy [--protect input] [--ssim-threshold 0.5] [--enclave-budget 0.8]

Development run: the enclave is native and unattested, accepted here only for the example.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from heclave.graph.placement import WeightForm
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.plan import from_pytorch
from heclave.plan.assessment import Budget, assess
from heclave.plan.calibration import Calibration
from heclave.plan.exposure import exposure
from heclave.plan.planner import plan_model
from heclave.plan.search import cheapest
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.workloads import INPUT_SHAPE, digits_split, train_digits_cnn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protect", default="input", help="comma-separated: input, weights")
    parser.add_argument("--ssim-threshold", type=float, default=0.5)
    parser.add_argument("--enclave-budget", type=float, default=0.8)
    args = parser.parse_args(argv)

    model, x_test, y_test = train_digits_cnn()
    imported = from_pytorch(model, INPUT_SHAPE)
    x_train, _, _, _ = digits_split()
    report = assess(imported, x_train, x_test, Budget(decoder_epochs=20, rmle_steps=100))
    for cut in report["cuts"]:
        print(f"cut {cut['depth']} ({cut['cut']}): best attack SSIM {cut['max_ssim']:.2f}")
    cut_ssim = {c["depth"]: c["max_ssim"] for c in report["cuts"]}

    protect = {p for p in args.protect.split(",") if p}
    best = cheapest(
        imported, protect, Calibration.load(), WeightForm.ENCRYPTED, args.enclave_budget, cut_ssim, args.ssim_threshold
    )
    placements = [p.value for p in best.placements]
    graph = plan_model(imported, placements=placements).graph
    print(f"plan: {placements}; predicted {best.latency_ms:.1f} ms, enclave share {best.enclave_share:.2f}")
    print("the server will see:", "; ".join(exposure(graph)) or "shapes, sizes and timings only")

    policy = VerifierPolicy.development()
    model_owner, reader = Identity.generate(), Identity.generate()
    with Cluster() as cluster:
        owner = ModelOwner(cluster.endpoint, cluster.server_key_file, model_owner, policy)
        model_id = owner.deploy(owner.plan(model, INPUT_SHAPE, placements=placements), readers=[reader.public])
        owner.close()
        data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, reader, policy)
        labels = data_owner.infer_batch(model_id, x_test[:10]).labels
        data_owner.close()
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test[:10])).argmax(1).numpy()
    print(
        f"labels {labels}; plaintext agrees on {np.mean(np.array(labels) == expected):.0%}; "
        f"true labels {y_test[:10].tolist()}"
    )


if __name__ == "__main__":
    main()
