"""
One process at a time on a store: blobserve-fsck against a live blobserve is
refused and changes nothing, blobserve does not start while fsck (or another
blobserve) holds the store, and each says why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from blobserve.digest import Digest
from blobserve.fsck import IN_USE
from blobserve.store.lock import StoreLock

from checks import assert_correct, blob_url, committed_path, until
from clients import Client
from processes import DEADLINE, BlobserveProcess
from relay import Relay


def fsck(storage: Path) -> subprocess.CompletedProcess[str]:
    """
    Run C{blobserve-fsck} on C{storage} as a user would, within the deadline.
    """
    return subprocess.run(
        [str(Path(sys.executable).with_name("blobserve-fsck")), str(storage)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@pytest_twisted.ensureDeferred
async def test_fsck_against_a_live_server_is_refused(
    blobserve: BlobserveProcess,
    client: Client,
    relay: Relay,
    blob: tuple[Digest, bytes],
) -> None:
    digest, data = blob
    assert_correct(await client.get(blob_url(blobserve, digest)).finished(), data)
    path = committed_path(blobserve, digest)
    await until(path.exists, "the commit")
    # Damage that fsck would repair, were it allowed to.
    path.write_bytes(b"x" * len(data))

    refused = fsck(blobserve.storage)
    assert refused.returncode == IN_USE
    assert refused.stdout == ""
    assert f"the store {blobserve.storage} is in use by blobserve" in refused.stderr
    assert path.read_bytes() == b"x" * len(data)
    assert blobserve.process is not None and blobserve.process.poll() is None

    blobserve.stop()
    repaired = fsck(blobserve.storage)
    assert repaired.returncode == 1, repaired.stderr
    assert f"removed {path.relative_to(blobserve.storage)}: does not verify" in (
        repaired.stdout
    )


@pytest_twisted.ensureDeferred
async def test_blobserve_does_not_start_while_fsck_holds_the_store(
    tmp_path: Path, relay: Relay
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", storage)
    held = StoreLock.acquire(str(storage), "blobserve-fsck")
    try:
        # start() fails once the process exits, or after the deadline.
        with pytest.raises(RuntimeError, match="blobserve exited"):
            await server.start()
    finally:
        held.release()
        server.stop()
    assert server.process is not None and server.process.returncode != 0
    assert f"the store {storage} is in use by blobserve-fsck" in server.log.read_text()

    # Once fsck is done, it starts.
    await server.start()
    server.stop()


@pytest_twisted.ensureDeferred
async def test_a_second_blobserve_on_a_store_in_use_does_not_start(
    tmp_path: Path,
    blobserve: BlobserveProcess,
    client: Client,
    blob: tuple[Digest, bytes],
) -> None:
    second_directory = tmp_path / "second"
    second_directory.mkdir()
    second = BlobserveProcess(second_directory, blobserve.upstream, blobserve.storage)
    try:
        with pytest.raises(RuntimeError, match="blobserve exited"):
            await second.start()
    finally:
        second.stop()
    assert second.process is not None and second.process.returncode != 0
    assert f"the store {blobserve.storage} is in use by blobserve" in (
        second.log.read_text()
    )
    # The first goes on.
    digest, data = blob
    assert_correct(await client.get(blob_url(blobserve, digest)).finished(), data)
