"""Who may connect over CURVE (``protocol.curve``): key files, allow lists, and ZAP on real sockets in-process."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import zmq
from click.testing import CliRunner

from heclave.cli import main
from heclave.protocol.curve import AllowedKeys, CurveKeys, client_key
from heclave.protocol.errors import NoReplyError, ProtocolError
from heclave.protocol.messages import Message, decode, encode
from heclave.protocol.transport import Client, router, write_public_key

REFUSED_WITHIN_S = 1.0


def test_a_persistent_key_pair_is_owner_only_and_comes_back_the_same(tmp_path):
    path = tmp_path / "state" / "curve.secret"
    first = CurveKeys.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert CurveKeys.load_or_create(path) == first
    assert zmq.curve_public(first.secret) == first.public
    path.write_bytes(b"not a key")
    with pytest.raises(ProtocolError, match="Z85 CURVE secret key"):
        CurveKeys.load_or_create(path)


def test_allow_list_reads_keys_comments_and_keys_that_start_with_a_hash(tmp_path):
    keys = [CurveKeys.generate().public for _ in range(3)]
    hashed = b"#" + keys[2][1:]  # '#' is a Z85 digit: a key may begin with it
    path = tmp_path / "allowed"
    path.write_bytes(b"# the model owners\n%s\n\n%s   # a data owner\n%s\n" % (keys[0], keys[1], hashed))
    assert AllowedKeys([path]).keys == {keys[0], keys[1], hashed}


def test_allow_list_refuses_a_bad_line_at_start_naming_it(tmp_path):
    path = tmp_path / "allowed"
    path.write_bytes(CurveKeys.generate().public + b"\nnot-a-key\n")
    with pytest.raises(ProtocolError, match="line 2"):
        AllowedKeys([path])


def test_allow_list_follows_its_file_and_keeps_the_old_keys_through_a_broken_edit(tmp_path):
    path = tmp_path / "allowed"
    allowed = AllowedKeys([path])
    assert allowed.keys == frozenset()  # not there yet: nobody
    first, second = CurveKeys.generate().public, CurveKeys.generate().public
    write_public_key(path, first)
    assert allowed.keys == {first}
    path.write_bytes(first + b"\n" + second + b"\n")
    assert allowed.keys == {first, second}
    path.write_bytes(second + b"\nbroken line\n")
    assert allowed.keys == {first, second}
    assert allowed.callback("*", second) and not allowed.callback("*", CurveKeys.generate().public)


class _Echo:
    """A CURVE ROUTER of :func:`router` that answers each request with the sender's key as ZAP saw it."""

    def __init__(self, allow: AllowedKeys | None) -> None:
        self.keys = CurveKeys.generate()
        self.sock, self.endpoint = router("tcp://127.0.0.1:*", curve=self.keys, allow=allow)

    def client(self, own: CurveKeys | None = None) -> Client:
        return Client(self.endpoint, self.keys.public, timeout_s=REFUSED_WITHIN_S, client_keys=own)

    def answer(self) -> str | None:
        """Answer one waiting request (if one arrives); return the key its sender connected with."""
        if not self.sock.poll(int(REFUSED_WITHIN_S * 1000)):
            return None
        identity, *frames = self.sock.recv_multipart(copy=False)
        sender = client_key(frames[0])
        request = decode([f.bytes for f in frames])
        self.sock.send_multipart([identity, *encode(request.reply({"sender": sender}))])
        return sender

    def close(self) -> None:
        self.sock.close(linger=0)


def _request(server: _Echo, client: Client) -> str | None:
    """Send one request, which the server answers if it arrives: the sender key the reply names, or None
    when the request never reached the server and the client heard nothing."""
    answered: list[str | None] = []
    thread = threading.Thread(target=lambda: answered.append(server.answer()))
    thread.start()
    try:
        reply = client.request(Message("who"))
    except NoReplyError:
        reply = None
    thread.join()
    if reply is None:
        assert answered == [None]
        return None
    assert answered == [reply.content["sender"]]
    return reply.content["sender"]


def test_router_with_an_allow_list_answers_listed_keys_only_and_names_each_sender(tmp_path):
    listed = CurveKeys.generate()
    path = tmp_path / "allowed"
    write_public_key(path, listed.public)
    server = _Echo(AllowedKeys([path]))
    try:
        with server.client(listed) as good, server.client() as stranger:
            stranger_reply = _request(server, stranger)
            good_reply = _request(server, good)
        assert stranger_reply is None
        assert good_reply == listed.public.decode()
    finally:
        server.close()


def test_router_without_an_allow_list_takes_any_key_but_still_names_it():
    server = _Echo(None)
    try:
        own = CurveKeys.generate()
        with server.client(own) as client:
            assert _request(server, client) == own.public.decode()
        with Client(server.endpoint, timeout_s=REFUSED_WITHIN_S) as plain:  # no CURVE at all
            assert _request(server, plain) is None
    finally:
        server.close()


def test_client_keys_without_a_server_key_are_refused():
    with pytest.raises(ProtocolError, match="server_key"):
        Client("tcp://127.0.0.1:1", client_keys=CurveKeys.generate())


def test_the_server_command_needs_the_enclaves_link_token_unless_it_runs_the_enclave(tmp_path):
    done = CliRunner().invoke(main, ["server", "--key-file", str(tmp_path / "server.key")])
    assert done.exit_code == 2 and "--enclave-token" in done.output
    assert not (tmp_path / "server.key").exists()
