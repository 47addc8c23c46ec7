"""TenSEAL's tutorial CNN three ways in one run: heclave's four processes, TenSEAL's recipe, plaintext torch.

The network is the one of TenSEAL's tutorial "Encrypted Convolution on MNIST":
a 28x28 image, ``Conv2d(1, 4, kernel 7, stride 3)`` (256 values), a dense
layer to 64 and one to 10, with random (seeded) weights and random images.

- heclave: exact ReLU, through a real enclave process and a real server
  process started by :class:`parties.processes.Cluster`; the model owner
  deploys, the data owner classifies. Latency is the data owner's, from
  encrypting the input to opening the sealed result.
- heclave again, on a second cluster whose enclave skips its checks of the
  server's layers (``--insecure-skip-verification``), with requests alternating
  between the two clusters, never overlapping: the ``verification`` entry gives
  the median latency and enclave ms per image with and without the checks.
- TenSEAL's recipe, as the tutorial writes it: im2col encoding, one
  ``conv2d_im2col`` per kernel, ``pack_vectors``, ``x^2`` activations and
  ``mm``, with the tutorial's context (N = 8192, a 31/26.../31-bit modulus,
  scale 2^26, every power-of-two Galois key). Its time covers encoding and
  encryption, the network, and decryption, and it always has plaintext weights.
- Plaintext torch with ReLU, one image at a time.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np
import tenseal as ts
import torch
import torch.nn as nn

from heclave.graph.placement import WeightForm
from heclave.he.context import SecretKeySet
from heclave.parties.accounting import WorkSplit
from heclave.parties.data_owner import DataOwner, Inference
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.protocol.errors import HeclaveError, PlanError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity

INPUT_SHAPE = (1, 28, 28)
KERNEL, STRIDE = 7, 3
TENSEAL_SCALE_BITS = 26
# The enclave runs natively here and presents no SGX quote: acceptable for a benchmark only.
MODEL_OWNER, DATA_OWNER = Identity.generate(), Identity.generate()  # this run's two parties
# What verifying every server-computed layer may cost: latency and enclave ms per image, as ratios - 1.
LATENCY_BOUND, ENCLAVE_BOUND = 0.05, 0.10


class Square(nn.Module):
    """TenSEAL's recipe replaces ReLU by ``x^2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def tutorial_cnn(activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """The tutorial's shapes: conv 4x7x7 stride 3 (256 values), dense 256->64, dense 64->10."""
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=KERNEL, stride=STRIDE),
        activation(),
        nn.Flatten(),
        nn.Linear(256, 64),
        activation(),
        nn.Linear(64, 10),
    )


def _with_square(model: nn.Sequential) -> nn.Sequential:
    squared = tutorial_cnn(Square)
    squared.load_state_dict(model.state_dict())
    return squared.eval()


class TensealRecipe:
    """The tutorial's ``EncConvNet``, on the tutorial's context."""

    def __init__(self, model: nn.Sequential) -> None:
        conv, fc1, fc2 = model[0], model[3], model[5]
        self.conv_weight = conv.weight.data.view(conv.out_channels, KERNEL, KERNEL).tolist()
        self.conv_bias = conv.bias.data.tolist()
        self.fc1_weight, self.fc1_bias = fc1.weight.T.data.tolist(), fc1.bias.data.tolist()
        self.fc2_weight, self.fc2_bias = fc2.weight.T.data.tolist(), fc2.bias.data.tolist()
        bits = TENSEAL_SCALE_BITS
        self.context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=[31, bits, bits, bits, bits, bits, bits, 31],
        )
        self.context.global_scale = 2.0**bits
        self.context.generate_galois_keys()

    def public_context_bytes(self) -> int:
        return len(
            self.context.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
            )
        )

    def infer(self, image: np.ndarray) -> np.ndarray:
        """Encrypt, run the network and decrypt one 28x28 image, as the tutorial does."""
        enc_x, windows_nb = ts.im2col_encoding(self.context, image.reshape(28, 28).tolist(), KERNEL, KERNEL, STRIDE)
        channels = [
            enc_x.conv2d_im2col(kernel, windows_nb) + bias for kernel, bias in zip(self.conv_weight, self.conv_bias)
        ]
        enc_x = ts.CKKSVector.pack_vectors(channels)
        enc_x.square_()
        enc_x = enc_x.mm(self.fc1_weight) + self.fc1_bias
        enc_x.square_()
        enc_x = enc_x.mm(self.fc2_weight) + self.fc2_bias
        return np.asarray(enc_x.decrypt())


def _plaintext(model: nn.Module, images: np.ndarray) -> tuple[float, np.ndarray]:
    """Median ms of one image through float32 torch, and float64 logits for every image."""
    times = []
    with torch.no_grad():
        for image in torch.from_numpy(images.astype(np.float32)):
            started = time.perf_counter()
            model(image[None])
            times.append((time.perf_counter() - started) * 1e3)
        logits = copy.deepcopy(model).double()(torch.from_numpy(images)).numpy()
    return median(times), logits


@dataclass
class _Pipeline:
    """One cluster with the model deployed and a data owner connected."""

    cluster: Cluster
    data_owner: DataOwner
    model_id: str

    def classify(self, images: np.ndarray) -> tuple[Inference, float]:
        """One request for ``images``: its inference and the wall seconds it took."""
        started = time.perf_counter()
        try:
            inference = self.data_owner.infer_batch(self.model_id, images)
        except HeclaveError:
            self.cluster.check()
            raise
        return inference, time.perf_counter() - started


def _deploy(cluster: Cluster, model: nn.Module, weights: WeightForm, batch: int) -> tuple[_Pipeline, dict]:
    """Plan and deploy on ``cluster``, and connect a data owner; with the deployment's sizes and time."""
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, VerifierPolicy.development())
    try:
        started = time.perf_counter()
        plan = owner.plan(model, INPUT_SHAPE, weights, name="tenseal-tutorial-cnn", batch=batch)
        model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
        deploy_s = time.perf_counter() - started
        params = owner.connection.params
    finally:
        owner.close()
    # The enclave made the model's own key set; an identical one here gives the sizes of its public context
    # and of its Galois keys for exactly the plan's steps without reaching into the owner's reply.
    keys = SecretKeySet(params)
    deployment = {
        "deploy_s": deploy_s,
        "base_context_bytes": len(keys.public.to_bytes()),
        "galois_bytes": len(keys.galois_keys(plan.graph.rotation_steps)),
        "galois_steps": len(plan.graph.rotation_steps),
        "stages": plan.summary(),
    }
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, VerifierPolicy.development())
    return _Pipeline(cluster, data_owner, model_id), deployment


def _run_ours(
    verified: Cluster,
    unverified: Cluster,
    model: nn.Module,
    images: np.ndarray,
    weights: WeightForm,
    batch: int,
    rounds: int,
    say: Callable[[str], None],
) -> dict:
    """Every image through both clusters ``rounds`` times, one request at a time, alternating which goes first.

    The first round is the benchmark; all rounds go into the comparison of the two. The clusters never
    run at once, and alternating the order per request spreads any drift of the machine (frequency,
    caches, the other cluster's idle precomputation) evenly over both.
    """
    say(f"model owner: planning and deploying with {weights.value} weights")
    ours, deployment = _deploy(verified, model, weights, batch)
    say("model owner: deploying again on the enclave that skips verification")
    skipping, _ = _deploy(unverified, model, weights, batch)
    pipelines = (ours, skipping)
    first_round: list[Inference] = []
    wall_s = 0.0
    compared: tuple[list[Inference], list[Inference]] = ([], [])
    try:
        say("data owners: warm-up inferences")
        for pipeline in pipelines:
            pipeline.classify(images[:batch])
        starts = range(0, len(images), batch)
        for n, (round_, first) in enumerate((r, f) for r in range(rounds) for f in starts):
            group = images[first : first + batch]
            say(
                f"data owners: images {first + 1}-{first + len(group)} of {len(images)}, "
                f"round {round_ + 1} of {rounds}, with and without verification"
            )
            for side in (0, 1) if n % 2 == 0 else (1, 0):
                inference, seconds = pipelines[side].classify(group)
                compared[side].append(inference)
                if side == 0 and round_ == 0:
                    first_round.append(inference)
                    wall_s += seconds
    finally:
        for pipeline in pipelines:
            pipeline.data_owner.close()
    rss = {child.name: child.peak_rss_mb() for child in verified.children}
    return {
        "inferences": first_round,
        "wall_s": wall_s,
        "verification": verification_overhead(*compared),
        "rss": rss,
        **deployment,
    }


def _enclave_ms_per_image(inference: Inference) -> float:
    return float(inference.server.get("enclave_ms", 0.0)) / len(inference.results)


def verification_overhead(verified: list[Inference], unverified: list[Inference]) -> dict:
    """Median latency and enclave ms per image with and without the enclave's checks, and their ratios - 1."""
    report: dict = {"requests": len(verified)}
    for name, of in (("latency", lambda inf: inf.latency_ms), ("enclave", _enclave_ms_per_image)):
        with_checks, without = median(map(of, verified)), median(map(of, unverified))
        key = "latency_ms" if name == "latency" else "enclave_ms"
        report[f"{key}_verified"] = with_checks
        report[f"{key}_unverified"] = without
        report[f"{name}_overhead"] = with_checks / without - 1 if without > 0 else float("nan")
    report["within_bounds"] = bool(
        report["latency_overhead"] <= LATENCY_BOUND and report["enclave_overhead"] <= ENCLAVE_BOUND
    )
    return report


def bench_cnn(
    weights: WeightForm = WeightForm.ENCRYPTED,
    samples: int = 20,
    batch: int = 1,
    tenseal_runs: int = 2,
    seed: int = 0,
    verification_rounds: int = 3,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Run the comparison; returns the report ``heclave bench cnn`` prints. ``say`` receives progress lines.

    ``verification_rounds``: how many times every image goes through both clusters (with and without
    the enclave's checks) for the ``verification`` entry; the other numbers come from the first round.
    """
    if samples < 1 or batch < 1 or tenseal_runs < 1 or verification_rounds < 1:
        raise PlanError("Samples, batch, TenSEAL runs and verification rounds must each be at least 1.")
    torch.manual_seed(seed)
    model = tutorial_cnn().eval()
    images = torch.rand((samples, *INPUT_SHAPE), generator=torch.Generator().manual_seed(seed + 1)).double().numpy()

    say("plaintext torch")
    plaintext_ms, plain_logits = _plaintext(model, images)
    squared = _with_square(model)
    with torch.no_grad():
        square_logits = squared.double()(torch.from_numpy(images)).numpy()

    say("TenSEAL's recipe: keys")
    recipe = TensealRecipe(model)
    recipe_times, recipe_logits = [], []
    for i in range(min(tenseal_runs, samples)):
        say(f"TenSEAL's recipe: image {i + 1} of {min(tenseal_runs, samples)}")
        started = time.perf_counter()
        recipe_logits.append(recipe.infer(images[i])[:10])
        recipe_times.append((time.perf_counter() - started) * 1e3)
    recipe_logits_arr = np.stack(recipe_logits)
    reference = square_logits[: len(recipe_logits)]

    say("starting two enclaves and servers, one without verification")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="heclave-bench-")))
        (workdir / "verified").mkdir()
        (workdir / "unverified").mkdir()
        verified = stack.enter_context(Cluster(workdir / "verified"))
        unverified = stack.enter_context(Cluster(workdir / "unverified", insecure_skip_verification=True))
        ours = _run_ours(verified, unverified, model, images, weights, batch, verification_rounds, say)

    inferences: list[Inference] = ours["inferences"]
    enc_logits = np.concatenate([inf.batch_logits for inf in inferences])
    ours_ms = median(inf.latency_ms for inf in inferences)
    images_done = len(enc_logits)
    work = WorkSplit.of(inferences, images_done)
    tenseal_ms = median(recipe_times)
    public_bytes = ours["base_context_bytes"] + ours["galois_bytes"]
    return {
        "benchmark": "cnn",
        "weights": weights.value,
        "tenseal_weights": WeightForm.PLAIN.value,
        "samples": samples,
        "batch": batch,
        "ours_ms": ours_ms,
        "tenseal_recipe_ms": tenseal_ms,
        "plaintext_ms": plaintext_ms,
        "speedup_vs_tenseal": tenseal_ms / ours_ms,
        "throughput_speedup_vs_tenseal": tenseal_ms * images_done / (ours["wall_s"] * 1e3),
        "slowdown_vs_plaintext": ours_ms / plaintext_ms,
        "enclave_share": work.enclave_share,
        "enclave_share_with_offline": work.enclave_share_with_offline,
        "agreement": float((enc_logits.argmax(1) == plain_logits.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(enc_logits - plain_logits).max()),
        "images_per_s": images_done / ours["wall_s"],
        "latency_ms_p95": float(np.percentile([inf.latency_ms for inf in inferences], 95)),
        **work.to_dict(),
        "client_encrypt_ms_per_image": sum(inf.encrypt_ms for inf in inferences) / images_done,
        "rotations_per_image": sum(inf.server.get("rotations", 0) for inf in inferences) / images_done,
        "bytes_per_image": sum(inf.bytes_moved for inf in inferences) / images_done,
        "public_context_mb": public_bytes / 1e6,
        "base_context_mb": ours["base_context_bytes"] / 1e6,
        "galois_keys_mb": ours["galois_bytes"] / 1e6,
        "galois_steps": ours["galois_steps"],
        "tenseal_public_context_mb": recipe.public_context_bytes() / 1e6,
        "server_peak_rss_mb": ours["rss"].get("server", float("nan")),
        "enclave_peak_rss_mb": ours["rss"].get("enclave", float("nan")),
        "deploy_s": ours["deploy_s"],
        "tenseal_runs": len(recipe_times),
        "tenseal_agreement_with_x2": float((recipe_logits_arr.argmax(1) == reference.argmax(1)).mean()),
        "tenseal_max_abs_err_vs_x2": float(np.abs(recipe_logits_arr - reference).max()),
        "verification": ours["verification"],
        "stages": [
            f"{s['shape']} {s['layout']} rotations={s['rotations']} then {s['enclave']}" for s in ours["stages"]
        ],
    }
