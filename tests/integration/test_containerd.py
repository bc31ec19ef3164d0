"""
containerd, the runtime of most Kubernetes nodes, pulls through blobserve
configured as a mirror in a hosts.toml, naming the registry with ?ns=, with
deploy/containerd/hosts.toml as it is shipped too; and through a blobserve
that requires client credentials (--htpasswd), sent by the hosts.toml as an
Authorization header.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from test_client_auth import PASSWORD, USER, htpasswd
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from deployfiles import rendered
from images import push_image
from processes import DEADLINE, BlobserveProcess, RegistryProcess, stop_pid
from relay import Relay

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="containerd runs as root (CI does)"
)


class Containerd:
    """
    A containerd daemon of the test's own: its own root, state and socket.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("containerd")
        if binary is None:
            raise RuntimeError("containerd is not installed: run `make test`")
        self.socket = directory / "containerd.sock"
        config = directory / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{directory / "root"}"\n'
            f'state = "{directory / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
        )
        self.log = directory / "containerd.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + DEADLINE
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    async def fetch(self, hosts: Path, reference: str) -> str:
        """
        Fetch an image's content (manifests and blobs, verified) with ctr.
        """
        result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
            "ctr",
            [
                "--address",
                str(self.socket),
                "content",
                "fetch",
                "--hosts-dir",
                str(hosts),
                reference,
            ],
            env=dict(os.environ),
            reactor=reactor,
        )
        out, err, code = result
        if code != 0:
            raise RuntimeError(f"ctr content fetch failed ({code}):\n{err.decode()}")
        return out.decode()

    async def digests(self) -> set[str]:
        """
        The digests of every blob in the daemon's content store.
        """
        result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
            "ctr",
            ["--address", str(self.socket), "content", "ls", "--quiet"],
            env=dict(os.environ),
            reactor=reactor,
        )
        out, err, code = result
        if code != 0:
            raise RuntimeError(f"ctr content ls failed ({code}):\n{err.decode()}")
        return set(out.decode().split())


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    yield daemon
    stop_pid(daemon.process)


async def pull_by_ns(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    containerd: Containerd,
    ns: str,
    hosts_toml: Callable[[str], str],
) -> None:
    """
    Push an image, start blobserve with an unreachable default upstream and
    C{ns} routed to the registry, install C{hosts_toml(mirror address)} as
    containerd's hosts.toml for C{ns}, and fetch the image with containerd:
    every request must name C{ns}, and each blob come from upstream once.
    """
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "mirror/containerd", "v1"
    )
    server = BlobserveProcess(
        tmp_path,
        "",
        tmp_path / "storage",
        flags=[
            "--listen=tcp:0:interface=127.0.0.1",
            # The default upstream is unreachable: requests must be routed
            # by the ns containerd names.
            "--upstream=other.test=http://127.0.0.1:9",
            f"--upstream={ns}=http://127.0.0.1:{relay.port}",
            f"--storage={tmp_path / 'storage'}",
        ],
    )
    await server.start()
    hosts = tmp_path / "certs.d"
    (hosts / ns).mkdir(parents=True)
    (hosts / ns / "hosts.toml").write_text(hosts_toml(f"127.0.0.1:{server.port}"))
    try:
        await containerd.fetch(hosts, f"{ns}/mirror/containerd:v1")
    finally:
        server.stop()

    log = server.log.read_text()
    assert f"HEAD /v2/mirror/containerd/manifests/v1?ns={ns}" in log
    for digest in image.blob_digests:
        assert f"/v2/mirror/containerd/blobs/{digest}?ns={ns}" in log
        assert relay.count("GET", f"/blobs/{digest}") == 1


@pytest_twisted.ensureDeferred
async def test_containerd_pulls_through_the_mirror(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    containerd: Containerd,
) -> None:
    # The registry itself is unreachable: only the mirror can serve the pull.
    await pull_by_ns(
        tmp_path,
        registry,
        relay,
        containerd,
        "registry.test",
        lambda mirror: (
            'server = "http://127.0.0.1:9"\n\n'
            f'[host."http://{mirror}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        ),
    )


@pytest_twisted.ensureDeferred
async def test_containerd_pulls_docker_hub_through_the_shipped_hosts_toml(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    containerd: Containerd,
) -> None:
    """
    deploy/containerd/hosts.toml, installed for docker.io with only the
    mirror's address changed, sends containerd's pulls of Docker Hub images
    to blobserve, which routes them by the ?ns=docker.io containerd adds.
    (Docker Hub does not hold the test's image: only the mirror can serve it.)
    """
    await pull_by_ns(
        tmp_path,
        registry,
        relay,
        containerd,
        "docker.io",
        lambda mirror: rendered("containerd/hosts.toml", mirror),
    )


@pytest_twisted.ensureDeferred
async def test_containerd_sends_credentials_from_hosts_toml(
    tmp_path: Path, registry: RegistryProcess, containerd: Containerd
) -> None:
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "mirror/authenticated", "v1"
    )
    server = BlobserveProcess(
        tmp_path,
        f"registry.test={registry.url}",
        tmp_path / "storage",
        extra=(f"--htpasswd={htpasswd(tmp_path)}",),
    )
    await server.start()
    # containerd goes on to the next host after the mirror's 401: the
    # registry is unreachable, so that 401 is what the pull fails with.
    mirror = (
        'server = "http://127.0.0.1:9"\n\n'
        f'[host."http://127.0.0.1:{server.port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    anonymous = tmp_path / "anonymous.d"
    (anonymous / "registry.test").mkdir(parents=True)
    (anonymous / "registry.test" / "hosts.toml").write_text(mirror)
    hosts = tmp_path / "certs.d"
    (hosts / "registry.test").mkdir(parents=True)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (hosts / "registry.test" / "hosts.toml").write_text(
        mirror
        + f'  [host."http://127.0.0.1:{server.port}".header]\n'
        + f'    Authorization = ["Basic {token}"]\n'
    )
    reference = "registry.test/mirror/authenticated:v1"
    try:
        with pytest.raises(RuntimeError, match=r"401 Unauthorized"):
            await containerd.fetch(anonymous, reference)
        refused = await containerd.digests()
        await containerd.fetch(hosts, reference)
        fetched = await containerd.digests()
    finally:
        server.stop()

    pulled = image.blob_digests | {image.manifest_digest}
    assert not pulled & refused
    assert pulled <= fetched
    log = server.log.read_text()
    assert '"HEAD /v2/mirror/authenticated/manifests/v1?ns=registry.test" 401' in log
    for digest in image.blob_digests:
        assert f"/v2/mirror/authenticated/blobs/{digest}?ns=registry.test" in log
    assert token not in log
