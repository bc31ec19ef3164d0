"""
Test images: OCI image layouts made on the spot with random layers, and
Debian's skopeo to push them to the upstream and pull them through blobserve.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from attrs import define
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@define
class Image:
    """
    What was pushed: the digest of the top manifest (an index for a
    multi-platform image) and of every blob.
    """

    reference: str
    manifest_digest: str
    blob_digests: set[str]
    manifest_digests: set[str]
    #: The OCI layout it was pushed from.
    layout: Path


class _Layout:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "blobs" / "sha256").mkdir(parents=True)
        (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.blobs: set[str] = set()
        self.manifests: set[str] = set()

    def add(self, content: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        (self.directory / "blobs" / "sha256" / digest[7:]).write_bytes(content)
        if media_type in (MANIFEST, INDEX):
            self.manifests.add(digest)
        else:
            self.blobs.add(digest)
        return {"mediaType": media_type, "digest": digest, "size": len(content)}

    def add_json(self, document: dict[str, Any], media_type: str) -> dict[str, Any]:
        return self.add(json.dumps(document, indent=2).encode(), media_type)

    def image(self, architecture: str, layer_sizes: list[int]) -> dict[str, Any]:
        layers, diff_ids = [], []
        for size in layer_sizes:
            tar = io.BytesIO()
            with tarfile.open(fileobj=tar, mode="w") as archive:
                member = tarfile.TarInfo("random.bin")
                member.size = size
                archive.addfile(member, io.BytesIO(os.urandom(size)))
            diff_ids.append("sha256:" + hashlib.sha256(tar.getvalue()).hexdigest())
            layers.append(self.add(gzip.compress(tar.getvalue(), mtime=0), LAYER))
        config = self.add_json(
            {
                "architecture": architecture,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            },
            CONFIG,
        )
        return self.add_json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config,
                "layers": layers,
            },
            MANIFEST,
        )

    def finish(self, top: dict[str, Any], tag: str) -> str:
        entry = dict(top, annotations={"org.opencontainers.image.ref.name": tag})
        (self.directory / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": [entry]})
        )
        return str(top["digest"])


async def skopeo(*args: str) -> str:
    """
    Run skopeo without blocking the reactor, and return what it printed.

    @raise RuntimeError: with its output, if it fails.
    """
    binary = shutil.which("skopeo")
    if binary is None:
        raise RuntimeError("skopeo is not installed: run `make test`")
    result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
        binary, ["--insecure-policy", *args], env=dict(os.environ), reactor=reactor
    )
    out, err, code = result
    if code != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed ({code}):\n{err.decode()}")
    return out.decode()


async def push_image(
    workdir: Path,
    registry: str,
    repository: str,
    tag: str,
    platforms: list[str] | None = None,
    layer_sizes: tuple[int, ...] = (300_000, 200_000),
    credentials: str | None = None,
) -> Image:
    """
    Make an image with random layers and push it with skopeo to C{registry}
    (host:port) as C{repository:tag}. With C{platforms}, an index of one
    image per architecture.
    """
    directory = workdir / f"layout-{repository.replace('/', '-')}-{tag}"
    layout = _Layout(directory)
    if platforms:
        entries = []
        for architecture in platforms:
            entry = layout.image(architecture, list(layer_sizes))
            entry["platform"] = {"architecture": architecture, "os": "linux"}
            entries.append(entry)
        top = layout.add_json(
            {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}, INDEX
        )
    else:
        top = layout.image("amd64", list(layer_sizes))
    digest = layout.finish(top, tag)
    args = ["copy", "--dest-tls-verify=false"]
    if platforms:
        args.append("--all")
    if credentials:
        args += ["--dest-creds", credentials]
    await skopeo(
        *args, f"oci:{directory}:{tag}", f"docker://{registry}/{repository}:{tag}"
    )
    return Image(
        f"{repository}:{tag}", digest, layout.blobs, layout.manifests, directory
    )


async def pull_image(
    source: str,
    destination: Path,
    all_platforms: bool = False,
    kind: str = "oci",
    credentials: str | None = None,
) -> None:
    """
    Copy C{source} (host:port/repository:tag) with skopeo into an OCI layout,
    or with C{kind="dir"} into a plain directory; with C{credentials}
    (C{user:password}) if given.
    """
    args = ["copy", "--src-tls-verify=false", "--preserve-digests"]
    if all_platforms:
        args.append("--all")
    if credentials:
        args += ["--src-creds", credentials]
    target = f"oci:{destination}:pulled" if kind == "oci" else f"dir:{destination}"
    await skopeo(*args, f"docker://{source}", target)


def dir_digests(directory: Path) -> set[str]:
    """
    The digests of the blobs skopeo wrote to a C{dir:} destination, and of
    its manifest.
    """
    digests = {
        "sha256:" + path.name for path in directory.iterdir() if len(path.name) == 64
    }
    manifest = (directory / "manifest.json").read_bytes()
    return digests | {"sha256:" + hashlib.sha256(manifest).hexdigest()}


def layout_digests(directory: Path) -> set[str]:
    """
    The digests of every blob and manifest in an OCI layout.
    """
    return {
        "sha256:" + path.name for path in (directory / "blobs" / "sha256").iterdir()
    }


def layout_top_digest(directory: Path) -> str:
    index = json.loads((directory / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest
