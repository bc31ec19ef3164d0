"""
Clients authenticating to blobserve (--htpasswd, bcrypt entries as
C{htpasswd -B} writes them): skopeo pulls with its credentials, a wrong
password is refused with the challenge, health and metrics stay open, and
no log holds the password or the Authorization header.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.web.http_headers import Headers

from images import layout_digests, layout_top_digest, pull_image, push_image
from processes import DEADLINE, BlobserveProcess, RegistryProcess

USER = "carol"
PASSWORD = "mirror-Secret-42"


def htpasswd(directory: Path) -> Path:
    """
    An htpasswd file made by Apache's C{htpasswd -B}, as for docker-registry.
    """
    path = directory / "clients.htpasswd"
    subprocess.run(
        ["htpasswd", "-B", "-b", "-c", str(path), USER, PASSWORD],
        check=True,
        capture_output=True,
        timeout=DEADLINE,
    )
    assert path.read_text().startswith(f"{USER}:$2y$")
    return path


async def ask(
    url: str, credentials: str | None = None, method: str = "GET"
) -> tuple[int, Headers, bytes]:
    headers = Headers()
    if credentials is not None:
        headers.addRawHeader(
            b"Authorization", b"Basic " + base64.b64encode(credentials.encode())
        )
    response = await treq.request(
        method, url, headers=headers, timeout=DEADLINE, persistent=False
    )
    return response.code, response.headers, await response.content()


@pytest_twisted.ensureDeferred
async def test_clients_authenticate_with_htpasswd_credentials(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "clients/auth", "v1"
    )
    server = BlobserveProcess(
        tmp_path,
        registry.url,
        tmp_path / "storage",
        extra=(f"--htpasswd={htpasswd(tmp_path)}",),
    )
    await server.start()
    try:
        out = tmp_path / "pulled"
        source = f"127.0.0.1:{server.port}/clients/auth:v1"
        await pull_image(source, out, credentials=f"{USER}:{PASSWORD}")
        with pytest.raises(RuntimeError, match=r"(?i)unauthorized|401"):
            await pull_image(source, tmp_path / "refused", credentials=f"{USER}:wrong")
        with pytest.raises(RuntimeError, match=r"(?i)unauthorized|401"):
            await pull_image(source, tmp_path / "anonymous")

        base = await ask(f"{server.url}/v2/")
        wrong = await ask(f"{server.url}/v2/", f"{USER}:wrong")
        head = await ask(f"{server.url}/v2/", method="HEAD")
        status = await ask(f"{server.url}/_blobserve/status")
        good_status = await ask(f"{server.url}/_blobserve/status", f"{USER}:{PASSWORD}")
        health = await ask(f"{server.url}/_blobserve/health")
        metrics = await ask(f"{server.url}/metrics")
    finally:
        server.stop()
    assert layout_top_digest(out) == image.manifest_digest
    assert layout_digests(out) == image.blob_digests | {image.manifest_digest}
    for code, headers, body in (base, wrong, status):
        assert code == 401
        assert headers.getRawHeaders(b"WWW-Authenticate") == [
            b'Basic realm="blobserve"'
        ]
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert (head[0], head[2]) == (401, b"")
    assert head[1].getRawHeaders(b"WWW-Authenticate") == [b'Basic realm="blobserve"']
    assert good_status[0] == 200
    assert health[0] == 200
    assert metrics[0] == 200
    assert b"blobserve_" in metrics[2]

    log = server.log.read_text()
    assert '"GET /v2/" 401' in log
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, encoded, "wrong"):
        assert secret not in log
    assert "authorization" not in log.lower()
