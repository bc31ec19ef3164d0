"""
Image references as docker writes them: C{[registry/]repository[:tag|@digest]}.
"""

from __future__ import annotations

import re

from attrs import frozen

from blobserve.digest import Digest, InvalidDigest
from blobserve.web.names import InvalidName, InvalidTag, parse_name, parse_tag

#: Docker Hub, the registry of names that do not say theirs.
DOCKER_HUB = "docker.io"

#: What docker also calls Docker Hub.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


#: A registry: a host name or a bracketed IPv6 address, and maybe a port.
_REGISTRY = re.compile(
    r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?"
)


class BadReference(ValueError):
    """
    A text is not an image reference.
    """


@frozen
class ImageReference:
    """
    One image to prefetch: a manifest by tag or digest in a repository of a
    registry.
    """

    #: The registry the reference names, or L{None} when it names none (then
    #: blobserve's default registry is meant).
    registry: str | None
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """
        What to ask for in C{/v2/<name>/manifests/<reference>}: the digest if
        there is one (a digest pins what a tag beside it only names), else the
        tag, else C{latest}.
        """
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    def __str__(self) -> str:
        text = self.repository
        if self.registry is not None:
            text = f"{self.registry}/{text}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _is_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> ImageReference:
    """
    Read C{text} as docker does: the first path component is a registry if it
    holds a C{.} or a C{:} or is C{localhost} (and is not all there is);
    Docker Hub's names without a slash are in C{library/}; without tag or
    digest, the tag is C{latest}. C{index.docker.io/x} is C{docker.io/x}.

    @raise BadReference: if C{text} is not a reference, saying why.
    """
    rest, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as error:
            raise BadReference(f"{text[:200]!r}: {error}") from None
    first, slash, remainder = rest.partition("/")
    registry = None
    if slash and _is_registry(first):
        registry, rest = first, remainder
        if not _REGISTRY.fullmatch(registry):
            raise BadReference(f"{text[:200]!r}: invalid registry {registry[:100]!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
    # A tag follows the last colon after the last slash; a colon before it
    # belonged to the registry's port, and that has been taken off.
    name, colon, tag = rest.partition(":")
    try:
        if colon:
            parse_tag(tag)
        parse_name(name)
    except (InvalidName, InvalidTag) as error:
        raise BadReference(f"{text[:200]!r}: {error}") from None
    if registry in (None, DOCKER_HUB) and "/" not in name:
        name = f"library/{name}"
    return ImageReference(registry, name, tag if colon else None, digest)
