"""The enclave's model runtime (``tee.execution``): blinded layers' one-time pads and the biases it keeps.

Pads precomputed between requests unblind exactly; they come from ``he.sampling``'s AES-CTR keystream, never
numpy's, uniform in the field and fresh, and no enclave code draws from numpy's or Python's generators. The
enclave refuses an ``he`` stage sealed without its bias, and keeps the bias out of the server's layouts.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from heclave.arith.blinding import P
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.errors import PlanError

ROOT = Path(__file__).resolve().parents[2]


def _blinded_runtime(keys):
    import torch

    from heclave.parties.model_owner import ModelOwner
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    torch.manual_seed(3)
    planned = plan_pytorch(
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), (6,), placements=["blinded", "enclave"]
    )
    weights, biases = ModelOwner._enclave_secrets(planned)
    return ModelRuntime.from_secrets(
        planned.graph, keys, {"weights": weights, "biases": biases, "masks": ModelOwner._masks(planned)}
    )


def _in_fresh_thread(action):
    """``action()`` on a new thread, which starts a keystream of its own (``he.sampling`` keeps one per thread)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(action()))
    thread.start()
    thread.join()
    return out[0]


def test_blinded_pads_are_the_aes_ctr_keystream_and_never_numpys(keys, monkeypatch):
    from heclave.he import sampling

    runtime = _blinded_runtime(keys)
    key = bytes(range(32))
    monkeypatch.setattr(sampling, "os", SimpleNamespace(urandom=lambda n: key[:n]))
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: pytest.fail("a pad drawn from numpy's generator"))
    pad, product = _in_fresh_thread(lambda: runtime._new_pad(0))
    # What he.sampling draws: AES-256-CTR under the urandom key, 64-bit words masked to 31 bits, rejected at p.
    n = runtime.weights[0].shape[1]
    words = np.frombuffer(
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * (n + 64))), "<u8"
    )
    words = words & np.uint64((1 << 31) - 1)
    assert pad.dtype == np.int64 and pad.tolist() == words[words < P][:n].tolist()
    assert product.tolist() == runtime.weights[0].apply_mod(pad).tolist()


def test_blinded_pads_are_uniform_in_the_field_and_fresh(keys):
    runtime = _blinded_runtime(keys)
    pads = np.concatenate([runtime._new_pad(0)[0] for _ in range(3000)])
    assert pads.min() >= 0 and pads.max() < P
    counts = np.bincount((pads * 16 // P).astype(np.int64), minlength=16)
    expected = len(pads) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 degrees of freedom: p < 1e-5
    assert not np.array_equal(_in_fresh_thread(lambda: runtime._new_pad(0)[0]), runtime._new_pad(0)[0])


def test_no_enclave_code_draws_from_numpy_or_pythons_random():
    """The enclave's secrets (keys, masks, pads, noise) come from ``he.sampling``'s CSPRNG only."""
    pattern = re.compile(r"np\.random|numpy\.random|^\s*(import random|from random import)", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("he", "tee", "protocol")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def _sealed_secrets(planned) -> dict:
    """What a model owner seals to the enclave at registration (``ModelOwner``'s own code)."""
    weights, biases = ModelOwner._enclave_secrets(planned)
    return {"weights": weights, "biases": biases, "masks": ModelOwner._masks(planned)}


def test_pads_precomputed_between_requests_unblind_exactly(keys):
    from heclave.graph.placement import Form
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import POOL_SIZE, ModelRuntime
    from heclave.tee.requests import Request

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    planned = plan_pytorch(net, (6,), placements=["blinded", "enclave"])
    runtime = ModelRuntime.from_secrets(planned.graph, keys, _sealed_secrets(planned))
    while runtime.refill():
        pass
    assert len(runtime.pool[0]) == POOL_SIZE
    xs = np.random.default_rng().normal(size=(2, 6))
    request = Request("model", "request", None, 2)
    form, frames, offline_ms = runtime.handout(request, 0, xs)
    assert form is Form.BLINDED and len(runtime.pool[0]) == POOL_SIZE - 2 and offline_ms > 0
    blinded = np.frombuffer(frames[0], dtype="<i8").reshape(2, -1)
    server_side = np.stack([runtime.weights[0].apply_mod(row) for row in blinded])  # what the server computes
    last = runtime.accept(request, Form.BLINDED, [server_side.astype("<i8").tobytes()])
    _, logits = runtime.advance(request, last + 1)
    want = net.double()(torch.from_numpy(xs)).detach().numpy()
    assert np.abs(logits - want).max() < 1e-3


@pytest.mark.parametrize("blob", [None, b"", np.zeros(4).tobytes()], ids=["missing", "empty", "short"])
def test_enclave_refuses_an_he_stage_without_its_bias(keys, blob):
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    planned = plan_pytorch(nn.Sequential(nn.Linear(6, 5)).eval(), (6,))
    secrets = _sealed_secrets(planned)
    secrets["biases"] = {} if blob is None else {"0": blob}
    with pytest.raises(PlanError, match="bias of 5 float64 values"):
        ModelRuntime.from_secrets(planned.graph, keys, secrets)


def test_he_layouts_leave_the_bias_to_the_enclave(keys):
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    planned = plan_pytorch(net, (256,))
    assert [s.layout.cols for s in planned.graph.stages] == [256, 64]
    runtime = ModelRuntime.from_secrets(planned.graph, keys, _sealed_secrets(planned))
    for i, w in enumerate(planned.weights):
        np.testing.assert_array_equal(runtime.biases[i], w[:, -1])
        x = np.random.default_rng().normal(size=(1, w.shape[1] - 1))
        # The enclave's copy of W (for checking the server) is W without the bias column.
        np.testing.assert_allclose(runtime.weights[i].apply(x), x @ w[:, :-1].T, rtol=1e-12, atol=1e-12)
