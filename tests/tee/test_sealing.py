"""Sealed enclave state: restored identically, refused when altered or sealed under another key."""

from __future__ import annotations

import msgpack
import pytest

from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.protocol.errors import AttestationError, HeclaveError
from heclave.tee.sealing import seal, sealing_key, unseal
from heclave.tee.state import KEYS_FILE, MODELS_DIR, EnclaveState
from tests.helpers import DATA_OWNER, open_session


def test_state_restores_the_same_identity_and_models(tmp_path):
    identity = EnclaveState(tmp_path).identity()
    keys = SecretKeySet(CkksParams())
    record = {"graph": b"graph bytes", "secrets": {"weights": {"2": b"w"}}, "keys": keys.export(), "owner": b"o" * 32}
    EnclaveState(tmp_path).save_model("m1", record)
    identity_again = EnclaveState(tmp_path).identity()
    assert identity_again.public_key().public_bytes_raw() == identity.public_key().public_bytes_raw()
    restored = EnclaveState(tmp_path).models()["m1"]
    assert {k: restored[k] for k in ("graph", "secrets", "owner")} == {
        k: record[k] for k in ("graph", "secrets", "owner")
    }
    again = SecretKeySet(CkksParams(), restored["keys"])
    assert again.public.to_bytes() == keys.public.to_bytes()


def test_a_model_record_moved_under_another_model_id_is_not_restored(tmp_path):
    state = EnclaveState(tmp_path)
    state.save_model("victim", {"graph": b"g"})
    state.save_model("attacker", {"graph": b"a"})
    models = tmp_path / MODELS_DIR
    (models / "victim.sealed").replace(models / "attacker.sealed")
    assert EnclaveState(tmp_path).models() == {}, "a record sealed under one id must not load under another"


def test_a_record_sealed_under_one_name_is_refused_under_another(tmp_path):
    key = sealing_key(tmp_path)
    with pytest.raises(AttestationError, match="another model"):
        unseal(key, "model", seal(key, "model", {}, "a"), tmp_path / "b.sealed", "b")


def test_altered_sealed_identity_is_refused(tmp_path):
    EnclaveState(tmp_path).identity()
    path = tmp_path / KEYS_FILE
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(AttestationError, match="altered"):
        EnclaveState(tmp_path).identity()


def test_state_sealed_under_another_key_is_refused(tmp_path):
    blob = seal(sealing_key(tmp_path / "a"), "model", {"graph": b"g"})
    with pytest.raises(AttestationError):
        unseal(sealing_key(tmp_path / "b"), "model", blob, tmp_path / "x")


def test_wrong_kind_is_refused_with_both_names(tmp_path):
    key = sealing_key(tmp_path)
    with pytest.raises(HeclaveError, match="'model'.*'keys'"):
        unseal(key, "keys", seal(key, "model", {}), tmp_path / "x")


def test_hardware_key_is_used_when_gramine_provides_it(tmp_path):
    fake = tmp_path / "attestation"
    (fake / "keys").mkdir(parents=True)
    (fake / "keys" / "_sgx_mrenclave").write_bytes(b"\x01" * 16)
    state = tmp_path / "state"
    state.mkdir()
    hardware = sealing_key(state, fake)
    assert not (state / "dev-sealing.key").exists()
    assert hardware != sealing_key(state)


def test_enclave_starts_and_serves_when_a_sealed_model_no_longer_loads(tmp_path):
    import torch

    from heclave.plan import plan_pytorch
    from heclave.protocol.messages import OK, Message
    from heclave.tee.enclave import Enclave

    planned = plan_pytorch(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), (4,))
    keys = SecretKeySet(CkksParams()).export()
    state = EnclaveState(tmp_path)
    rights = {"owner": DATA_OWNER.public, "readers": [], "anyone": False}
    state.save_model("stale", {"graph": b"a graph of an older format", "secrets": {}, "keys": keys, **rights})
    secrets = {"weights": {}, "biases": {}, "masks": [b""]}
    state.save_model("unsealed-bias", {"graph": planned.graph.to_bytes(), "secrets": secrets, "keys": keys, **rights})
    enclave = Enclave(state_dir=tmp_path)
    assert enclave.handle(Message("evidence")).type == OK
    session = open_session(enclave.handle, enclave.evidence)
    for model_id in ("stale", "unsealed-bias"):
        envelope = session.seal(msgpack.packb({"model_id": model_id}), b"model_info")
        content = {"model_id": model_id, "session_id": session.session_id, "envelope": envelope}
        with pytest.raises(HeclaveError, match="Unknown model"):
            enclave.handle(Message("model_info", content))
