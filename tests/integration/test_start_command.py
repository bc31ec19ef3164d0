"""
The README's command to start blobserve without make works twice in the
same directory: it leaves no twistd.pid for a second blobserve to trip over.
"""

from __future__ import annotations

import re
import shlex
import urllib.request
from pathlib import Path

import pytest_twisted

from processes import BlobserveProcess, RegistryProcess

README = Path(__file__).parents[2] / "README.rst"


def readme_twistd_options() -> tuple[str, ...]:
    """
    twistd's own options in the README's "without make" command.
    """
    found = re.search(
        r"``pip install \. && twistd (?P<options>[^`]*) blobserve``", README.read_text()
    )
    assert found, "README.rst has no ``pip install . && twistd … blobserve``"
    return tuple(shlex.split(found["options"]))


@pytest_twisted.ensureDeferred
async def test_the_readme_command_starts_a_second_blobserve_in_the_same_directory(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    options = readme_twistd_options()
    servers = [
        BlobserveProcess(
            tmp_path,
            registry.url,
            tmp_path / f"storage-{n}",
            twistd_args=options,
        )
        for n in (1, 2)
    ]
    try:
        for server in servers:
            await server.start()
        for server in servers:
            with urllib.request.urlopen(f"{server.url}/v2/", timeout=5) as response:
                assert response.status == 200
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        for server in servers:
            server.stop()
