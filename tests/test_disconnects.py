"""A client that hangs up at any point of a request is an ordinary event: the server logs at most
one quiet line, never a traceback, answers nobody a 500, and goes on serving.

Points: while sending the headers, part-way through the body (with and without a declared
length), after the body while the request waits in the queue, while a reply streams, while a
non-streamed reply is generated; on each protocol's route.
"""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest

from served import Server

CONTEXT = 4096
ROUTES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Tell me a long story."}]},
          "/v1/responses": {"input": "Tell me a long story."},
          "/v1/messages": {"messages": [{"role": "user", "content": "Tell me a long story."}]}}


@pytest.fixture(scope="module")
def server(hf_checkpoint_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("disconnects") / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    s = Server(folder, "--max-tokens", "2000", "--max-queue", "4")
    yield s
    s.stop()


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _body(path: str, **extra) -> bytes:
    return json.dumps({"model": "m", "max_tokens": 2000, "max_output_tokens": 2000, **ROUTES[path], **extra}).encode()


def _hang_up(server: Server, data: bytes, wait: float = 0.0) -> None:
    sock = _connect(server)
    sock.sendall(data)
    if wait:
        sock.settimeout(wait)
        try:
            sock.recv(256)  # the reply has started (or the wait ran out)
        except TimeoutError:
            pass
    sock.close()


@pytest.mark.parametrize("path", list(ROUTES))
def test_hanging_up_anywhere_leaves_no_traceback(server, path):
    before = len(server.log)
    body = _body(path)
    _hang_up(server, b"POST " + path.encode())  # in the request line
    _hang_up(server, _head(path, len(body))[:-10])  # in the headers
    _hang_up(server, _head(path, len(body)) + body[: len(body) // 2])  # part-way through the body
    _hang_up(server, _head(path, len(body) + 50) + body)  # a body shorter than it said
    sock = _connect(server)  # the body sent chunked, cut in the middle of a chunk
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode() + f"{len(body):x}\r\n".encode() + body[:20])
    sock.close()
    _hang_up(server, _head(path, len(body)) + body, wait=0.3)  # while the reply is generated
    streamed = _body(path, stream=True)
    _hang_up(server, _head(path, len(streamed)) + streamed, wait=1.0)  # while it streams
    blocker = _connect(server)  # the model busy with a long reply: the next request waits in the queue
    blocker.sendall(_head(path, len(streamed)) + streamed)
    blocker.recv(256)
    _hang_up(server, _head(path, len(body)) + body, wait=0.2)
    blocker.close()
    server.wait_for(lambda h: h["active"] is False and h["queued"] == 0, timeout=60)
    time.sleep(0.3)
    log = "".join(server.log[before:])
    assert "Traceback" not in log and "Exception" not in log and "ClientDisconnect" not in log, log
    assert all(len(line) < 300 for line in log.splitlines())
    assert server.health()["status"] == "ok"
    r = server.post(path, {"model": "m", "max_tokens": 2, "max_output_tokens": 16, **ROUTES[path]})
    assert r.status == 200, r.text


def test_a_quiet_line_says_a_client_hung_up_while_sending(server):
    before = len(server.log)
    body = _body("/v1/chat/completions")
    _hang_up(server, _head("/v1/chat/completions", len(body)) + body[:10])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("hung up" in line for line in server.log[before:]):
        time.sleep(0.05)
    lines = [line for line in server.log[before:] if line.strip()]
    assert len(lines) == 1 and "hung up while sending" in lines[0], lines
