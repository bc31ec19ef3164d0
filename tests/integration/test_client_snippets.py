"""
skopeo (and so podman, buildah and CRI-O, which share its registries.conf)
pulls Docker Hub images through blobserve with deploy/podman/registries.conf
as it is shipped, only the mirror's address changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from deployfiles import rendered
from images import dir_digests, push_image, skopeo
from processes import BlobserveProcess, RegistryProcess
from relay import Relay


@pytest_twisted.ensureDeferred
async def test_skopeo_pulls_docker_hub_through_the_shipped_registries_conf(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "mirror/skopeo", "v1"
    )
    conf = tmp_path / "registries.conf"
    conf.write_text(rendered("podman/registries.conf", f"127.0.0.1:{blobserve.port}"))
    pulled = tmp_path / "pulled"
    # docker.io itself does not hold this image: only the mirror can serve
    # it, and skopeo sends no ?ns=, so blobserve's default upstream does.
    await skopeo(
        "--registries-conf",
        str(conf),
        "copy",
        "--preserve-digests",
        "docker://docker.io/mirror/skopeo:v1",
        f"dir:{pulled}",
    )

    assert dir_digests(pulled) == image.blob_digests | {image.manifest_digest}
    log = blobserve.log.read_text()
    assert "/v2/mirror/skopeo/manifests/v1" in log
    for digest in image.blob_digests:
        assert f"/v2/mirror/skopeo/blobs/{digest}" in log
        assert relay.count("GET", f"/blobs/{digest}") == 1
