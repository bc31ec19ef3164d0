"""
blobserve-prefetch, run as a user runs it, against a blobserve in front of a
real upstream: what it fetches, what the upstream sees, what it prints.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from images import Image, push_image
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

#: The longest a prefetch may take here.
DEADLINE = 60


def _command(server: BlobserveProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "blobserve.prefetch", "--server", server.url, *args]


def _environment() -> dict[str, str]:
    # PYTHONPATH passes through, so the child runs the same code as twistd.
    return {**os.environ, "COLUMNS": "120", "TERM": "xterm"}


async def prefetch(server: BlobserveProcess, *args: str) -> tuple[int, str, str]:
    """
    Run blobserve-prefetch with pipes for its output, off the reactor (the
    relay runs on it); its exit status, output and errors.
    """
    done: subprocess.CompletedProcess[str] = await deferToThread(
        subprocess.run,
        _command(server, *args),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=_environment(),
    )
    return done.returncode, done.stdout, done.stderr


def _run_on_terminal(command: list[str]) -> tuple[int, str]:
    controller, terminal = pty.openpty()
    try:
        child = subprocess.Popen(
            command, stdout=terminal, stderr=terminal, env=_environment()
        )
    finally:
        os.close(terminal)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    return child.wait(timeout=DEADLINE), b"".join(chunks).decode(errors="replace")


def platform_blobs(image: Image, architecture: str) -> set[str]:
    """
    The config and layer digests of C{image}'s manifest for C{architecture}.
    """
    blobs = image.layout / "blobs" / "sha256"

    def read(digest: str) -> dict[str, object]:
        document: dict[str, object] = json.loads((blobs / digest[7:]).read_bytes())
        return document

    index = read(image.manifest_digest)
    entries = index["manifests"]
    assert isinstance(entries, list)
    (entry,) = [e for e in entries if e["platform"]["architecture"] == architecture]
    manifest = read(entry["digest"])
    layers = manifest["layers"]
    config = manifest["config"]
    assert isinstance(layers, list) and isinstance(config, dict)
    return {config["digest"], *(layer["digest"] for layer in layers)}


async def _multi(tmp_path: Path, registry: RegistryProcess, name: str) -> Image:
    return await push_image(
        tmp_path,
        f"127.0.0.1:{registry.port}",
        name,
        "v1",
        platforms=["amd64", "arm64"],
    )


def blob_gets(relay: Relay, digests: set[str]) -> int:
    return sum(relay.count("GET", f"/blobs/{digest}") for digest in digests)


@pytest_twisted.ensureDeferred
async def test_prefetch_of_an_index_fetches_every_platform_once(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await _multi(tmp_path, registry, "prefetch/all")

    status, out, err = await prefetch(blobserve, image.reference)
    assert (status, err) == (0, ""), err
    for digest in image.blob_digests:
        assert relay.count("GET", f"/blobs/{digest}") == 1
    # Without a terminal: one line per blob, then the summary.
    lines = out.splitlines()
    blobs = len(image.blob_digests)
    assert sum(line.startswith("miss ") for line in lines) == blobs
    assert lines[-1].startswith(
        f"1 image: {blobs} blobs complete (0 already cached, {blobs} fetched), 0 failed"
    )

    status, out, err = await prefetch(blobserve, "--quiet", image.reference)
    assert (status, err) == (0, ""), err
    # Every blob a hit: no upstream GET the second time.
    assert blob_gets(relay, image.blob_digests) == blobs
    assert out.splitlines() == [out.splitlines()[-1]]
    assert out.startswith(
        f"1 image: {blobs} blobs complete ({blobs} already cached, 0 fetched), 0 failed"
    )


@pytest_twisted.ensureDeferred
async def test_platform_fetches_only_that_platforms_blobs(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await _multi(tmp_path, registry, "prefetch/one")
    amd64, arm64 = platform_blobs(image, "amd64"), platform_blobs(image, "arm64")

    status, _out, err = await prefetch(
        blobserve, "--platform", "linux/amd64", image.reference
    )
    assert (status, err) == (0, ""), err
    assert blob_gets(relay, amd64) == len(amd64)
    assert blob_gets(relay, arm64 - amd64) == 0


@pytest_twisted.ensureDeferred
async def test_a_missing_tag_fails_with_a_message(
    tmp_path: Path, relay: Relay, blobserve: BlobserveProcess
) -> None:
    status, _out, err = await prefetch(blobserve, "prefetch/none:nothing")
    assert status == 1
    assert "error: prefetch/none:nothing: 404 MANIFEST_UNKNOWN" in err
    assert "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_fails_with_a_message(
    tmp_path: Path, relay: Relay, blobserve: BlobserveProcess
) -> None:
    blobserve.stop()
    status, _out, err = await prefetch(blobserve, "prefetch/any")
    assert status == 1
    assert f"cannot reach blobserve at {blobserve.url}: " in err
    assert "connection refused" in err
    assert "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_on_a_terminal_progress_bars_show_rate_and_eta(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await _multi(tmp_path, registry, "prefetch/tty")
    status, shown = await deferToThread(
        _run_on_terminal, _command(blobserve, image.reference)
    )
    assert status == 0, shown
    blobs = len(image.blob_digests)
    assert f"{blobs} blobs" in shown
    assert "ETA" in shown
    assert "/s" in shown
    assert f"{blobs} blobs complete (0 already cached, {blobs} fetched)" in shown
