"""``heclave bench zoo``: which models of the zoo heclave imports and plans today, and how the ones it plans run.

For each selected model of :data:`heclave.examples.zoo.ZOO`:

- the model is built (trained, for the models that are) and then imported and
  planned (``plan.importer.from_pytorch``, ``plan.planner.plan_model``); the row
  records the time that took, or the sentence of the ``PlanError`` that refused
  the model;
- every model that plans is deployed to one real enclave and one real server
  (:class:`parties.processes.Cluster`; the model owner and the data owner run in
  this process) and classifies ``samples`` random inputs, ``batch`` per request,
  after one warm-up request. The row gets the deployment's time, the median
  latency of a request, the server's HE milliseconds and the enclave's per
  image as the server reports them (see ``parties.accounting``), the rotations
  and bytes per image, and the agreement with plaintext torch (float64) on the
  same inputs, with plaintext torch's own time per image in float32.

Nothing is estimated: a quantity this benchmark does not measure is not in
the report. DEVELOPMENT RUN: the enclave runs natively and presents no SGX
quote; the owners accept it only here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from statistics import median

import numpy as np
import torch.nn as nn

from heclave.examples.zoo import ZOO, ZooModel
from heclave.graph.placement import WeightForm
from heclave.parties.accounting import WorkSplit
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.plan.importer import from_pytorch
from heclave.plan.planner import Plan, plan_model
from heclave.protocol.errors import HeclaveError, PlanError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity

from .cnn import _Pipeline, _plaintext

__all__ = ["ZOO", "bench_zoo"]

MODEL_OWNER, DATA_OWNER = Identity.generate(), Identity.generate()  # this run's two parties


def _import_and_plan(entry: ZooModel, model: nn.Module, weights: WeightForm, batch: int) -> tuple[dict, Plan | None]:
    """The row's import and planning: its time and stage count, or the refusal's sentence."""
    started = time.perf_counter()
    try:
        plan = plan_model(from_pytorch(model, entry.input_shape), weights, name=entry.name, batch=batch)
    except PlanError as exc:
        refusal = {"status": "refused", "refused_at": "planning", "reason": exc.message}
        return refusal | {"import_plan_s": time.perf_counter() - started}, None
    seconds = time.perf_counter() - started
    summary = plan.summary()
    row = {
        "status": "planned",
        "import_plan_s": seconds,
        "stages": len(summary),
        "plan": [f"{s['shape']} {s['placement']} {s['layout']} then {s['enclave']}" for s in summary],
    }
    return row, plan


def _run(
    cluster: Cluster,
    entry: ZooModel,
    model: nn.Module,
    plan: Plan,
    weights: WeightForm,
    batch: int,
    images: np.ndarray,
    reference: np.ndarray,
    say: Callable[[str], None],
) -> dict:
    """Deploy the plan, classify ``images`` and compare with plaintext torch's logits ``reference``."""
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, VerifierPolicy.development())
    try:
        if owner.connection.params != plan.graph.params:  # planned for the defaults; this enclave differs
            plan = owner.plan(model, entry.input_shape, weights, name=entry.name, batch=batch)
        say(f"{entry.name}: deploying with {weights.value} weights")
        started = time.perf_counter()
        try:
            model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
        except HeclaveError as exc:
            cluster.check()
            return {"status": "refused", "refused_at": "deployment", "reason": exc.message}
        deploy_s = time.perf_counter() - started
        samples = len(images)
        data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, VerifierPolicy.development())
        pipeline = _Pipeline(cluster, data_owner, model_id)
        try:
            say(f"{entry.name}: warm-up request")
            pipeline.classify(images[:batch])  # the worker installs the model
            inferences = []
            for first in range(0, samples, batch):
                say(f"{entry.name}: inputs {first + 1}-{min(first + batch, samples)} of {samples}")
                inferences.append(pipeline.classify(images[first : first + batch])[0])
        finally:
            data_owner.close()
        owner.undeploy(model_id)
    finally:
        owner.close()
    logits = np.concatenate([inference.batch_logits for inference in inferences])
    error = float(np.abs(logits - reference).max())
    logit_range = float(np.ptp(reference))
    work = WorkSplit.of(inferences, samples)
    return {
        "deploy_s": deploy_s,
        "latency_ms_p50": median(inference.latency_ms for inference in inferences),
        "requests": len(inferences),
        **work.to_dict(),
        "rotations_per_image": sum(inference.server.get("rotations", 0) for inference in inferences) / samples,
        "bytes_per_image": sum(inference.bytes_moved for inference in inferences) / samples,
        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_error": error,
        "logit_range": logit_range,
        "max_logit_error_over_range": error / logit_range if logit_range > 0 else float("nan"),
        "release_noise_sd": max(inference.noise_sd for inference in inferences),
    }


def bench_zoo(
    names: Sequence[str] = tuple(ZOO),
    weights: WeightForm = WeightForm.ENCRYPTED,
    batch: int = 1,
    samples: int = 20,
    seed: int = 0,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Import, plan and (where that succeeds) run every named zoo model; the report ``heclave bench zoo`` prints.

    A model refused is a row with ``status`` ``refused``, ``refused_at`` (``planning`` or ``deployment``) and
    the refusal's ``reason``; the others have ``status`` ``planned`` and their measurements. ``say`` receives
    progress lines.
    """
    if samples < 1 or batch < 1:
        raise PlanError("The samples and the batch size must each be at least 1.")
    unknown = [name for name in names if name not in ZOO]
    if unknown:
        raise PlanError(f"{unknown[0]!r} is not a model of the zoo; choose from {', '.join(ZOO)}.")
    rows, planned = [], []
    for name in dict.fromkeys(names):
        entry = ZOO[name]
        say(f"{name}: {'training' if entry.trained else 'building'}")
        started = time.perf_counter()
        model = entry.factory()
        row = {
            "model": name,
            "description": entry.description,
            "input_shape": list(entry.input_shape),
            "trained": entry.trained,
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_s": time.perf_counter() - started,
        }
        say(f"{name}: importing and planning")
        outcome, plan = _import_and_plan(entry, model, weights, batch)
        rows.append(row | outcome)
        if plan is not None:
            # Before any process starts, as in ``bench cnn``: on a small machine they would slow torch down.
            say(f"{name}: plaintext torch")
            images = entry.random_inputs(samples, seed)
            rows[-1]["plaintext_ms"], reference = _plaintext(model, images)
            planned.append((rows[-1], entry, model, plan, images, reference))
    if planned:
        say("starting an enclave and a server")
        with Cluster() as cluster:
            for row, entry, model, plan, images, reference in planned:
                row.update(_run(cluster, entry, model, plan, weights, batch, images, reference, say))
    return {
        "benchmark": "zoo",
        "weights": weights.value,
        "batch": batch,
        "samples": samples,
        "seed": seed,
        "models": rows,
    }
