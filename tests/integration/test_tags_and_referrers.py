"""
Tags lists and referrers through blobserve: a paginated tags list from a
real docker-registry upstream, cosign-style signature tags, the referrers
tag schema fallback (distribution 2.8 has no referrers API), and the
referrers API passed through from a small upstream that has one.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.digest import Digest

from authservers import listen
from processes import DEADLINE, BlobserveProcess, RegistryProcess
from relay import Relay

IMAGE_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
SIGNATURE = "application/vnd.example.signature"
SBOM = "application/vnd.example.sbom"
COSIGN = "application/vnd.dev.cosign.simplesigning.v1+json"


def push_manifest(
    registry: RegistryProcess, name: str, reference: str, body: dict[str, Any]
) -> tuple[Digest, bytes]:
    """
    Put C{body} as manifest C{reference} of repository C{name}, with a plain
    HTTP PUT, as a pusher of the referrers tag schema does.
    """
    content = json.dumps(body).encode()
    put = urllib.request.Request(
        f"{registry.url}/v2/{name}/manifests/{reference}",
        data=content,
        method="PUT",
        headers={"Content-Type": body["mediaType"]},
    )
    with urllib.request.urlopen(put, timeout=DEADLINE) as response:
        assert response.status == 201
    return Digest.of(content), content


def image(
    registry: RegistryProcess,
    name: str,
    reference: str,
    artifact_type: str | None = None,
    subject: tuple[Digest, bytes] | None = None,
    layer: bytes = b"",
) -> tuple[Digest, bytes]:
    """
    Push a small OCI image manifest (an empty config, one layer if
    C{layer}), an OCI 1.1 artifact of C{artifact_type} referring to
    C{subject} if given.
    """
    config = registry.push_blob(name, b"{}")
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": IMAGE_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": str(config), "size": 2},
        "layers": [],
    }
    if layer:
        digest = registry.push_blob(name, layer)
        body["layers"] = [
            {"mediaType": COSIGN, "digest": str(digest), "size": len(layer)}
        ]
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    if subject is not None:
        body["subject"] = {
            "mediaType": IMAGE_TYPE,
            "digest": str(subject[0]),
            "size": len(subject[1]),
        }
    return push_manifest(registry, name, reference, body)


def descriptor(manifest: tuple[Digest, bytes], artifact_type: str) -> dict[str, Any]:
    return {
        "mediaType": IMAGE_TYPE,
        "digest": str(manifest[0]),
        "size": len(manifest[1]),
        "artifactType": artifact_type,
    }


async def get(url: str, method: str = "GET") -> tuple[int, Any, bytes]:
    # Distribution 2.8 serves an OCI manifest only to a client accepting it.
    accept = Headers({b"Accept": [f"{IMAGE_TYPE}, {INDEX_TYPE}".encode()]})
    response = await treq.request(
        method, url, headers=accept, timeout=DEADLINE, persistent=False
    )
    body = await treq.content(response)
    return response.code, response.headers, body


def header(headers: Any, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode() if values else None


@pytest_twisted.ensureDeferred
async def test_tags_list_of_the_registry_is_passed_on_and_kept(
    registry: RegistryProcess, relay: Relay, blobserve: BlobserveProcess
) -> None:
    tags = ["a1", "a2", "b1"]
    for tag in tags:
        image(registry, "listing/tagged", tag)
    url = f"{blobserve.url}/v2/listing/tagged/tags/list?n=2"
    status, headers, body = await get(url)
    assert status == 200
    assert header(headers, b"content-type") == "application/json"
    answer = json.loads(body)
    assert answer["name"] == "listing/tagged"
    # Distribution 2.8 ignores n: one page of every tag, no next link.
    assert sorted(answer["tags"]) == tags
    assert header(headers, b"link") is None
    assert relay.count("GET", "/tags/list?n=2") == 1
    # Within the TTL the page is kept: the upstream is not asked again.
    status, _, again = await get(url)
    assert (status, again) == (200, body)
    assert relay.count("GET", "/tags/list?n=2") == 1


@pytest_twisted.ensureDeferred
async def test_tags_list_of_an_unknown_repository_is_name_unknown(
    blobserve: BlobserveProcess,
) -> None:
    status, _, body = await get(f"{blobserve.url}/v2/listing/nothing/tags/list")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_cosign_signature_tag_is_pulled_through_by_tag(
    registry: RegistryProcess, blobserve: BlobserveProcess
) -> None:
    subject = image(registry, "listing/signed", "v1")
    tag = f"sha256-{subject[0].hex}.sig"
    signature = image(registry, "listing/signed", tag, layer=b'{"critical": {}}')
    status, headers, body = await get(
        f"{blobserve.url}/v2/listing/signed/manifests/{tag}"
    )
    assert status == 200
    assert body == signature[1]
    assert header(headers, b"docker-content-digest") == str(signature[0])


@pytest_twisted.ensureDeferred
async def test_referrers_fall_back_to_the_tag_schema_of_a_registry_without_api(
    registry: RegistryProcess, relay: Relay, blobserve: BlobserveProcess
) -> None:
    name = "listing/referred"
    subject = image(registry, name, "v1")
    signature = image(registry, name, "signature", SIGNATURE, subject)
    sbom = image(registry, name, "sbom", SBOM, subject)
    # Distribution 2.8 keeps no referrers tag: the pusher does.
    push_manifest(
        registry,
        name,
        f"sha256-{subject[0].hex}",
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [descriptor(signature, SIGNATURE), descriptor(sbom, SBOM)],
        },
    )
    url = f"{blobserve.url}/v2/{name}/referrers/{subject[0]}"

    status, headers, body = await get(url)
    assert status == 200
    assert header(headers, b"content-type") == INDEX_TYPE
    assert header(headers, b"oci-filters-applied") is None
    assert json.loads(body)["manifests"] == [
        descriptor(signature, SIGNATURE),
        descriptor(sbom, SBOM),
    ]

    status, headers, body = await get(f"{url}?artifactType={SBOM}")
    assert status == 200
    assert header(headers, b"oci-filters-applied") == "artifactType"
    assert json.loads(body)["manifests"] == [descriptor(sbom, SBOM)]

    # Each referrer is then pulled by digest, as a client does.
    status, _, body = await get(f"{blobserve.url}/v2/{name}/manifests/{sbom[0]}")
    assert (status, body) == (200, sbom[1])

    # Within the TTL the answer is kept: the upstream is not asked again.
    before = len(relay.requests)
    status, _, _ = await get(url, "HEAD")
    assert status == 200
    assert len(relay.requests) == before


@pytest_twisted.ensureDeferred
async def test_referrers_of_a_manifest_nothing_refers_to_are_an_empty_index(
    registry: RegistryProcess, blobserve: BlobserveProcess
) -> None:
    subject = image(registry, "listing/alone", "v1")
    status, headers, body = await get(
        f"{blobserve.url}/v2/listing/alone/referrers/{subject[0]}"
    )
    assert status == 200
    assert header(headers, b"content-type") == INDEX_TYPE
    assert json.loads(body) == {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [],
    }


class ModernRegistry(Resource):
    """
    An upstream with what distribution 2.8 lacks: a referrers API, that
    answers every query with C{answer}, filtered by C{artifactType} when
    asked; and tags lists of C{tags} in pages of C{n}, with a C{Link} to the
    next. It records the queries.
    """

    isLeaf = True

    def __init__(self, answer: list[dict[str, Any]], tags: list[str]) -> None:
        super().__init__()
        self.answer = answer
        self.tags = tags
        self.queries: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.path.endswith(b"/tags/list"):
            self.queries.append(request.uri)
            return self._tags(request)
        if b"/referrers/" not in request.path:
            return b"{}"
        self.queries.append(request.uri)
        manifests = self.answer
        kinds = (request.args or {}).get(b"artifactType")
        if kinds:
            kind = kinds[0].decode()
            manifests = [m for m in manifests if m["artifactType"] == kind]
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
        request.setHeader(b"Content-Type", INDEX_TYPE.encode())
        body = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}
        return json.dumps(body).encode()

    def _tags(self, request: Request) -> bytes:
        args = request.args or {}
        n = int(args.get(b"n", [b"100"])[0])
        last = args.get(b"last", [b""])[0].decode()
        after = [tag for tag in self.tags if tag > last]
        page = after[:n]
        if len(after) > n:
            link = f'</v2/lib/x/tags/list?last={page[-1]}&n={n}>; rel="next"'
            request.setHeader(b"Link", link.encode())
        return json.dumps({"name": "lib/x", "tags": page}).encode()


@pytest_twisted.async_yield_fixture
async def modern(
    tmp_path: Path,
) -> AsyncIterator[tuple[ModernRegistry, BlobserveProcess]]:
    signature = (Digest.of(b"signature"), b"signature")
    sbom = (Digest.of(b"sbom"), b"sbom")
    upstream = ModernRegistry(
        [descriptor(signature, SIGNATURE), descriptor(sbom, SBOM)],
        ["a1", "a2", "b1", "b2", "c1"],
    )
    port, number = listen(reactor, upstream)
    process = BlobserveProcess(
        tmp_path, f"http://127.0.0.1:{number}", tmp_path / "storage"
    )
    await process.start()
    yield upstream, process
    process.stop()
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


@pytest_twisted.ensureDeferred
async def test_referrers_api_of_the_upstream_is_passed_through(
    modern: tuple[ModernRegistry, BlobserveProcess],
) -> None:
    upstream, server = modern
    subject = Digest.of(b"subject")
    url = f"{server.url}/v2/lib/x/referrers/{subject}"
    status, headers, body = await get(f"{url}?artifactType={SIGNATURE}")
    assert status == 200
    assert header(headers, b"content-type") == INDEX_TYPE
    assert header(headers, b"oci-filters-applied") == "artifactType"
    assert json.loads(body)["manifests"] == upstream.answer[:1]
    assert upstream.queries == [
        f"/v2/lib/x/referrers/{subject}?artifactType="
        "application%2Fvnd.example.signature".encode()
    ]
    status, _, body = await get(url)
    assert (status, json.loads(body)["manifests"]) == (200, upstream.answer)
    # Both kept for the TTL.
    await get(url)
    await get(f"{url}?artifactType={SIGNATURE}")
    assert len(upstream.queries) == 2


@pytest_twisted.ensureDeferred
async def test_tags_list_pages_follow_the_rewritten_link_through_blobserve(
    modern: tuple[ModernRegistry, BlobserveProcess],
) -> None:
    upstream, server = modern
    seen: list[str] = []
    url: str | None = f"{server.url}/v2/lib/x/tags/list?n=2"
    pages = 0
    while url is not None and pages < 10:
        status, headers, body = await get(url)
        assert status == 200
        seen += json.loads(body)["tags"]
        pages += 1
        link = header(headers, b"link")
        if link is None:
            url = None
        else:
            # Relative, to blobserve's own path.
            assert link.startswith("</v2/lib/x/tags/list?")
            url = server.url + link[1 : link.index(">")]
    assert (seen, pages) == (upstream.tags, 3)
    assert upstream.queries == [
        b"/v2/lib/x/tags/list?n=2",
        b"/v2/lib/x/tags/list?n=2&last=a2",
        b"/v2/lib/x/tags/list?n=2&last=b2",
    ]
    # The first page again, within the TTL: kept, the upstream not asked.
    status, _, body = await get(f"{server.url}/v2/lib/x/tags/list?n=2")
    assert (status, json.loads(body)["tags"]) == (200, upstream.tags[:2])
    assert len(upstream.queries) == 3


@pytest_twisted.ensureDeferred
async def test_next_link_keeps_the_registry_a_mirror_request_names(
    modern: tuple[ModernRegistry, BlobserveProcess],
) -> None:
    _, server = modern
    # The upstream is blobserve's default registry, named here as containerd
    # names the registry it mirrors.
    registry = urlsplit(server.upstream).netloc
    status, headers, _ = await get(
        f"{server.url}/v2/lib/x/tags/list?{urlencode({'n': 2, 'ns': registry})}"
    )
    assert status == 200
    link = header(headers, b"link") or ""
    target = urlsplit(link[1 : link.index(">")])
    assert target.path == "/v2/lib/x/tags/list"
    assert parse_qs(target.query) == {"n": ["2"], "last": ["a2"], "ns": [registry]}
    status, _, body = await get(server.url + link[1 : link.index(">")])
    assert (status, json.loads(body)["tags"]) == (200, ["b1", "b2"])
