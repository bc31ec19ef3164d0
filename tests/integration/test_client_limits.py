"""
What no client can make blobserve hold, over real loopback sockets against
blobserve under twistd: a request body it did not want, a connection that
dribbles its request, a connection beyond the limit. And the port is the
service: blobserve that cannot listen exits at once.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from checks import until
from processes import BlobserveProcess, open_descriptors

#: These tests fetch nothing: the upstream is never asked.
UPSTREAM = "http://127.0.0.1:9"

#: How long a test waits for an answer that should come at once.
PROMPTLY = 10.0

MAX_CONNECTIONS = 4


async def started(directory: Path, *extra: str) -> BlobserveProcess:
    server = BlobserveProcess(directory, UPSTREAM, directory / "storage", extra=extra)
    await server.start()
    return server


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[BlobserveProcess]:
    process = await started(
        tmp_path, "--client-timeout=1", f"--max-connections={MAX_CONNECTIONS}"
    )
    yield process
    process.stop()


def connect(server: BlobserveProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PROMPTLY)


def read_to_end(s: socket.socket) -> bytes:
    """
    Everything the server sends until it closes the connection (cleanly or
    with a reset), within L{PROMPTLY}.
    """
    s.settimeout(PROMPTLY)
    deadline = time.monotonic() + PROMPTLY
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection is still open after {data[:200]!r}")


def get_base(s: socket.socket) -> bytes:
    """
    C{GET /v2/} on a persistent connection: its whole response.
    """
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s.settimeout(PROMPTLY)
    data = b""
    while not data.endswith(b"\r\n\r\n{}"):
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def oci_error(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["errors"][0]["code"]


@pytest_twisted.ensureDeferred
async def test_a_write_is_answered_405_before_its_body_is_sent(
    server: BlobserveProcess,
) -> None:
    with connect(server) as s:
        s.sendall(
            b"PUT /v2/a/blobs/uploads/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 67108864\r\n\r\n"
        )
        assert oci_error(read_to_end(s)) == (405, "UNSUPPORTED")


@pytest_twisted.ensureDeferred
async def test_a_body_sent_anyway_is_neither_read_nor_spooled(
    server: BlobserveProcess,
) -> None:
    size = 64 * 1024 * 1024
    # The sendfile self-test holds a deleted temporary file of its own for a
    # few dozen milliseconds after the start: not a spooled body.
    await until(lambda: "sendfile is" in server.log.read_text(), "the self-test")
    with connect(server) as s:
        s.sendall(
            b"PUT /v2/a/blobs/uploads/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        s.setblocking(False)
        chunk = b"x" * 65536
        sent = 0
        stuck_since = time.monotonic()
        deadline = time.monotonic() + PROMPTLY
        # Send until the server stops taking bytes (the socket buffers are
        # full, or the connection is gone), or the whole body is sent.
        while sent < size and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
                stuck_since = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - stuck_since > 2:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            except OSError:
                break
        # No file holds any of it (twisted.web's is a deleted temporary).
        spooled = [f for f in open_descriptors(server.pid) if "(deleted)" in f]
        assert spooled == []
    assert sent < size / 2
    # And the server goes on.
    with connect(server) as s:
        assert get_base(s).startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_a_get_with_a_chunked_body_is_refused(server: BlobserveProcess) -> None:
    with connect(server) as s:
        s.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        assert oci_error(read_to_end(s)) == (413, "UNSUPPORTED")


@pytest_twisted.ensureDeferred
async def test_a_request_dribbled_is_cut_off_a_client_timeout_after_its_first_byte(
    server: BlobserveProcess,
) -> None:
    # One byte every 0.2 s: the idle timeout (1 s) never fires; the deadline
    # for the whole request (1 s) does.
    request = b"GET /v2/ HTTP/1.1\r\nX-Slow: " + b"a" * 100
    with connect(server) as s:
        began = time.monotonic()
        received = b""
        cut = False
        for byte in request:
            try:
                s.sendall(bytes([byte]))
                s.setblocking(False)
                try:
                    received += s.recv(65536) or b""
                    cut = True  # a clean end, or an answer: either way, done
                except BlockingIOError:
                    pass
                s.setblocking(True)
            except OSError:
                cut = True
            if cut:
                break
            await deferLater(reactor, 0.2, lambda: None)
        took = time.monotonic() - began
    assert cut, "the dribbling client was never cut off"
    assert received == b""
    assert 0.9 < took < 3


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_limit_are_answered_503_and_the_rest_go_on(
    server: BlobserveProcess,
) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        # Each is accepted and served: the server counts them all.
        for s in held:
            assert get_base(s).startswith(b"HTTP/1.1 200 ")
        with connect(server) as extra:
            assert oci_error(read_to_end(extra)) == (503, "UNAVAILABLE")
        for s in held:
            assert get_base(s).startswith(b"HTTP/1.1 200 ")
        # Once one goes, a new connection is served again.
        held.pop().close()
        deadline = time.monotonic() + PROMPTLY
        while True:
            with connect(server) as again:
                again.sendall(b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n")
                response = read_to_end(again)
            if response.startswith(b"HTTP/1.1 200 "):
                break
            assert time.monotonic() < deadline, response
            await deferLater(reactor, 0.05, lambda: None)
    finally:
        for s in held:
            s.close()


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_makes_blobserve_exit_non_zero_at_once(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = BlobserveProcess(
            tmp_path,
            UPSTREAM,
            tmp_path / "storage",
            flags=[
                f"--listen=tcp:{port}:interface=127.0.0.1",
                f"--upstream={UPSTREAM}",
                f"--storage={tmp_path / 'storage'}",
            ],
        )
        began = time.monotonic()
        try:
            with pytest.raises(RuntimeError, match="blobserve exited"):
                await server.start()
        finally:
            server.stop()
    # As long as twistd takes to start, not until some timeout.
    assert time.monotonic() - began < PROMPTLY
    assert server.process is not None
    assert server.process.returncode != 0
    assert re.search(
        rf"Couldn't listen on 127.0.0.1:{port}: .*Address already in use",
        server.log.read_text(),
    )
