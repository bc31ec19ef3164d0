"""
Authenticating to an upstream registry: challenges, credentials and the
bearer tokens of the distribution token protocol.
"""

from __future__ import annotations

import base64
import json
import re

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime

_PARAMETER = re.compile(r'([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')

#: Seconds a token lives when the token server does not say (the spec's default).
DEFAULT_TOKEN_LIFETIME = 60


class AuthenticationFailed(Exception):
    """
    The upstream or its token server refused the credentials, or gave no
    usable token.
    """


@frozen
class Credentials:
    """
    A user name and password for an upstream. The password never appears in
    a repr, a log or an error message.
    """

    username: str
    password: str = field(repr=False)

    def basic(self) -> bytes:
        """
        The value of a C{Authorization} header for HTTP Basic authentication.
        """
        pair = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(pair)


@frozen
class Challenge:
    """
    One C{WWW-Authenticate} challenge: its scheme (lowercase) and parameters.
    """

    scheme: str
    parameters: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """
    Parse a C{WWW-Authenticate} header such as C{Bearer realm="…",service="…"}.

    @return: the challenge, or L{None} if the header has no scheme.
    """
    scheme, _, rest = header.strip().partition(" ")
    if not scheme or "=" in scheme:
        return None
    parameters = {}
    for match in _PARAMETER.finditer(rest):
        key, quoted, token = match.groups()
        value = token if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
        parameters[key.lower()] = value
    return Challenge(scheme.lower(), parameters)


@frozen
class Token:
    """
    A bearer token and when it stops being good.
    """

    value: str = field(repr=False)
    expires_at: float


def parse_token_response(body: bytes, now: float) -> Token:
    """
    Read a token server's JSON answer.

    @raise AuthenticationFailed: if it holds no token.
    """
    try:
        answer = json.loads(body)
        value = answer.get("token") or answer.get("access_token")
        lifetime = float(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (ValueError, AttributeError, TypeError):
        raise AuthenticationFailed("the token server's answer is not JSON") from None
    if not isinstance(value, str) or not value:
        raise AuthenticationFailed("the token server's answer holds no token")
    # Renew a little early, so a token does not expire on its way upstream.
    return Token(value, now + max(lifetime - 5, 1))


class TokenCache:
    """
    Bearer tokens by scope, kept until they expire.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._tokens: dict[str, Token] = {}

    def get(self, scope: str) -> Token | None:
        """
        The token for C{scope}, if one is cached and still good.
        """
        token = self._tokens.get(scope)
        if token is not None and token.expires_at <= self._clock.seconds():
            del self._tokens[scope]
            return None
        return token

    def put(self, scope: str, token: Token) -> None:
        self._tokens[scope] = token
