"""
The health page of a real blobserve whose store stops taking writes, and
takes them again.

A store's own file system cannot be remounted read-only while blobserve runs
(its index is open for writing: mount says busy); the kernel does it anyway
on errors (C{errors=remount-ro}). The test makes the store's C{tmp/}, where
the probe and every download write, a read-only bind mount instead.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from checks import mounted
from clients import Client
from processes import DEADLINE, BlobserveProcess

#: How long a change of the store may take to show: the cached outcome's
#: two seconds, a probe, and room to spare.
SHOWS_WITHIN = 10.0


@pytest.fixture
def store_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mounted(
        tmp_path / "store",
        "size=64m",
        "the unit tests cover a refused write with a path that cannot be written",
    )


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """
    A port where an upstream would be: it listens, and tells whether anyone
    connected.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener


def mount(*arguments: str) -> None:
    subprocess.run(["mount", *arguments], check=True, timeout=DEADLINE)


async def health(
    client: Client, server: BlobserveProcess, method: str = "GET"
) -> tuple[int, dict[str, object]]:
    fetch = await client.get(
        f"{server.url}/_blobserve/health", method=method
    ).finished()
    assert fetch.complete, fetch.error
    assert fetch.headers["cache-control"] == "no-store"
    return fetch.status, json.loads(fetch.opening) if fetch.opening else {}


async def until_health(
    client: Client, server: BlobserveProcess, status: int
) -> dict[str, object]:
    """
    Ask until the health page answers C{status}, within L{SHOWS_WITHIN}.
    """
    deadline = time.monotonic() + SHOWS_WITHIN
    while True:
        answered, document = await health(client, server)
        if answered == status:
            return document
        assert time.monotonic() < deadline, f"still {answered}: {document}"
        await deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_store_that_takes_no_writes_fails_the_health_check_until_it_does(
    tmp_path: Path, store_disk: Path, upstream: socket.socket, client: Client
) -> None:
    port = upstream.getsockname()[1]
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{port}", store_disk)
    await server.start()
    temporaries = store_disk / "tmp"
    bound = False
    try:
        status, document = await health(client, server)
        assert status == 200
        assert document["status"] == "ok"
        assert await health(client, server, "HEAD") == (200, {})

        mount("--bind", str(temporaries), str(temporaries))
        bound = True
        mount("-o", "remount,bind,ro", str(temporaries))
        document = await until_health(client, server, 503)
        assert document["status"] == "failing"
        checks = document["checks"]
        assert isinstance(checks, dict)
        assert checks["store"] == {
            "ok": False,
            "error": "[Errno 30] Read-only file system",
        }
        assert checks["reactor"]["ok"] is True
        assert (await health(client, server, "HEAD"))[0] == 503

        mount("-o", "remount,bind,rw", str(temporaries))
        document = await until_health(client, server, 200)
        assert document["status"] == "ok"
    finally:
        server.stop()
        if bound:
            subprocess.run(["umount", str(temporaries)], check=False)
    # No probe file is left behind, and nothing asked the upstream.
    assert list(temporaries.iterdir()) == []
    with pytest.raises(BlockingIOError):
        upstream.accept()
