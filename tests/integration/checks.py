"""
What the integration tests check again and again: a blob's URL and place in
the store, a correct body, a condition reached in time.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater

from blobserve.digest import Digest

from clients import Fetch
from processes import DEADLINE, BlobserveProcess

Blob = tuple[Digest, bytes]


def blob_url(server: BlobserveProcess, digest: Digest) -> str:
    return f"{server.url}/v2/test/blobs/blobs/{digest}"


def committed_path(server: BlobserveProcess, digest: Digest) -> Path:
    return server.storage / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def assert_correct(fetch: Fetch, data: bytes) -> None:
    assert fetch.status == 200
    assert fetch.complete, fetch.error
    assert fetch.length == len(data)
    assert fetch.sha256 == hashlib.sha256(data).hexdigest()


async def until(condition: Callable[[], bool], what: str) -> None:
    """
    Wait, up to the deadline, for C{condition()} to hold.
    """
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.05, lambda: None)


def mounted(directory: Path, options: str, otherwise: str) -> Iterator[Path]:
    """
    Mount a tmpfs with C{options} at C{directory} (made for it) for as long
    as the generator runs; skip the test, saying what covers it
    C{otherwise}, where mounting is not allowed (it needs root, as CI has).
    """
    directory.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({result.stderr.decode().strip()});"
            f" {otherwise}"
        )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
