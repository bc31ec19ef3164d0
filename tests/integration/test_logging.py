"""
blobserve's log under twistd: JSON lines where twistd writes text, no
per-connection noise, and failures said in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytest_twisted

from blobserve.digest import Digest

from checks import assert_correct
from clients import Client
from processes import BlobserveProcess, RegistryProcess, free_port

#: What a Failure's repr starts with: never in a log line.
FAILURE_REPR = "[<twisted.python.failure.Failure"


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_a_pull_through_logs_what_it_did_and_no_factory_noise(
    tmp_path: Path, registry: RegistryProcess, client: Client, log_format: str
) -> None:
    data = os.urandom(64 * 1024)
    digest = registry.push_blob("logs/pulled", data)
    server = BlobserveProcess(
        tmp_path,
        registry.url,
        tmp_path / "storage",
        extra=("--log-format", log_format),
    )
    await server.start()
    try:
        url = f"{server.url}/v2/logs/pulled/blobs/{digest}"
        for _ in range(2):  # the second from the store
            fetch = await client.get(url).finished()
            assert_correct(fetch, data)
    finally:
        server.stop()
    log = server.log.read_text()
    if log_format == "json":
        events = [json.loads(line) for line in log.splitlines()]
        committed = [e for e in events if e["text"].startswith("committed ")]
        assert [e.get("digest") for e in committed] == [str(digest)]
        assert {"time", "level", "namespace", "text"} <= committed[0].keys()
        said = "\n".join(e["text"] for e in events)
    else:
        said = log
        assert f"committed {digest}" in said
    assert "Starting factory" not in said
    assert "Stopping factory" not in said
    assert FAILURE_REPR not in said


@pytest_twisted.ensureDeferred
async def test_a_refused_upstream_is_one_line_naming_blob_repository_and_upstream(
    tmp_path: Path, client: Client
) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"
    server = BlobserveProcess(tmp_path, upstream, tmp_path / "storage")
    await server.start()
    digest = Digest.of(b"refused")
    try:
        url = f"{server.url}/v2/logs/refused/blobs/{digest}"
        fetch = await client.get(url).finished()
        assert fetch.status == 502
    finally:
        server.stop()
    log = server.log.read_text()
    host = upstream.removeprefix("http://")
    assert (
        f"cannot fetch {digest} of logs/refused from {upstream}:"
        f" upstream {host} unreachable: connection refused"
    ) in log
    assert FAILURE_REPR not in log
    assert "Traceback" not in log
