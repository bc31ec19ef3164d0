"""
Image references and platforms as blobserve-prefetch reads them.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.digest import Digest
from blobserve.prefetch.manifests import (
    BadPlatform,
    Descriptor,
    Parsed,
    Platform,
    select,
)
from blobserve.prefetch.references import (
    BadReference,
    ImageReference,
    parse_reference,
)

DIGEST = Digest.of(b"manifest")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ImageReference(None, "library/alpine")),
        ("library/alpine:3.20", ImageReference(None, "library/alpine", "3.20")),
        ("org/app", ImageReference(None, "org/app")),
        ("docker.io/alpine", ImageReference("docker.io", "library/alpine")),
        ("index.docker.io/org/app", ImageReference("docker.io", "org/app")),
        (
            f"ghcr.io/org/app@{DIGEST}",
            ImageReference("ghcr.io", "org/app", None, DIGEST),
        ),
        ("ghcr.io/app", ImageReference("ghcr.io", "app")),
        (
            "localhost:5000/app:v1",
            ImageReference("localhost:5000", "app", "v1"),
        ),
        ("localhost/app", ImageReference("localhost", "app")),
        ("[::1]:5000/a/b", ImageReference("[::1]:5000", "a/b")),
        (
            f"app:v2@{DIGEST}",
            ImageReference(None, "library/app", "v2", DIGEST),
        ),
    ],
)
def test_references_are_read_as_docker_reads_them(
    text: str, expected: ImageReference
) -> None:
    assert parse_reference(text) == expected


def test_what_is_asked_for_is_the_digest_else_the_tag_else_latest() -> None:
    assert parse_reference("alpine").reference == "latest"
    assert parse_reference("alpine:3.20").reference == "3.20"
    assert parse_reference(f"alpine:3.20@{DIGEST}").reference == str(DIGEST)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Alpine",
        "alpine:",
        "alpine:.bad",
        "a/b:c:d",
        "alpine@sha256:abc",
        "alpine@md5:d41d8cd98f00b204e9800998ecf8427e",
        "ghcr.io/",
        "bad_host.io/app",
        "a//b",
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


_COMPONENT = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True)
# A first component with a dot is a registry, as docker reads it.
_FIRST = st.from_regex(r"[a-z0-9]+(?:[_-][a-z0-9]+)?", fullmatch=True)
_REGISTRY = st.from_regex(r"[a-z0-9]+\.[a-z]{2,5}(?::[0-9]{1,5})?", fullmatch=True)


@given(
    registry=st.one_of(st.none(), _REGISTRY),
    first=_FIRST,
    components=st.lists(_COMPONENT, min_size=1, max_size=3),
    tag=st.one_of(
        st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
    ),
    digest=st.one_of(st.none(), st.binary(max_size=8).map(Digest.of)),
)
def test_a_written_reference_reads_back(
    registry: str | None,
    first: str,
    components: list[str],
    tag: str | None,
    digest: Digest | None,
) -> None:
    written = ImageReference(registry, "/".join([first, *components]), tag, digest)
    assert parse_reference(str(written)) == written


@given(st.text(max_size=200))
def test_any_text_is_refused_or_read_as_a_reference_written_the_same(
    text: str,
) -> None:
    try:
        read = parse_reference(text)
    except BadReference:
        return
    assert parse_reference(str(read)) == read


def _entry(os: str, architecture: str, variant: str | None = None) -> Descriptor:
    platform = {"os": os, "architecture": architecture}
    if variant is not None:
        platform["variant"] = variant
    return Descriptor("m", Digest.of(repr(platform).encode()), 1, platform)


INDEX = Parsed(
    "application/vnd.oci.image.index.v1+json",
    [
        _entry("linux", "amd64"),
        _entry("linux", "arm64", "v8"),
        _entry("linux", "arm", "v7"),
        _entry("unknown", "unknown"),
    ],
)


def test_every_manifest_of_an_index_without_platforms() -> None:
    assert select(INDEX, []) == INDEX.descriptors


@pytest.mark.parametrize(
    ("asked", "chosen"),
    [
        (["linux/amd64"], [0]),
        (["linux/arm64"], [1]),
        (["linux/arm64/v8"], [1]),
        (["linux/arm64/v9"], []),
        (["linux/arm/v7", "linux/amd64"], [0, 2]),
        (["windows/amd64"], []),
    ],
)
def test_platforms_match_os_architecture_and_variant_if_named(
    asked: list[str], chosen: list[int]
) -> None:
    platforms = [Platform.parse(text) for text in asked]
    assert select(INDEX, platforms) == [INDEX.descriptors[i] for i in chosen]


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_malformed_platforms_are_refused(text: str) -> None:
    with pytest.raises(BadPlatform):
        Platform.parse(text)
