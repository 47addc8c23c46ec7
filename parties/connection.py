"""An owner's attested connection: pinned transport to the server, verified evidence, a session.

Both owners start the same way: fetch the enclave's evidence and the CKKS
parameters it binds through the server, check them against the owner's policy
*before* anything secret is sent, then open a secure channel to the attested
identity key under the owner's own identity (``protocol.identity``), which the
enclave learns from the handshake. Each model's public context arrives later,
through that channel.
"""

from __future__ import annotations

import logging
from pathlib import Path

from heclave.he.context import parameters_from_bytes
from heclave.protocol.channel import OwnerHandshake, Session
from heclave.protocol.errors import ChannelError
from heclave.protocol.evidence import Evidence, VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.protocol.messages import Message, MessageType, field_of
from heclave.protocol.transport import Client, read_public_key

log = logging.getLogger(__name__)


class AttestedConnection:
    """A client of the server whose enclave passed the owner's policy, with an open session."""

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | Path,
        identity: Identity,
        policy: VerifierPolicy = VerifierPolicy(),
        timeout_s: float = 120.0,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError(
                "identity must be a protocol.identity.Identity (Identity.load(path) or Identity.generate())."
            )
        self.identity = identity
        key = read_public_key(server_key) if isinstance(server_key, Path) else server_key
        self.client = Client(endpoint, server_key=key, timeout_s=timeout_s, client_keys=identity.curve)
        reply = self.client.request(Message(MessageType.EVIDENCE))
        self.evidence = Evidence.from_wire(reply.content.get("evidence"))
        if len(reply.buffers) != 1:
            raise ChannelError("The server relayed evidence without the public parameters it binds.")
        policy.verify(self.evidence, reply.buffers[0])
        self.params = parameters_from_bytes(reply.buffers[0])
        self.session = self._open_session()

    def _open_session(self) -> Session:
        handshake = OwnerHandshake(self.identity.static, self.evidence.identity_public, self.evidence.digest())
        reply = self.client.request(Message(MessageType.OPEN_SESSION, {"handshake": handshake.first()}))
        third, session = handshake.finish(field_of(reply.content, "handshake", bytes))
        content = {"handshake_id": field_of(reply.content, "handshake_id", bytes), "handshake": third}
        reply = self.client.request(Message(MessageType.CONFIRM_SESSION, content))
        if field_of(reply.content, "session_id", bytes) != session.session_id:
            raise ChannelError("The enclave derived a different session; the channel is not trustworthy.")
        return session

    def reopen(self) -> None:
        """Replace the session with a fresh one (after a failure that may have desynchronised it)."""
        self.session = self._open_session()

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        return self.client.request(message, timeout_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> AttestedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
