"""
What the authentication tests put around the upstream registry: an htpasswd
file, a token server that signs JWTs with a certificate the registry trusts,
a registry front that redirects blob downloads to separate "object storage",
one that serves the registry and its token server on one port, and a small
upstream that refuses in ways a real registry does not on its own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import bcrypt
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

USER = "alice"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
PASSWORD = "correct horse battery staple"
SERVICE = "blobserve-test-registry"
ISSUER = "blobserve-test-issuer"


def write_htpasswd(path: Path) -> None:
    """
    An htpasswd file (bcrypt, the only kind the registry reads) for L{USER}.
    """
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
    path.write_bytes(USER.encode() + b":" + hashed + b"\n")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(Resource):
    """
    The distribution token protocol's server: for L{USER}'s credentials it
    grants the scopes asked for, as a JWT signed with an RSA key whose
    self-signed certificate (in the C{x5c} header) the registry trusts.
    """

    isLeaf = True

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / "token-root.pem"
        self.bundle.write_bytes(
            self.certificate.public_bytes(serialization.Encoding.PEM)
        )
        self.requests: list[dict[str, list[str]]] = []
        #: The C{Authorization} header of each request, in the same order.
        self.authorizations: list[bytes | None] = []
        #: Every token it has given.
        self.issued: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        query = parse_qs(request.uri.partition(b"?")[2].decode())
        self.requests.append(query)
        self.authorizations.append(request.getHeader(b"authorization"))
        expected = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
        if request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            return b'{"details": "bad credentials"}'
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self._sign(access)
        self.issued.append(token)
        return json.dumps({"token": token, "expires_in": 300}).encode()

    def _sign(self, access: list[dict[str, Any]]) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": USER,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}."
            f"{_b64url(json.dumps(claims).encode())}"
        )
        signature = self.key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"


class StorageServer(Resource):
    """
    Object storage on a host of its own: serves blobs by hex from a
    directory, and records the C{Authorization} headers it is sent.
    """

    isLeaf = True

    def __init__(self, blobs: Path) -> None:
        super().__init__()
        self.blobs = blobs
        self.authorizations: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        hex_digest = request.path.rsplit(b"/", 1)[-1].decode()
        path = self.blobs / hex_digest
        if not path.is_file():
            request.setResponseCode(404)
            return b""
        return path.read_bytes()


class RedirectingFront(Resource):
    """
    A registry front that passes every request to the registry, except blob
    downloads it has seen credentials for, which it redirects (307) to the
    storage server, as registries backed by object storage do.
    """

    isLeaf = True

    def __init__(self, registry_port: int, storage_port: int) -> None:
        super().__init__()
        self.registry = f"http://127.0.0.1:{registry_port}"
        self.storage = f"http://127.0.0.1:{storage_port}"
        self.redirects = 0

    def render(self, request: Request) -> int | bytes:
        authorized = request.getHeader(b"authorization") is not None
        if (
            request.method == b"GET"
            and b"/blobs/sha256:" in request.path
            and authorized
        ):
            self.redirects += 1
            hex_digest = request.path.rsplit(b":", 1)[-1].decode()
            request.setResponseCode(307)
            request.setHeader(
                b"Location", f"{self.storage}/data/{hex_digest}?sig=x".encode()
            )
            return b""
        Deferred.fromCoroutine(_forward(request, self.registry))
        return NOT_DONE_YET


class SameOriginFront(Resource):
    """
    The registry and its token server behind one port, as a reverse proxy
    serves them: C{/token} is the token server's, everything else goes to the
    registry (set L{registry} once it runs).
    """

    isLeaf = True

    def __init__(self, tokens: TokenServer) -> None:
        super().__init__()
        self.tokens = tokens
        self.registry = ""
        #: Where it listens, once it does.
        self.url = ""

    def render(self, request: Request) -> int | bytes:
        if request.path == b"/token":
            return self.tokens.render(request)  # type: ignore[no-any-return]
        Deferred.fromCoroutine(_forward(request, self.registry))
        return NOT_DONE_YET


async def _forward(request: Request, registry: str) -> None:
    """
    Pass C{request} on to C{registry} and its answer back.
    """
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() != b"host":
            headers.setRawHeaders(name, values)
    response = await treq.request(
        request.method.decode(),
        registry + request.uri.decode(),
        headers=headers,
        allow_redirects=False,
    )
    body = await response.content()
    request.setResponseCode(response.code)
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() not in (b"content-length", b"content-encoding"):
            request.responseHeaders.setRawHeaders(name, values)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


#: The manifest the refusing upstream serves while it does not refuse.
REFUSING_MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}
).encode()
REFUSING_REALM = "refusing-upstream-realm"
_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


class RefusingRegistry(Resource):
    """
    A small upstream that answers as a real registry will not on its own.
    Repository C{refused/<status>} answers C{<status>} to everything: a 401
    with a Basic challenge of its own, also to credentials; a 429 with
    C{Retry-After: 120}. Repository C{gone} answers 404 C{NAME_UNKNOWN}.
    Repository C{flaky} has tag C{v1} until L{limited} is set, then answers
    429 to everything.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.limited = False

    def render(self, request: Request) -> bytes:
        path = request.path.decode("latin-1")
        if path in ("/v2", "/v2/"):
            return self._send(request, b"{}", "application/json")
        refused = re.fullmatch(r"/v2/refused/([0-9]{3})/.*", path)
        if refused:
            return self._error(request, int(refused[1]))
        if path.startswith("/v2/gone/"):
            return self._error(request, 404, "NAME_UNKNOWN")
        if path.startswith("/v2/flaky/") and self.limited:
            return self._error(request, 429)
        if path == "/v2/flaky/manifests/v1":
            digest = "sha256:" + hashlib.sha256(REFUSING_MANIFEST).hexdigest()
            request.setHeader(b"Docker-Content-Digest", digest.encode())
            return self._send(request, REFUSING_MANIFEST, MANIFEST_TYPE)
        return self._error(request, 404, "MANIFEST_UNKNOWN")

    def _error(self, request: Request, status: int, code: str = "") -> bytes:
        request.setResponseCode(status)
        if status == 401:
            request.setHeader(
                b"WWW-Authenticate", f'Basic realm="{REFUSING_REALM}"'.encode()
            )
        if status == 429:
            request.setHeader(b"Retry-After", b"120")
        body = {"errors": [{"code": code or _CODES.get(status, "UNKNOWN")}]}
        return self._send(request, json.dumps(body).encode(), "application/json")

    def _send(self, request: Request, body: bytes, media_type: str) -> bytes:
        request.setHeader(b"Content-Type", media_type.encode())
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def listen(reactor: Any, resource: Resource) -> tuple[IListeningPort, int]:
    """
    Serve C{resource} on a free loopback port.
    """
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return port, int(port.getHost().port)
