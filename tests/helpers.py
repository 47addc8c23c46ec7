"""Test helpers that compose the real components in-process (no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import tenseal.sealapi as seal
import zmq

from heclave.arith.nonlinear import apply_ops
from heclave.graph.model import ModelGraph
from heclave.graph.placement import WeightForm
from heclave.he.context import SecretKeySet
from heclave.he.linear import LinearKernel, OpCounter, encrypt_weights
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.protocol.transport import CurveKeys, read_public_key

DEV = VerifierPolicy.development()
"""The tests' verifier policy: this machine has no SGX."""
MODEL_OWNER = Identity.generate()
"""The identity the tests deploy models under."""
DATA_OWNER = Identity.generate()
"""The identity the tests' models name as their reader."""


def run_encrypted(keys: SecretKeySet, graph: ModelGraph, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Run a planned model layer by layer: kernels as the server runs them, bias and steps as the enclave does."""
    context = keys.public.with_galois(keys.galois_keys(graph.rotation_steps), graph.rotation_steps)
    toolkit = context.toolkit
    values = {0: np.asarray(x, dtype=np.float64).reshape(-1)}
    for i, (stage, w_aug) in enumerate(zip(graph.stages, weights)):
        g, w, bias = stage.layout, w_aug[:, :-1], w_aug[:, -1]
        if graph.weight_form is WeightForm.PLAIN:
            kernel = LinearKernel.from_plain(toolkit, g, w)
        else:
            mask, frames = encrypt_weights(context, g, w)
            kernel = LinearKernel.from_encrypted(toolkit, g, mask, frames)
        inputs = [toolkit.load_ciphertext(keys.encrypt_symmetric(row)) for row in g.gather(values[stage.source])]
        outputs = kernel.evaluate(inputs, context, OpCounter())
        partials = np.stack([keys.decrypt_complex(ct) for ct in outputs])
        values[i + 1] = apply_ops(g.scatter(partials) + bias, stage.ops, values)
    return values[len(graph.stages)]


def run_imported(imported, x: np.ndarray, stages: int | None = None) -> np.ndarray:
    """An imported model in plain numpy: each composed affine map on the value it reads, then its exact steps;
    the result of the first ``stages`` stages (all by default)."""
    values = {0: np.asarray(x, dtype=np.float64).reshape(-1)}
    count = len(imported.stages) if stages is None else stages
    for i, (affine, ops) in enumerate(imported.stages[:count]):
        values[i + 1] = apply_ops(affine.weight @ values[imported.source(i)] + affine.bias, tuple(ops), values)
    return values[count]


def deployed_kernel(keys: SecretKeySet, layout, w: np.ndarray, form: WeightForm):
    """The context (with exactly the layout's Galois keys) and the kernel a server deploys for ``w`` in ``form``."""
    context = keys.public.with_galois(keys.galois_keys(layout.rotation_steps), layout.rotation_steps)
    if form is WeightForm.PLAIN:
        return context, LinearKernel.from_plain(context.toolkit, layout, w)
    mask, frames = encrypt_weights(context, layout, w)
    return context, LinearKernel.from_encrypted(context.toolkit, layout, mask, frames)


def layer_output(keys: SecretKeySet, values: np.ndarray, weights: np.ndarray, relinearize: bool | None):
    """``values * weights`` as a server's layer leaves it: rescaled, with plaintext weights (``None``)
    or encrypted ones, relinearized or left with three polynomials."""
    toolkit = keys.toolkit
    ct = toolkit.load_ciphertext(keys.encrypt_symmetric(values))
    out = seal.Ciphertext()
    if relinearize is None:
        toolkit.evaluator.multiply_plain(ct, toolkit.encode(weights), out)
    else:
        toolkit.evaluator.multiply(ct, toolkit.load_ciphertext(keys.encrypt_symmetric(weights)), out)
        if relinearize:
            toolkit.evaluator.relinearize_inplace(out, keys.public.relin_keys)
    toolkit.evaluator.rescale_to_next_inplace(out)
    return out


def raw_socket(cluster) -> zmq.Socket:
    """A bare CURVE DEALER socket to the cluster's server, for sending hand-made (or hostile) frames."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    own = CurveKeys.generate()
    sock.curve_serverkey = read_public_key(cluster.server_key_file)
    sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.endpoint)
    return sock


def deployed_models(cluster) -> set[str]:
    """The ids of the models the cluster's enclave holds (registered, and not undeployed), from its sealed state."""
    from heclave.tee.state import MODELS_DIR

    return {path.stem for path in (cluster.workdir / "enclave-state" / MODELS_DIR).glob("*.sealed")}


def undeploy(cluster, *model_ids: str) -> None:
    """Undeploy ``MODEL_OWNER``'s models from the cluster, so that the suites after find its quota free;
    models already gone, or another identity's, are left alone."""
    from heclave.parties.model_owner import ModelOwner
    from heclave.protocol.errors import ErrorCode, HeclaveError

    if not model_ids:
        return
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    try:
        for model_id in model_ids:
            try:
                owner.undeploy(model_id)
            except HeclaveError as exc:
                if exc.code not in (ErrorCode.UNKNOWN_MODEL, ErrorCode.FORBIDDEN):
                    raise
    finally:
        owner.close()


def open_session(handle, evidence, identity: Identity = DATA_OWNER):
    """An owner's session opened through ``handle`` (an enclave's ``handle`` or a client's ``request``)."""
    from heclave.protocol.channel import OwnerHandshake
    from heclave.protocol.messages import Message

    handshake = OwnerHandshake(identity.static, evidence.identity_public, evidence.digest())
    reply = handle(Message("open_session", {"handshake": handshake.first()}))
    third, session = handshake.finish(reply.content["handshake"])
    handle(Message("confirm_session", {"handshake_id": reply.content["handshake_id"], "handshake": third}))
    return session


def enclave_modules() -> list[str]:
    """Every module a fresh interpreter loads for the enclave program (``python -m heclave.tee``)."""
    probe = (
        "import json, sys, heclave.tee.__main__, heclave.tee.enclave;"
        "print(json.dumps(sorted(m for m in sys.modules if not m.startswith('_'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_released_close(inference, expected: np.ndarray) -> None:
    """An inference's released logits agree with torch's ``expected`` (one row per input) and pick its labels:
    within 1e-3 of the logits' range plus the release's flooding noise (``tee.release``) and rounding to 1e-4."""
    got = np.stack([np.asarray(r["logits"]) for r in inference.results])
    spread = expected.max() - expected.min()
    assert np.abs(got - expected).max() < 1e-3 * spread + 6 * inference.noise_sd + 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
