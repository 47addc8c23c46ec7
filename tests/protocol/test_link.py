"""The server–enclave link: a token file kept owner-only, and a socket that admits only its holder."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from heclave.protocol import link
from heclave.protocol.errors import NoReplyError, ProtocolError
from heclave.protocol.messages import Message
from heclave.protocol.transport import Client, handle_frames, receive, router


def test_the_token_is_made_once_owner_only_and_kept(tmp_path):
    path = tmp_path / "link.token"
    token = link.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(token) == 64
    assert link.load_or_create(path) == token == link.read(path)
    assert link.load_or_create(tmp_path / "other.token") != token


@pytest.mark.parametrize("content", [None, b"", b"short", b"x" * 65])
def test_a_missing_or_malformed_token_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "link.token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ProtocolError, match="link.token"):
        link.read(path)


def _answer_one(sock) -> None:
    got = receive(sock)
    sock.send_multipart([got.routing, *handle_frames(got.frames, lambda m: m.reply({"client": got.client}))])


def test_a_guarded_socket_answers_only_the_token_holder(tmp_path):
    token = link.load_or_create(tmp_path / "link.token")
    sock, endpoint = router("tcp://127.0.0.1:*", link_token=token)
    try:
        for wrong in (None, link.load_or_create(tmp_path / "guess.token")):
            with Client(endpoint, timeout_s=1.0, link_token=wrong) as stranger, pytest.raises(NoReplyError):
                stranger.request(Message("ping"))
            assert not sock.poll(100), "a refused client's message reached the socket"
        answered = threading.Thread(target=_answer_one, args=(sock,))
        answered.start()
        with Client(endpoint, timeout_s=10.0, link_token=token) as server:
            reply = server.request(Message("ping"))
        answered.join()
        assert reply.content["client"] == link.USER.decode(), "the message must carry who the handshake admitted"
    finally:
        sock.close(linger=0)
