"""Who may connect at all: clients off the server's allow list, and other processes on the enclave's socket.

Both refusals happen at the handshake (CURVE on the server's socket, PLAIN
with the link token on the enclave's), before any message is read: the refused
side hears nothing at all (no error reply to learn from) and its request times
out, while listed clients, and the server on the enclave's socket, carry on.
The link token lives on the host, so it keeps *other* host processes off the
enclave's socket, not the operator, who holds it (``Operator`` connects with
it; everything it sends is checked).
"""

from __future__ import annotations

import secrets

import pytest

from heclave.protocol.curve import CurveKeys
from heclave.protocol.errors import NoReplyError
from heclave.protocol.messages import Message
from heclave.protocol.transport import Client, read_public_key, write_public_key

REFUSED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, cluster_with):
    """A second enclave and server, the server started with ``--allow-clients`` naming one client key."""
    listed, allowed = CurveKeys.generate(), tmp_path_factory.mktemp("guarded") / "allowed-clients"
    allowed.write_bytes(b"# the one client this deployment serves\n" + listed.public + b"\n")
    with cluster_with("--allow-clients", str(allowed)) as running:
        yield running, listed, allowed


def _evidence(endpoint: str, server_key: bytes, own: CurveKeys | None = None) -> Message:
    with Client(endpoint, server_key, timeout_s=REFUSED_WITHIN_S, client_keys=own) as client:
        return client.request(Message("evidence"))


def test_a_client_off_the_servers_allow_list_gets_no_reply_while_a_listed_one_is_served(guarded):
    cluster, listed, _ = guarded
    server_key = read_public_key(cluster.server_key_file)
    stranger = CurveKeys.generate()
    with pytest.raises(NoReplyError):
        _evidence(cluster.endpoint, server_key, stranger)
    with pytest.raises(NoReplyError):
        _evidence(cluster.endpoint, server_key)  # a throwaway key, as a client without keys of its own has
    assert "evidence" in _evidence(cluster.endpoint, server_key, listed).content
    assert stranger.public.decode() in cluster.children[1].log_path.read_text()  # refused by ZAP, and logged
    cluster.check()


def test_the_servers_allow_list_takes_effect_when_its_file_changes(guarded):
    cluster, listed, allowed = guarded
    server_key = read_public_key(cluster.server_key_file)
    newcomer = CurveKeys.generate()
    with pytest.raises(NoReplyError):
        _evidence(cluster.endpoint, server_key, newcomer)
    allowed.write_bytes(allowed.read_bytes() + newcomer.public + b"\n")
    assert "evidence" in _evidence(cluster.endpoint, server_key, newcomer).content
    write_public_key(allowed, listed.public)  # and out again, without a restart
    with pytest.raises(NoReplyError):
        _evidence(cluster.endpoint, server_key, newcomer)
    assert "evidence" in _evidence(cluster.endpoint, server_key, listed).content


def test_a_host_process_without_the_link_token_gets_nothing_from_the_enclave(cluster, operator, still_serves):
    with Client(cluster.enclave_endpoint, timeout_s=REFUSED_WITHIN_S) as anonymous, pytest.raises(NoReplyError):
        anonymous.request(Message("evidence"))
    assert "evidence" in operator.ask("evidence", {}).content  # the server's token is still let in
    still_serves()


@pytest.mark.parametrize("credential", ["a guessed token", "a CURVE key"])
def test_a_host_process_with_other_credentials_gets_nothing_from_the_enclave(
    cluster, operator, credential, still_serves
):
    if credential == "a guessed token":
        client = Client(cluster.enclave_endpoint, timeout_s=REFUSED_WITHIN_S, link_token=secrets.token_hex(32).encode())
    else:
        own = CurveKeys.generate()
        client = Client(cluster.enclave_endpoint, own.public, timeout_s=REFUSED_WITHIN_S, client_keys=own)
    with client, pytest.raises(NoReplyError):
        client.request(Message("evidence"))
    assert "evidence" in operator.ask("evidence", {}).content
    still_serves()
