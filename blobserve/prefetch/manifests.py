"""
What an image's manifests say: which manifests an index holds for which
platform, and which blobs (config and layers) a manifest needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from blobserve.digest import Digest, InvalidDigest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

#: The C{Accept} header of every manifest request: the types read here.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


class BadManifest(ValueError):
    """
    A manifest is not one this tool can read.
    """


class BadPlatform(ValueError):
    """
    A text is not a platform such as C{linux/amd64} or C{linux/arm/v7}.
    """


@frozen
class Descriptor:
    """
    What a manifest says of another object: its media type, digest and size.
    """

    media_type: str
    digest: Digest
    size: int
    #: The index's C{platform} object for a manifest in an index, else empty.
    platform: dict[str, Any]


@frozen
class Platform:
    """
    A platform asked for with C{--platform}: an OS, an architecture and maybe
    a variant.
    """

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """
        Read C{os/architecture[/variant]}.

        @raise BadPlatform: if C{text} is not that.
        """
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise BadPlatform(
                f"{text[:100]!r} is not a platform such as linux/amd64 or linux/arm/v7"
            )
        return cls(*parts)

    def matches(self, platform: dict[str, Any]) -> bool:
        """
        Whether an index's C{platform} object is this one: the same OS and
        architecture, and the same variant if this one names a variant.
        """
        return (
            platform.get("os") == self.os
            and platform.get("architecture") == self.architecture
            and (self.variant is None or platform.get("variant") == self.variant)
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@frozen
class Parsed:
    """
    A manifest or index read: its media type and the descriptors it holds
    (an index's manifests, or a manifest's config then layers).
    """

    media_type: str
    descriptors: list[Descriptor]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse_manifest(content: bytes, content_type: str | None) -> Parsed:
    """
    Read an index or image manifest, whose type is its C{mediaType} or else
    the C{Content-Type} it was served with.

    @raise BadManifest: if it is not JSON, is of another type (Docker's
        schema 1, an artifact without layers is fine), or its descriptors are
        malformed.
    """
    try:
        document = json.loads(content)
    except ValueError:
        raise BadManifest("the manifest is not JSON") from None
    if not isinstance(document, dict):
        raise BadManifest("the manifest is not a JSON object")
    media_type = document.get("mediaType") or content_type
    if media_type in INDEX_TYPES:
        return Parsed(media_type, _descriptors(document.get("manifests")))
    if media_type in MANIFEST_TYPES:
        config = _descriptors([document.get("config")])
        return Parsed(media_type, config + _descriptors(document.get("layers", [])))
    raise BadManifest(f"unsupported manifest type {str(media_type)[:100]!r}")


def _descriptors(items: object) -> list[Descriptor]:
    if not isinstance(items, list):
        raise BadManifest("the manifest lists no descriptors")
    found = []
    for item in items:
        if not isinstance(item, dict):
            raise BadManifest("a descriptor is not a JSON object")
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadManifest("a descriptor has no valid size")
        try:
            digest = Digest.parse(str(item.get("digest")))
        except InvalidDigest as error:
            raise BadManifest(f"a descriptor's digest: {error}") from None
        platform = item.get("platform")
        found.append(
            Descriptor(
                str(item.get("mediaType", "")),
                digest,
                size,
                platform if isinstance(platform, dict) else {},
            )
        )
    return found


def select(index: Parsed, platforms: Sequence[Platform]) -> list[Descriptor]:
    """
    The manifests of C{index} to prefetch: all of them when no platform is
    asked for, else those of any platform asked for.
    """
    if not platforms:
        return list(index.descriptors)
    return [
        d for d in index.descriptors if any(p.matches(d.platform) for p in platforms)
    ]


def distributable(descriptor: Descriptor) -> bool:
    """
    Whether a layer may be fetched from a registry: foreign (non-distributable)
    layers, such as Windows base layers, live elsewhere.
    """
    return "foreign" not in descriptor.media_type and (
        "nondistributable" not in descriptor.media_type
    )
