"""
Authentication challenges and token answers.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from blobserve.upstream.auth import (
    AuthenticationFailed,
    Challenge,
    Credentials,
    Token,
    TokenCache,
    parse_challenge,
    parse_token_response,
)


def test_docker_hub_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert parse_challenge(header) == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/busybox:pull,push",
        },
    )


def test_basic_challenge_with_unquoted_and_escaped_values() -> None:
    challenge = parse_challenge('Basic realm="a \\"quoted\\" realm", charset=UTF-8')
    assert challenge == Challenge(
        "basic", {"realm": 'a "quoted" realm', "charset": "UTF-8"}
    )


@given(st.text(max_size=200))
def test_any_header_parses_or_is_refused(header: str) -> None:
    challenge = parse_challenge(header)
    if challenge is not None:
        assert challenge.scheme == challenge.scheme.lower()


def test_token_answers() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 300}', 1000) == Token(
        "t", 1295
    )
    assert parse_token_response(b'{"access_token": "t"}', 0).value == "t"


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'{"token": 5}', b"nonsense"])
def test_token_answers_without_a_token(body: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        parse_token_response(body, 0)


def test_token_cache_forgets_expired_tokens() -> None:
    clock = Clock()
    cache = TokenCache(clock)
    cache.put("repository:a:pull", Token("t", 10))
    assert cache.get("repository:a:pull") == Token("t", 10)
    assert cache.get("repository:b:pull") is None
    clock.advance(10)
    assert cache.get("repository:a:pull") is None


def test_secrets_stay_out_of_reprs() -> None:
    assert "s3cret" not in repr(Credentials("alice", "s3cret"))
    assert "s3cret" not in repr(Token("s3cret", 0))
