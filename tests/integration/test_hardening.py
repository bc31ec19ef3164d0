"""
Failure paths over real loopback sockets: an upstream whose bodies end by
closing, and requests that once hung or leaked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory

from blobserve.digest import Digest

from checks import assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess, open_descriptors
from relay import Relay


class _CloseDelimitedUpstream(ServerFactory):
    """
    A registry that sends every blob without Content-Length or chunking, as
    an HTTP/1.0 server would: the body ends when the connection closes.

    @ivar blobs: what it holds, by digest.
    @ivar requests: the request lines it was sent.
    """

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _CloseDelimitedResponder(self)


class _CloseDelimitedResponder(Protocol):
    def __init__(self, upstream: _CloseDelimitedUpstream) -> None:
        self._upstream = upstream

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        method, path, _ = request_line.split(" ", 2)
        self._upstream.requests.append(f"{method} {path}")
        body = self._upstream.blobs.get(path.rsplit("/", 1)[-1])
        assert self.transport is not None
        if body is None or method != "GET":
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Connection: close\r\n\r\n" + body
            )
            self.transport.loseConnection()


@pytest.fixture
def close_delimited() -> Iterator[tuple[_CloseDelimitedUpstream, int]]:
    upstream = _CloseDelimitedUpstream()
    tcp: Any = reactor
    port = tcp.listenTCP(0, upstream, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    yield upstream, address.port
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_body_that_ends_by_closing_is_served_and_committed(
    tmp_path: Path,
    client: Client,
    close_delimited: tuple[_CloseDelimitedUpstream, int],
) -> None:
    upstream, port = close_delimited
    data = os.urandom(1024 * 1024)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    upstream.blobs[str(digest)] = data
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{port}",
        tmp_path / "storage",
    )
    await server.start()
    try:
        clients = [client.get(blob_url(server, digest)) for _ in range(3)]
        for download in clients:
            assert_correct(await download.finished(), data)
        await until(committed_path(server, digest).exists, "the commit")
        assert_correct(await client.get(blob_url(server, digest)).finished(), data)
    finally:
        server.stop()
    # One request, not resumed with a Range that the upstream would refuse.
    assert upstream.requests == [f"GET /v2/test/blobs/blobs/{digest}"]


@pytest.mark.parametrize("cached", [False, True])
@pytest_twisted.ensureDeferred
async def test_range_of_thousands_of_digits_is_answered_and_leaks_nothing(
    blobserve: BlobserveProcess,
    client: Client,
    registry: RegistryProcess,
    relay: Relay,
    cached: bool,
) -> None:
    data = os.urandom(64 * 1024)
    digest = registry.push_blob("test/blobs", data)
    url = blob_url(blobserve, digest)
    await client.get(f"{blobserve.url}/v2/").finished()
    if cached:
        assert_correct(await client.get(url).finished(), data)
        await until(
            lambda: (
                not any(
                    target.startswith(
                        (
                            str(blobserve.storage / "blobs"),
                            str(blobserve.storage / "tmp"),
                        )
                    )
                    for target in open_descriptors(blobserve.pid)
                )
            ),
            "the commit to close its files",
        )
    before = open_descriptors(blobserve.pid, except_remote_port=relay.port)
    huge = "9" * 5000
    beyond = await client.get(url, headers={"Range": f"bytes={huge}-"}).finished()
    assert beyond.status == 416
    assert beyond.complete
    whole = await client.get(url, headers={"Range": f"bytes=0-{huge}"}).finished()
    assert whole.status == 206
    assert whole.sha256 == hashlib.sha256(data).hexdigest()
    await until(committed_path(blobserve, digest).exists, "the commit")

    def leaked() -> list[str]:
        after = open_descriptors(blobserve.pid, except_remote_port=relay.port)
        return sorted(set(after) ^ set(before))

    try:
        await until(lambda: not leaked(), "the descriptors to be what they were")
    except AssertionError:
        raise AssertionError(f"descriptors that differ: {leaked()}") from None
