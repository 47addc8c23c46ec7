"""``protocol.noise`` held to the published Cacophony test vectors, and the handshake's failure modes.

The vectors are Cacophony's (the Haskell reference implementation's test
suite), as distributed in ``tests/vectors/cacophony.txt`` of several Noise
implementations (snow, noiseprotocol); messages alternate initiator and
responder, handshake first, transport after.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.errors import ChannelError
from heclave.protocol.noise import IK, XK, HandshakeState, public_bytes

VECTORS = [
    {
        "protocol_name": "Noise_XK_25519_AESGCM_SHA256",
        "init_prologue": "4a6f686e2047616c74",
        "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
        "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
        "init_remote_static": "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
        "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
        "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
        "handshake_hash": "4f5a40e425d3adcdb2c715d988e4ef8763ed0f8aa0fe78e2d2879d71b2d38186",
        "messages": [
            (
                "4c756477696720766f6e204d69736573",
                (
                    "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944e11634ba393ac9f9"
                    "3896f767741fe7297c64b52a95b20bc07a8c5983eb100a5e"
                ),
            ),
            (
                "4d757272617920526f746862617264",
                (
                    "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843aabea6c8883a5a6d"
                    "e7804420322c70994289ffe724df10411be50430b113da"
                ),
            ),
            (
                "462e20412e20486179656b",
                (
                    "99e0eed98437100ab575e5aa157f20ae23f024a43c58628646991c47e81e64af9c46165872069c57"
                    "94e99a6d116142986f3b803df2a6c12f39702f669d5d7818511d6b41218f19cea974ea"
                ),
            ),
            ("4361726c204d656e676572", "c0502067840ee81f03a76badcc8c4264847069452a9f7531d74f68"),
            (
                "4a65616e2d426170746973746520536179",
                "e2ce8208bd0c04c6ad779ae52b429d8cb6128a245297857e2c593576c75098b071",
            ),
            (
                "457567656e2042f6686d20766f6e2042617765726b",
                "5b75e02c3584b6b202de94cc05d6063970c9da7e67283c258820381207706cd767b5b1152d",
            ),
        ],
    },
    {
        "protocol_name": "Noise_IK_25519_AESGCM_SHA256",
        "init_prologue": "4a6f686e2047616c74",
        "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
        "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
        "init_remote_static": "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
        "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
        "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
        "handshake_hash": "669c8640d9e42a3cda2f232f78597ceefb01daa6e3df81181ccce6fc6b5026bf",
        "messages": [
            (
                "4c756477696720766f6e204d69736573",
                (
                    "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444e417bc55c7a8166"
                    "c993356c1be41ef67818a292426f301556c7f26b21d25ddb097153891a9a956cff47b83e63ad8d70"
                    "1c1342c209cff1ca5ecd43402762ac249e3bd3a4c0a145fe07cb5dae28ea13a3"
                ),
            ),
            (
                "4d757272617920526f746862617264",
                (
                    "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843af2ccf9972e22afc"
                    "67aeafcd25162f7f98c363b7762e3e4cb7d272e39f27a5"
                ),
            ),
            ("462e20412e20486179656b", "66acfc92e3197de166809e6d4d5d003dcc819a84bc3522ca53c9d9"),
            ("4361726c204d656e676572", "71f89aa6533a6de70b0826864dd75f60806ee40170c16290189eb3"),
            (
                "4a65616e2d426170746973746520536179",
                "4795a3423550c8bf00386bd496a3e2c76c10669d2a75ab8f79b5094c5412a25705",
            ),
            (
                "457567656e2042f6686d20766f6e2042617765726b",
                "aa0bb39097555c918e40be82abc2b909eb79d9eb87adb07e268fc37323a6cf904fd01fb391",
            ),
        ],
    },
]
PATTERNS = {"Noise_XK_25519_AESGCM_SHA256": XK, "Noise_IK_25519_AESGCM_SHA256": IK}


def _key(hex_text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


def _sides(vector: dict) -> tuple[HandshakeState, HandshakeState]:
    pattern, name = PATTERNS[vector["protocol_name"]], vector["protocol_name"].encode()
    prologue = bytes.fromhex(vector["init_prologue"])
    initiator = HandshakeState(
        pattern,
        name,
        True,
        prologue,
        static=_key(vector["init_static"]),
        remote_static=bytes.fromhex(vector["init_remote_static"]),
        ephemeral=_key(vector["init_ephemeral"]),
    )
    responder = HandshakeState(
        pattern, name, False, prologue, static=_key(vector["resp_static"]), ephemeral=_key(vector["resp_ephemeral"])
    )
    return initiator, responder


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["protocol_name"])
def test_handshake_and_transport_match_the_published_vectors(vector):
    initiator, responder = _sides(vector)
    messages = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in vector["messages"]]
    turns = len(PATTERNS[vector["protocol_name"]][2])
    for i, (payload, ciphertext) in enumerate(messages[:turns]):
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        assert writer.write_message(payload) == ciphertext, f"handshake message {i}"
        assert reader.read_message(ciphertext) == payload
    assert initiator.handshake_hash.hex() == responder.handshake_hash.hex() == vector["handshake_hash"]
    ciphers = (initiator.split(), responder.split())
    for i, (payload, ciphertext) in enumerate(messages[turns:], turns):
        (send, _), (_, receive) = ciphers[i % 2], ciphers[1 - i % 2]
        assert send.encrypt_with_ad(b"", payload) == ciphertext, f"transport message {i}"
        assert receive.decrypt_with_ad(b"", ciphertext) == payload


def test_an_altered_handshake_message_is_refused_and_nothing_is_split():
    initiator, responder = _sides(VECTORS[0])
    first = bytearray(initiator.write_message(b""))
    first[40] ^= 1
    with pytest.raises(ChannelError):
        responder.read_message(bytes(first))
    with pytest.raises(ChannelError):
        responder.split()


def test_messages_out_of_turn_and_truncated_ones_are_refused():
    initiator, responder = _sides(VECTORS[0])
    with pytest.raises(ChannelError):
        responder.write_message(b"")  # the initiator speaks first
    first = initiator.write_message(b"")
    with pytest.raises(ChannelError):
        initiator.write_message(b"")
    with pytest.raises(ChannelError):
        responder.read_message(first[:20])


def test_a_low_order_ephemeral_key_is_refused():
    responder = HandshakeState(XK, b"Noise_XK_25519_AESGCM_SHA256", False, b"", static=X25519PrivateKey.generate())
    with pytest.raises(ChannelError):
        responder.read_message(bytes(32) + bytes(16))


def test_the_responders_static_key_is_the_one_the_initiator_expected():
    real, impostor = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    initiator = HandshakeState(
        XK, b"Noise_XK_25519_AESGCM_SHA256", True, b"", X25519PrivateKey.generate(), public_bytes(real)
    )
    responder = HandshakeState(XK, b"Noise_XK_25519_AESGCM_SHA256", False, b"", static=impostor)
    with pytest.raises(ChannelError):
        responder.read_message(initiator.write_message(b""))
