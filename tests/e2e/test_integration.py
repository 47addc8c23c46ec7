"""The four parties for real: enclave and server as subprocesses, both owners in this process."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.errors import AttestationError, CiphertextError, HeclaveError, UnavailableError
from heclave.protocol.messages import Message, decode, encode
from heclave.protocol.transport import Client, CurveKeys, read_public_key
from heclave.workloads import INPUT_SHAPE, train_digits_cnn
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, raw_socket, undeploy


@pytest.fixture(scope="module")
def trained():
    model, x_test, y_test = train_digits_cnn(epochs=6, seed=1)
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(x_test).double()).numpy()
    return model.float(), x_test, logits


@pytest.fixture(scope="module")
def deployed(cluster, trained):
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(owner.plan(trained[0], INPUT_SHAPE, "encrypted"), readers=[DATA_OWNER.public])
    yield model_id
    owner.close()
    undeploy(cluster, model_id)


@pytest.fixture
def data_owner(cluster):
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    yield owner
    owner.close()


def _check_agreement(owner, model_id, x, reference):
    inferences = [owner.infer(model_id, sample) for sample in x]
    got = np.stack([inf.logits for inf in inferences])
    assert (got.argmax(1) == reference.argmax(1)).all()
    spread = reference.max() - reference.min()
    # The release carries flooding noise (tee.release); it must stay far below the logits' spread.
    noise = max(inf.noise_sd for inf in inferences)
    assert noise < 1e-3 * spread
    assert np.abs(got - reference).max() < 1e-3 * spread + 6 * noise
    return inferences


def test_the_enclave_encrypts_with_key_masks_it_made_between_requests(deployed, data_owner, trained):
    _, x, reference = trained
    inferences = _check_agreement(data_owner, deployed, x[:5], reference[:5])
    # The first request may find the pool still filling; later ones use masks made in the gaps.
    assert all(inf.server["enclave_offline_ms"] > 0 for inf in inferences[1:])


def test_encrypted_weights_agree_with_plaintext_on_30_digits(deployed, data_owner, trained):
    _, x, reference = trained
    rng = np.random.default_rng()
    pick = rng.choice(len(x), 30, replace=False)
    _check_agreement(data_owner, deployed, x[pick], reference[pick])


def test_plain_weights_agree_with_plaintext(cluster, data_owner, trained):
    model, x, reference = trained
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(owner.plan(model, INPUT_SHAPE, "plain"), readers=[DATA_OWNER.public])
    owner.close()
    _check_agreement(data_owner, model_id, x[:10], reference[:10])


def test_default_policy_refuses_the_unattested_enclave(cluster):
    with pytest.raises(AttestationError, match="runtime"):
        DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER)


def test_wrong_pinned_server_key_never_connects(cluster):
    with pytest.raises(UnavailableError):
        DataOwner(cluster.endpoint, CurveKeys.generate().public, DATA_OWNER, DEV, timeout_s=2)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"not msgpack \xc1"], "bad_message"),
        ([msgpack.packb({"v": 7, "type": "infer", "id": "x", "content": {}, "nbuf": 0})], "unsupported_version"),
        (encode(Message("launch_missiles")), "unknown_type"),
        (encode(Message("infer", {"model_id": 5})), "bad_field"),
        (encode(Message("deploy", {"model_id": "nope", "masks": []})), "unknown_model"),
    ],
)
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(cluster, frames, code):
    sock = raw_socket(cluster)
    sock.send_multipart(frames)
    assert sock.poll(30_000), "the server did not answer a malformed request"
    reply = decode(sock.recv_multipart())
    assert reply.type == "error" and reply.content["code"] == code, reply.content
    sock.close()
    with Client(cluster.endpoint, read_public_key(cluster.server_key_file), timeout_s=30) as good:
        assert good.request(Message("evidence")).content["evidence"]["runtime"] == "native"


def test_garbage_ciphertext_is_refused_then_inference_still_works(deployed, data_owner, trained):
    _, x, reference = trained
    authorised = data_owner.prepare(deployed, x[:1])
    with pytest.raises(CiphertextError):
        data_owner.connection.request(Message("infer", authorised.content, [b"\x00" * 1000]))
    _check_agreement(data_owner, deployed, x[:3], reference[:3])


def test_forged_release_authorisation_is_refused(deployed, data_owner, trained):
    _, x, _ = trained
    graph = data_owner.graph(deployed)
    ctx = data_owner.context(deployed)
    frames = [ctx.encrypt(row) for row in graph.stages[0].layout.gather(x[0].ravel())]
    content = {
        "model_id": deployed,
        "session_id": data_owner.connection.session.session_id,
        "request_id": "forged",
        "envelope": b"\x00" * 60,
    }
    with pytest.raises(HeclaveError) as info:
        data_owner.connection.request(Message("infer", content, frames))
    assert info.value.code.value == "channel"


def test_restarted_enclave_keeps_keys_and_serves_a_model_deployed_before(cluster, deployed, trained):
    before = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    evidence = before.connection.evidence
    before.close()
    cluster.restart_enclave()
    after = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    assert after.connection.evidence == evidence, "a restarted enclave must present the same keys"
    _, x, reference = trained
    _check_agreement(after, deployed, x[:3], reference[:3])
    after.close()


def test_batches_packed_several_queries_per_ciphertext_agree(cluster, trained):
    model, x, reference = trained
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    plan = owner.plan(model, INPUT_SHAPE, "encrypted", batch=8)
    assert any(stage.layout.queries > 1 for stage in plan.graph.stages), "throughput mode packed nothing"
    model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
    owner.close()
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    pick = np.random.default_rng().choice(len(x), 11, replace=False)
    for batch in (x[pick[:8]], x[pick[8:]]):  # a full batch, and a partial one
        got = data_owner.infer_batch(model_id, batch).batch_logits
        want = reference[pick[: len(batch)]] if len(batch) == 8 else reference[pick[8:]]
        assert (got.argmax(1) == want.argmax(1)).all()
        assert np.abs(got - want).max() < 1e-3 * (reference.max() - reference.min())
    data_owner.close()


def test_restarted_server_keeps_its_key_and_serves_models_deployed_before(cluster, deployed, trained):
    key_before = read_public_key(cluster.server_key_file)
    cluster.restart_server()
    assert read_public_key(cluster.server_key_file) == key_before, "owners' pinned server key must stay valid"
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    _, x, reference = trained
    _check_agreement(owner, deployed, x[:3], reference[:3])
    owner.close()


def test_the_owner_commands_grant_and_undeploy_under_their_identities(cluster, tmp_path):
    """``heclave model-owner grant`` and ``undeploy`` do what they say, for the identity in --identity only."""
    from click.testing import CliRunner

    from heclave.cli import main
    from heclave.protocol.identity import Identity

    owner_file, stranger_file = tmp_path / "owner.key", tmp_path / "stranger.key"
    MODEL_OWNER.save(owner_file)
    Identity.generate().save(stranger_file)
    torch.manual_seed(5)
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(owner.plan(torch.nn.Sequential(torch.nn.Linear(6, 3)), (6,), "encrypted"))
    owner.close()
    common = ["--server", cluster.endpoint, "--server-key", str(cluster.server_key_file), "--allow-unattested"]

    def run(command: str, identity: Path, *extra: str):
        return CliRunner().invoke(main, ["model-owner", command, *common, "--identity", str(identity), *extra])

    reader = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        with pytest.raises(HeclaveError, match="may not query"):
            reader.graph(model_id)
        granted = run("grant", owner_file, "--model-id", model_id, "--reader", DATA_OWNER.public_hex)
        assert granted.exit_code == 0, granted.output
        assert reader.graph(model_id).input_shape == (6,)
        refused = run("undeploy", stranger_file, "--model-id", model_id)
        assert refused.exit_code != 0 and "Only the identity that deployed" in str(refused.exception)
        removed = run("undeploy", owner_file, "--model-id", model_id)
        assert removed.exit_code == 0 and model_id in removed.output
    finally:
        reader.close()
    after = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        with pytest.raises(HeclaveError, match="Unknown model"):
            after.graph(model_id)
    finally:
        after.close()
