"""Wire-format round trips and the secure channel's refusals (in-process, real cryptography)."""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.channel import EnclaveHandshake, OwnerHandshake
from heclave.protocol.errors import (
    AttestationError,
    ChannelError,
    ErrorCode,
    ProtocolError,
    RemoteError,
    error_from_reply,
)
from heclave.protocol.evidence import Evidence, Runtime, VerifierPolicy, report_data
from heclave.protocol.messages import PROTOCOL_VERSION, Message, decode, encode
from heclave.protocol.noise import public_bytes
from heclave.protocol.transport import handle_frames


def test_message_round_trip_keeps_content_buffers_and_ids():
    msg = Message("infer", {"model_id": "m", "n": 3, "blob": b"\x00\xff"}, [b"a" * 1000, b""], parent="p1")
    back = decode(encode(msg))
    assert (back.type, back.content, list(back.buffers), back.id, back.parent) == (
        "infer",
        msg.content,
        [b"a" * 1000, b""],
        msg.id,
        "p1",
    )


def test_error_reply_round_trip_raises_the_same_error_class():
    reply = Message("x").error_reply(ChannelError("Envelope authentication failed; open a new session."))
    with pytest.raises(ChannelError, match="open a new session"):
        decode(encode(reply)).raise_for_error()


def test_unknown_error_code_becomes_remote_error():
    assert isinstance(error_from_reply("no_such_code", "x"), RemoteError)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], ErrorCode.BAD_MESSAGE),
        ([b"\xc1garbage"], ErrorCode.BAD_MESSAGE),
        ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_MESSAGE),
        ([msgpack.packb({"v": 99, "type": "x", "id": "i", "content": {}, "nbuf": 0})], ErrorCode.UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "type": 5, "id": "i", "content": {}, "nbuf": 0})], ErrorCode.BAD_FIELD),
        (
            [msgpack.packb({"v": PROTOCOL_VERSION, "type": "x", "id": "i", "content": {}, "nbuf": 2}), b"1"],
            ErrorCode.BAD_FIELD,
        ),
        (
            [msgpack.packb({"v": PROTOCOL_VERSION, "type": "x", "id": "i", "content": [], "nbuf": 0})],
            ErrorCode.BAD_FIELD,
        ),
    ],
)
def test_malformed_frames_are_refused_with_stable_codes(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code is code


def test_handler_failures_become_exactly_one_error_reply():
    def boom(_msg):
        raise ZeroDivisionError("secret value 42")

    reply = decode(handle_frames(encode(Message("anything")), boom))
    assert reply.type == "error" and reply.content["code"] == "internal"
    assert "42" not in reply.content["message"]
    garbage = decode(handle_frames([b"\x00\x01"], boom))
    assert garbage.type == "error" and garbage.content["code"] == "bad_message"


def _pair(evidence: bytes = b"e" * 32, seen: bytes = b"e" * 32):
    """Owner and enclave after a full handshake; the owner verified ``seen``, the enclave has ``evidence``."""
    enclave_identity, owner_identity = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    owner = OwnerHandshake(owner_identity, public_bytes(enclave_identity), seen)
    enclave = EnclaveHandshake(enclave_identity, evidence)
    third, owner_session = owner.finish(enclave.answer(owner.first()))
    return owner_session, enclave.accept(third), public_bytes(owner_identity)


def test_channel_round_trip_both_directions_and_the_enclave_learns_the_owner():
    owner, enclave, owner_public = _pair()
    assert enclave.peer == owner_public and enclave.session_id == owner.session_id
    for i in range(3):
        assert enclave.open(owner.seal(b"to enclave %d" % i, b"ad"), b"ad") == b"to enclave %d" % i
        assert owner.open(enclave.seal(b"to owner %d" % i)) == b"to owner %d" % i


def test_every_handshake_gives_new_keys_even_for_the_same_first_message():
    enclave_identity, owner_identity = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    owner = OwnerHandshake(owner_identity, public_bytes(enclave_identity), b"e" * 32)
    first = owner.first()
    answers = [EnclaveHandshake(enclave_identity, b"e" * 32).answer(first) for _ in range(2)]
    assert answers[0][:32] != answers[1][:32], "the enclave's ephemeral key must be fresh per handshake"
    third, session = owner.finish(answers[0])
    replayed = EnclaveHandshake(enclave_identity, b"e" * 32)
    replayed.answer(first)
    with pytest.raises(ChannelError):
        replayed.accept(third)  # the third message is bound to the first answer's ephemeral key


def test_channel_refuses_replay_reorder_alteration_truncation_and_wrong_ad():
    owner, enclave, _ = _pair()
    first, second = owner.seal(b"one"), owner.seal(b"two")
    with pytest.raises(ChannelError):
        enclave.open(second)  # reordered
    assert enclave.open(first) == b"one"
    with pytest.raises(ChannelError):
        enclave.open(first)  # replayed
    altered = bytearray(second)
    altered[-1] ^= 1
    for bad in (bytes(altered), second[:-5], second[:10]):
        with pytest.raises(ChannelError):
            enclave.open(bad)
    with pytest.raises(ChannelError):
        enclave.open(second, b"other associated data")
    assert enclave.open(second) == b"two"


def test_channel_bound_to_evidence_hash():
    with pytest.raises(ChannelError):
        _pair(evidence=b"a" * 32, seen=b"b" * 32)


def test_evidence_policy_refuses_unattested_by_default_and_substituted_keys():
    identity, context = b"i" * 32, b"public context"
    evidence = Evidence(Runtime.NATIVE, identity, report_data(identity, context))
    with pytest.raises(AttestationError, match="runtime"):
        VerifierPolicy().verify(evidence, context)
    VerifierPolicy.development().verify(evidence, context)
    with pytest.raises(AttestationError, match="report_data"):
        VerifierPolicy.development().verify(evidence, b"another context")
    back = Evidence.from_wire(msgpack.unpackb(msgpack.packb(evidence.to_wire())))
    assert back == evidence and back.digest() == evidence.digest()
