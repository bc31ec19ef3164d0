"""
Pulling through blobserve from upstreams that ask for credentials (htpasswd
Basic, and bearer tokens from a token server), and from one that redirects
blob downloads to object storage on another host; credentials going only
where they belong; and upstream refusals told to clients as what they are.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import bcrypt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from authservers import (
    ISSUER,
    PASSWORD,
    REFUSING_MANIFEST,
    REFUSING_REALM,
    SERVICE,
    USER,
    RedirectingFront,
    RefusingRegistry,
    SameOriginFront,
    StorageServer,
    TokenServer,
    listen,
    write_htpasswd,
)
from images import Image, layout_digests, layout_top_digest, pull_image, push_image
from processes import DEADLINE, BlobserveProcess, RegistryProcess

CREDENTIALS = f"{USER}:{PASSWORD}"
BASIC = b"Basic " + base64.b64encode(CREDENTIALS.encode())


@pytest.fixture(scope="session")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryProcess]:
    directory = tmp_path_factory.mktemp("basic-registry")
    write_htpasswd(directory / "htpasswd")
    registry = RegistryProcess(
        directory,
        auth=(
            "auth:\n  htpasswd:\n    realm: blobserve-test\n"
            f"    path: {directory / 'htpasswd'}\n"
        ),
    )
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> TokenServer:
    return TokenServer(tmp_path_factory.mktemp("token-server"))


@pytest.fixture(scope="session")
def token_front(token_server: TokenServer) -> Iterator[SameOriginFront]:
    """
    The token registry and its token server on one loopback port: a plain
    http upstream whose token realm is on its own host and port.
    """
    front = SameOriginFront(token_server)
    port, number = listen(reactor, front)
    front.url = f"http://127.0.0.1:{number}"
    yield front
    port.stopListening()


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
    token_server: TokenServer,
    token_front: SameOriginFront,
) -> Iterator[RegistryProcess]:
    """
    A registry whose token realm is on the front's port: reached at its own
    port, its realm is on another port.
    """
    registry = RegistryProcess(
        tmp_path_factory.mktemp("token-registry"),
        auth=(
            "auth:\n  token:\n"
            f"    realm: {token_front.url}/token\n"
            f"    service: {SERVICE}\n"
            f"    issuer: {ISSUER}\n"
            f"    rootcertbundle: {token_server.bundle}\n"
        ),
    )
    token_front.registry = registry.url
    yield registry
    registry.stop()


@pytest.fixture(autouse=True)
def no_secret_is_logged(tmp_path: Path, token_server: TokenServer) -> Iterator[None]:
    """
    After each test, check that no log blobserve wrote in it holds the
    password, the credentials as Basic sends them, a token the token server
    gave, or an C{Authorization} header.
    """
    yield
    secrets = [PASSWORD, BASIC.decode(), BASIC.removeprefix(b"Basic ").decode()]
    secrets += token_server.issued
    logs = list(tmp_path.rglob("blobserve.log"))
    for log in logs:
        text = log.read_text()
        assert not [secret for secret in secrets if secret in text], log
        assert "authorization: " not in text.lower(), log


def password_file(directory: Path) -> Path:
    path = directory / "upstream-password"
    path.write_text(PASSWORD + "\n")
    return path


async def pull_through(
    tmp_path: Path,
    upstream: str,
    repository: str,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> tuple[BlobserveProcess, Path]:
    """
    Start blobserve in front of C{upstream} with the given extra flags and
    environment, and pull C{repository:v1} through it into a fresh layout.
    """
    server = BlobserveProcess(
        tmp_path,
        upstream,
        tmp_path / "storage",
        extra=tuple(extra),
        env=env,
    )
    await server.start()
    try:
        out = tmp_path / "pulled"
        await pull_image(f"127.0.0.1:{server.port}/{repository}:v1", out)
    finally:
        server.stop()
    return server, out


@pytest_twisted.ensureDeferred
async def test_pulls_through_an_htpasswd_upstream(
    tmp_path: Path, basic_registry: RegistryProcess
) -> None:
    image = await push_image(
        tmp_path,
        f"127.0.0.1:{basic_registry.port}",
        "auth/basic",
        "v1",
        credentials=CREDENTIALS,
    )
    server, out = await pull_through(
        tmp_path,
        basic_registry.url,
        "auth/basic",
        extra=[
            f"--upstream-username={USER}",
            f"--upstream-password-file={password_file(tmp_path)}",
        ],
    )
    assert layout_top_digest(out) == image.manifest_digest
    assert layout_digests(out) == image.blob_digests | {image.manifest_digest}
    assert PASSWORD not in server.log.read_text()


@pytest_twisted.ensureDeferred
async def test_pulls_through_a_token_upstream(
    tmp_path: Path,
    token_registry: RegistryProcess,
    token_front: SameOriginFront,
    token_server: TokenServer,
) -> None:
    image = await push_image(
        tmp_path,
        f"127.0.0.1:{token_registry.port}",
        "auth/token",
        "v1",
        credentials=CREDENTIALS,
    )
    asked = len(token_server.requests)
    server, out = await pull_through(
        tmp_path,
        token_front.url,
        "auth/token",
        extra=[f"--upstream-username={USER}"],
        env={"BLOBSERVE_UPSTREAM_PASSWORD": PASSWORD},
    )
    assert layout_top_digest(out) == image.manifest_digest
    assert layout_digests(out) == image.blob_digests | {image.manifest_digest}
    scopes = [r.get("scope") for r in token_server.requests[asked:]]
    assert ["repository:auth/token:pull"] in scopes
    # One token for the repository, reused for the manifest and every blob;
    # asked for with the credentials, the realm being the upstream's origin.
    assert len(scopes) == 1
    assert token_server.authorizations[asked:] == [BASIC]
    log = server.log.read_text()
    assert PASSWORD not in log
    assert "eyJ" not in log  # no JWT


async def ask(method: str, url: str) -> tuple[int, Headers, bytes]:
    """
    The status, headers and body of a request to blobserve, on a connection
    of its own.
    """
    response = await treq.request(method, url, timeout=DEADLINE, persistent=False)
    return response.code, response.headers, await response.content()


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["errors"][0]["code"]
    return code


@pytest_twisted.ensureDeferred
async def test_token_upstream_without_credentials_is_a_clear_401(
    tmp_path: Path, token_front: SameOriginFront, token_registry: RegistryProcess
) -> None:
    server = BlobserveProcess(tmp_path, token_front.url, tmp_path / "storage")
    await server.start()
    try:
        status, headers, body = await ask(
            "GET", f"{server.url}/v2/auth/none/manifests/v1"
        )
    finally:
        server.stop()
    assert (status, error_code(body)) == (401, "UNAUTHORIZED")
    assert not headers.hasHeader(b"www-authenticate")
    message = json.loads(body)["errors"][0]["message"]
    assert "token server" in message
    assert "401" in message


@pytest_twisted.ensureDeferred
async def test_credentials_never_go_over_http_to_a_token_realm_on_another_port(
    tmp_path: Path, token_registry: RegistryProcess, token_server: TokenServer
) -> None:
    # Reached at its own port, the registry's realm is on the front's port.
    asked = len(token_server.requests)
    server = BlobserveProcess(
        tmp_path,
        token_registry.url,
        tmp_path / "storage",
        extra=(f"--upstream-username={USER}",),
        env={"BLOBSERVE_UPSTREAM_PASSWORD": PASSWORD},
    )
    await server.start()
    try:
        for _ in range(2):
            status, _, body = await ask(
                "GET", f"{server.url}/v2/auth/elsewhere/manifests/v1"
            )
            assert (status, error_code(body)) == (401, "UNAUTHORIZED")
    finally:
        server.stop()
    # Asked anonymously, and refused by this token server.
    authorizations = token_server.authorizations[asked:]
    assert len(authorizations) == 2
    assert authorizations == [None, None]
    log = server.log.read_text()
    assert log.count("not sending the upstream credentials") == 1
    assert PASSWORD not in log


@pytest_twisted.ensureDeferred
async def test_upstream_refusals_keep_their_meaning(tmp_path: Path) -> None:
    upstream = RefusingRegistry()
    port, number = listen(reactor, upstream)
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{number}",
        tmp_path / "storage",
        extra=(f"--upstream-username={USER}", "--tag-ttl=0.05"),
        env={"BLOBSERVE_UPSTREAM_PASSWORD": PASSWORD},
    )
    await server.start()
    blob = "sha256:" + "0" * 64
    try:
        answers = {}
        for repository in [
            "refused/401",
            "refused/403",
            "refused/429",
            "refused/500",
            "gone",
        ]:
            for method in ("GET", "HEAD"):
                for path in ("manifests/v1", f"blobs/{blob}"):
                    url = f"{server.url}/v2/{repository}/{path}"
                    answers[repository, method, path] = await ask(method, url)

        # Known, then past its TTL while the upstream rate-limits: the tag is
        # served from the cache.
        tag = f"{server.url}/v2/flaky/manifests/v1"
        assert (await ask("GET", tag))[::2] == (200, REFUSING_MANIFEST)
        upstream.limited = True
        await deferLater(reactor, 0.1, lambda: None)
        stale = await ask("GET", tag)
    finally:
        server.stop()
        await maybeDeferred(port.stopListening)

    expected = {
        "refused/401": (401, "UNAUTHORIZED"),
        "refused/403": (403, "DENIED"),
        "refused/429": (429, "TOOMANYREQUESTS"),
        "refused/500": (502, "UNKNOWN"),
        "gone": (404, "NAME_UNKNOWN"),
    }
    for (repository, method, path), (status, headers, body) in answers.items():
        want_status, want_code = expected[repository]
        if repository == "gone" and method == "HEAD":
            # A HEAD has no body to tell an unknown repository by.
            want_code = "MANIFEST_UNKNOWN" if "manifests" in path else "BLOB_UNKNOWN"
        where = (repository, method, path)
        assert status == want_status, where
        if method == "GET":
            assert error_code(body) == want_code, where
        else:
            assert body == b"", where
        assert not headers.hasHeader(b"www-authenticate"), where
        for values in headers.getAllRawHeaders():
            assert REFUSING_REALM.encode() not in b"".join(values[1]), where
        retry_after = headers.getRawHeaders(b"retry-after")
        assert retry_after == ([b"120"] if status == 429 else None), where
    assert stale[::2] == (200, REFUSING_MANIFEST)
    log = server.log.read_text()
    assert "serving flaky:v1" in log
    assert "Unhandled" not in log
    assert PASSWORD not in log


@pytest_twisted.ensureDeferred
async def test_redirect_to_storage_carries_no_registry_credentials(
    tmp_path: Path, basic_registry: RegistryProcess
) -> None:
    image = await push_image(
        tmp_path,
        f"127.0.0.1:{basic_registry.port}",
        "auth/redirected",
        "v1",
        credentials=CREDENTIALS,
    )
    storage = StorageServer(image.layout / "blobs" / "sha256")
    storage_port, storage_number = listen(reactor, storage)
    front = RedirectingFront(basic_registry.port, storage_number)
    front_port, front_number = listen(reactor, front)
    try:
        _, out = await pull_through(
            tmp_path,
            f"http://127.0.0.1:{front_number}",
            "auth/redirected",
            extra=[
                f"--upstream-username={USER}",
                f"--upstream-password-file={password_file(tmp_path)}",
            ],
        )
    finally:
        storage_port.stopListening()
        front_port.stopListening()
    assert layout_digests(out) == image.blob_digests | {image.manifest_digest}
    assert front.redirects == len(image.blob_digests)
    assert len(storage.authorizations) == len(image.blob_digests)
    assert storage.authorizations == [None] * len(image.blob_digests)


OTHER_USER = "bob"
OTHER_PASSWORD = "another Secret for the second registry"


@pytest.fixture
def other_basic_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    """
    A second htpasswd registry, whose only user is not L{USER}.
    """
    directory = tmp_path / "other-registry"
    directory.mkdir()
    hashed = bcrypt.hashpw(OTHER_PASSWORD.encode(), bcrypt.gensalt(rounds=4))
    (directory / "htpasswd").write_bytes(OTHER_USER.encode() + b":" + hashed + b"\n")
    registry = RegistryProcess(
        directory,
        auth=(
            "auth:\n  htpasswd:\n    realm: blobserve-other\n"
            f"    path: {directory / 'htpasswd'}\n"
        ),
    )
    yield registry
    registry.stop()


async def pull_each(
    server: BlobserveProcess, images: list[tuple[Image, str]]
) -> dict[str, set[bytes]]:
    """
    Pull each image's manifest and blobs through C{server}, naming its
    registry with C{?ns=}; the digests of what came, by registry.
    """
    pulled = {}
    for image, ns in images:
        name = image.reference.partition(":")[0]
        response = await treq.get(
            f"{server.url}/v2/{name}/manifests/v1?ns={ns}",
            headers=Headers(
                {b"Accept": [b"application/vnd.oci.image.manifest.v1+json"]}
            ),
            timeout=DEADLINE,
            persistent=False,
        )
        await response.content()
        digests = {response.headers.getRawHeaders(b"Docker-Content-Digest")[0]}
        for digest in sorted(image.blob_digests):
            url = f"{server.url}/v2/{name}/blobs/{digest}?ns={ns}"
            response = await treq.get(url, timeout=DEADLINE, persistent=False)
            body = await response.content()
            assert response.code == 200, (ns, digest)
            digests.add(b"sha256:" + hashlib.sha256(body).hexdigest().encode())
        pulled[ns] = digests
    return pulled


def digests_of(image: Image) -> set[bytes]:
    return {d.encode() for d in image.blob_digests | {image.manifest_digest}}


@pytest.mark.parametrize("given_in", ["flags", "config file"])
@pytest_twisted.ensureDeferred
async def test_each_upstream_gets_its_own_credentials(
    tmp_path: Path,
    basic_registry: RegistryProcess,
    other_basic_registry: RegistryProcess,
    given_in: str,
) -> None:
    other_pair = f"{OTHER_USER}:{OTHER_PASSWORD}"
    first = await push_image(
        tmp_path,
        f"127.0.0.1:{basic_registry.port}",
        "auth/first",
        "v1",
        credentials=CREDENTIALS,
    )
    second = await push_image(
        tmp_path,
        f"127.0.0.1:{other_basic_registry.port}",
        "auth/second",
        "v1",
        credentials=other_pair,
    )
    line = tmp_path / "first-credentials"
    line.write_text(CREDENTIALS + "\n")
    other = f"127.0.0.1:{other_basic_registry.port}"
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    f"http://{other}": {
                        "auth": base64.b64encode(other_pair.encode()).decode()
                    },
                    "elsewhere.test": {"auth": BASIC.decode()[6:]},
                }
            }
        )
    )
    flags = [
        "--listen=tcp:0:interface=127.0.0.1",
        f"--storage={tmp_path / 'storage'}",
        f"--upstream=first={basic_registry.url}",
        f"--upstream={other_basic_registry.url}",
        f"--upstream-credentials=first={line}",
        f"--upstream-credentials={other}={config}",
    ]
    if given_in == "config file":
        settings = tmp_path / "blobserve.toml"
        settings.write_text(
            'listen = ["tcp:0:interface=127.0.0.1"]\n'
            f'storage = "{tmp_path / "storage"}"\n'
            f'[upstreams."first"]\nurl = "{basic_registry.url}"\n'
            f'credentials_file = "{line}"\n'
            f'[upstreams."{other}"]\nurl = "{other_basic_registry.url}"\n'
            f'credentials_file = "{config}"\n'
        )
        flags = [f"--config={settings}"]
    server = BlobserveProcess(tmp_path, "", tmp_path / "storage", flags=flags)
    await server.start()
    try:
        pulled = await pull_each(server, [(first, "first"), (second, other)])
    finally:
        server.stop()
    assert pulled == {"first": digests_of(first), other: digests_of(second)}
    log = server.log.read_text()
    assert f"first={basic_registry.url} with credentials" in log
    assert f"{other}={other_basic_registry.url} with credentials" in log
    assert OTHER_PASSWORD not in log


@pytest_twisted.ensureDeferred
async def test_a_config_file_gives_a_token_and_a_basic_upstream_their_credentials(
    tmp_path: Path,
    token_registry: RegistryProcess,
    token_front: SameOriginFront,
    token_server: TokenServer,
    other_basic_registry: RegistryProcess,
) -> None:
    other_pair = f"{OTHER_USER}:{OTHER_PASSWORD}"
    tokened = await push_image(
        tmp_path,
        f"127.0.0.1:{token_registry.port}",
        "auth/tokened",
        "v1",
        credentials=CREDENTIALS,
    )
    basic = await push_image(
        tmp_path,
        f"127.0.0.1:{other_basic_registry.port}",
        "auth/basic",
        "v1",
        credentials=other_pair,
    )
    token_file = tmp_path / "token.cred"
    token_file.write_text(CREDENTIALS + "\n")
    basic_file = tmp_path / "basic.cred"
    basic_file.write_text(other_pair + "\n")
    settings = tmp_path / "blobserve.toml"
    settings.write_text(
        'listen = ["tcp:0:interface=127.0.0.1"]\n'
        f'storage = "{tmp_path / "storage"}"\n'
        f'[upstreams."tokened"]\nurl = "{token_front.url}"\n'
        f'credentials_file = "{token_file}"\n'
        f'[upstreams."basic"]\nurl = "{other_basic_registry.url}"\n'
        f'credentials_file = "{basic_file}"\n'
    )
    server = BlobserveProcess(
        tmp_path, "", tmp_path / "storage", flags=[f"--config={settings}"]
    )
    asked = len(token_server.requests)
    await server.start()
    try:
        pulled = await pull_each(server, [(tokened, "tokened"), (basic, "basic")])
    finally:
        server.stop()
    assert pulled == {"tokened": digests_of(tokened), "basic": digests_of(basic)}
    # The token server saw the token upstream's own credentials, once.
    assert token_server.authorizations[asked:] == [BASIC]
    log = server.log.read_text()
    assert "tokened=" in log and "basic=" in log
    assert OTHER_PASSWORD not in log and PASSWORD not in log
