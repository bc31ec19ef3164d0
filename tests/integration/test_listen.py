"""
A real blobserve listening on several endpoints (TCP and a UNIX socket, from
its configuration file) serves the same site on each.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent

from processes import DEADLINE, BlobserveProcess, RegistryProcess


class _UNIXEndpoints:
    """
    Sends every request an agent makes to one UNIX socket.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(reactor, self._path, timeout=DEADLINE)


@pytest.fixture
def socket_directory() -> Iterator[Path]:
    # Short: a UNIX socket's path holds at most 107 bytes, and pytest's
    # tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="bs-") as directory:
        yield Path(directory)


@pytest_twisted.ensureDeferred
async def test_each_listen_endpoint_serves_the_registry(
    tmp_path: Path, registry: RegistryProcess, socket_directory: Path
) -> None:
    socket = socket_directory / "blobserve.sock"
    settings = tmp_path / "blobserve.toml"
    settings.write_text(
        f'listen = ["tcp:0:interface=127.0.0.1", "unix:{socket}"]\n'
        f'storage = "{tmp_path / "storage"}"\n'
        f'[upstreams."local"]\nurl = "{registry.url}"\n'
    )
    server = BlobserveProcess(
        tmp_path, "", tmp_path / "storage", flags=[f"--config={settings}"]
    )
    await server.start()
    try:
        over_tcp = await treq.get(
            f"{server.url}/v2/", timeout=DEADLINE, persistent=False
        )
        await over_tcp.content()
        unix = HTTPClient(
            Agent.usingEndpointFactory(reactor, _UNIXEndpoints(str(socket)))
        )
        over_unix = await unix.get("http://blobserve/v2/", timeout=DEADLINE)
        await over_unix.content()
    finally:
        server.stop()
    assert (over_tcp.code, over_unix.code) == (200, 200)
    log = server.log.read_text()
    assert f"listening on tcp:0:interface=127.0.0.1, unix:{socket};" in log
