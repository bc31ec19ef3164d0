"""
Client authentication: htpasswd files, the bcrypt checks kept off the
reactor's thread and remembered, failed attempts limited per address, and
the gate in front of the site's routes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.web.clientauth import (
    CHALLENGE,
    CHECKS_PER_ADDRESS,
    ClientAuthenticator,
    ClientAuthGate,
    FailedAttempts,
    UnusableHtpasswd,
    htpasswd_reloader,
    parse_htpasswd,
    read_htpasswd,
)
from blobserve.web.resource import OCIError
from blobserve.web.root import OPEN_PATHS, site_root

from fakes import LoggedEvents


def entry(user: str, password: str) -> str:
    """
    An htpasswd line as C{htpasswd -B} writes it (C{$2y$}), at bcrypt's
    lowest cost.
    """
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:$2y${hashed[4:]}"


HTPASSWD = entry("alice", "right") + "\n# a comment\n\n" + entry("bob", "other") + "\n"
USERS = parse_htpasswd(HTPASSWD)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Runner:
    """
    Runs blocking calls when the test says so, counting them.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]]
        self.pending = []
        self.calls = 0

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls += 1
        d: Deferred[Any] = Deferred()
        self.pending.append((f, args, d))
        return d

    def run(self) -> None:
        pending, self.pending = self.pending, []
        for f, args, d in pending:
            d.callback(f(*args))


def settled(verdict: OCIError | Deferred[OCIError | None] | None) -> OCIError | None:
    """
    The verdict, fired.
    """
    if not isinstance(verdict, Deferred):
        return verdict
    results: list[OCIError | None] = []
    verdict.addCallback(results.append)
    assert results, "the verdict has not fired"
    return results[0]


def authenticator(
    clock: Clock | None = None, runner: Runner | None = None, **kwargs: Any
) -> tuple[ClientAuthenticator, Clock, Runner]:
    clock = clock or Clock()
    runner = runner or Runner()
    return ClientAuthenticator(USERS, clock, runner, **kwargs), clock, runner


def test_htpasswd_dash_b_entries_are_read() -> None:
    assert sorted(USERS) == ["alice", "bob"]
    assert all(hashed.startswith(b"$2y$04$") for hashed in USERS.values())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "alice:$apr1$abcdefgh$SECRETHASHSECRETHASHSE\n",
        "alice:{SHA}SECRETHASHSECRETHASHSECRETHA=\n",
        "alice:SECRETHASH\n",
        "no colon SECRETHASH\n",
        entry("alice", "x") + "\n" + entry("alice", "y") + "\n",
    ],
)
def test_unusable_htpasswd_files_say_why_without_hashes(text: str) -> None:
    with pytest.raises(UnusableHtpasswd) as raised:
        parse_htpasswd(text)
    assert "SECRETHASH" not in str(raised.value)
    assert "$2" not in str(raised.value)


def test_an_unreadable_htpasswd_says_why(tmp_path: Path) -> None:
    with pytest.raises(UnusableHtpasswd, match="cannot be read"):
        read_htpasswd(str(tmp_path / "missing"))


def test_no_credentials_is_challenged_and_not_counted_as_a_failure() -> None:
    auth, _, runner = authenticator(attempts=None)
    for _ in range(20):
        error = settled(auth.admit("10.0.0.1", None))
        assert error is not None
        assert (error.status, error.code) == (401, "UNAUTHORIZED")
        assert error.headers == {b"WWW-Authenticate": CHALLENGE}
    assert runner.calls == 0


def test_good_credentials_are_checked_in_the_runner_then_remembered() -> None:
    auth, clock, runner = authenticator(remember=300)
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    assert isinstance(verdict, Deferred)
    assert not verdict.called
    runner.run()
    assert settled(verdict) is None
    clock.advance(299)
    assert auth.admit("10.0.0.1", basic("alice", "right")) is None
    assert runner.calls == 1
    clock.advance(2)
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    assert isinstance(verdict, Deferred)
    runner.run()
    assert settled(verdict) is None
    assert runner.calls == 2


def test_concurrent_checks_of_the_same_credentials_share_one_bcrypt_run() -> None:
    auth, _, runner = authenticator()
    verdicts = [auth.admit("10.0.0.1", basic("alice", "right")) for _ in range(5)]
    assert runner.calls == 1
    runner.run()
    assert [settled(v) for v in verdicts] == [None] * 5


@pytest.mark.parametrize(
    "header",
    [
        basic("alice", "wrong"),
        basic("bob", "right"),
        basic("nobody", "right"),
        basic("alice", "right" + "x" * 80),
    ],
)
def test_wrong_credentials_are_challenged_and_not_remembered(header: bytes) -> None:
    auth, _, runner = authenticator()
    for calls in (1, 2):
        verdict = auth.admit("10.0.0.1", header)
        runner.run()
        error = settled(verdict)
        assert error is not None
        assert (error.status, error.code) == (401, "UNAUTHORIZED")
        assert error.headers == {b"WWW-Authenticate": CHALLENGE}
        # An unknown user costs a bcrypt run too.
        assert runner.calls == calls


@pytest.mark.parametrize(
    "header", [b"Bearer abc", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon")]
)
def test_malformed_authorization_is_challenged_and_counted(header: bytes) -> None:
    clock = Clock()
    auth, _, runner = authenticator(
        clock, attempts=FailedAttempts(clock, limit=2, window=60, block=30)
    )
    for _ in range(2):
        error = settled(auth.admit("10.0.0.1", header))
        assert error is not None and error.status == 401
    error = settled(auth.admit("10.0.0.1", header))
    assert error is not None and error.status == 429
    assert runner.calls == 0


def test_remembered_credentials_are_bounded() -> None:
    auth, _, runner = authenticator(cache_size=1)
    for header in (basic("alice", "right"), basic("bob", "other")):
        verdict = auth.admit("10.0.0.1", header)
        runner.run()
        assert settled(verdict) is None
    assert auth.admit("10.0.0.1", basic("bob", "other")) is None
    assert isinstance(auth.admit("10.0.0.1", basic("alice", "right")), Deferred)


def test_too_many_failures_from_an_address_block_it_for_a_while() -> None:
    clock = Clock()
    auth, _, runner = authenticator(
        clock, attempts=FailedAttempts(clock, limit=10, window=60, block=120)
    )
    for _ in range(10):
        clock.advance(5)
        verdict = auth.admit("10.0.0.1", basic("alice", "wrong"))
        runner.run()
        assert settled(verdict) is not None
    calls = runner.calls
    error = settled(auth.admit("10.0.0.1", basic("alice", "right")))
    assert error is not None
    assert (error.status, error.code) == (429, "TOOMANYREQUESTS")
    assert error.headers == {b"Retry-After": b"120"}
    assert runner.calls == calls
    clock.advance(100.5)
    error = settled(auth.admit("10.0.0.1", None))
    assert error is not None and error.headers == {b"Retry-After": b"20"}
    # Another address is not blocked.
    verdict = auth.admit("10.0.0.2", basic("alice", "right"))
    runner.run()
    assert settled(verdict) is None
    clock.advance(20)
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    runner.run()
    assert settled(verdict) is None


def test_failures_spread_beyond_the_window_do_not_block() -> None:
    clock = Clock()
    attempts = FailedAttempts(clock, limit=10, window=60, block=120)
    for _ in range(30):
        clock.advance(7)
        attempts.failed("10.0.0.1")
    assert attempts.blocked_for("10.0.0.1") is None


def test_failed_attempts_remember_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    attempts = FailedAttempts(clock, limit=2, window=60, block=60, addresses=3)
    for address in ("a", "b", "c", "d"):
        attempts.failed(address)
    # "a", the longest quiet, is forgotten: its next failure is its first.
    attempts.failed("a")
    attempts.failed("d")
    assert attempts.blocked_for("a") is None
    assert attempts.blocked_for("d") == 60
    for address in "efgh":
        attempts.failed(address)
        attempts.failed(address)
    assert attempts.blocked_for("d") is None
    assert attempts.blocked_for("h") == 60


def test_replacing_the_users_forgets_remembered_credentials() -> None:
    auth, _, runner = authenticator()
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    runner.run()
    assert settled(verdict) is None
    auth.replace_users(parse_htpasswd(entry("alice", "new")))
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    runner.run()
    assert settled(verdict) is not None


def test_the_htpasswd_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(HTPASSWD)
    auth, _, runner = authenticator()
    reload = htpasswd_reloader(str(path), auth)
    with LoggedEvents() as logged:
        reload()
        path.write_text(entry("carol", "third") + "\n")
        reload()
        path.write_text("carol:plain\n")
        reload()
    said = "\n".join(logged.messages())
    assert "1 users now" in said
    assert "keeping the users read before" in said
    assert "plain" not in said
    verdict = auth.admit("10.0.0.1", basic("carol", "third"))
    runner.run()
    assert settled(verdict) is None
    verdict = auth.admit("10.0.0.1", basic("alice", "right"))
    runner.run()
    assert settled(verdict) is not None


class Echo(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> bytes:
        return self.name + b" " + request.path


def gated(runner: Callable[..., Deferred[Any]] | None = None) -> Any:
    def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return succeed(f(*args))

    root = site_root(
        Echo(b"registry"),
        {b"status": Echo(b"status"), b"health": Echo(b"health")},
        Echo(b"metrics"),
    )
    auth = ClientAuthenticator(USERS, Clock(), runner or run_now)
    return StubTreq(ClientAuthGate(root, auth, OPEN_PATHS))


@pytest_twisted.ensureDeferred
async def test_the_gate_challenges_every_route_but_health_and_metrics() -> None:
    client = gated()
    for path in ("/v2/", "/v2/library/x/manifests/latest", "/_blobserve/status", "/"):
        response = await client.get("http://mirror" + path)
        assert response.code == 401, path
        assert response.headers.getRawHeaders(b"WWW-Authenticate") == [CHALLENGE]
        assert response.headers.getRawHeaders(b"Docker-Distribution-API-Version") == [
            b"registry/2.0"
        ]
        body = json.loads(await response.content())
        assert body["errors"][0]["code"] == "UNAUTHORIZED", path
    response = await client.head("http://mirror/v2/")
    assert response.code == 401
    assert await response.content() == b""
    for path, body in [
        ("/_blobserve/health", b"health /_blobserve/health"),
        ("/metrics", b"metrics /metrics"),
    ]:
        response = await client.get("http://mirror" + path)
        assert (response.code, await response.content()) == (200, body)


@pytest_twisted.ensureDeferred
async def test_the_gate_lets_good_credentials_through_to_the_route() -> None:
    client = gated()
    headers = {b"Authorization": [basic("alice", "right")]}
    for path, body in [
        ("/v2/", b"registry /v2/"),
        ("/v2/library/x/blobs/sha256:00", b"registry /v2/library/x/blobs/sha256:00"),
        ("/_blobserve/status", b"status /_blobserve/status"),
        ("/_blobserve/health", b"health /_blobserve/health"),
    ]:
        response = await client.get("http://mirror" + path, headers=headers)
        assert (response.code, await response.content()) == (200, body), path
    headers = {b"Authorization": [basic("alice", "wrong")]}
    response = await client.get("http://mirror/v2/", headers=headers)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_a_client_gone_during_the_check_is_not_answered() -> None:
    runner = Runner()
    client = gated(runner)
    headers = {b"Authorization": [basic("alice", "right")]}
    answered = client.get("http://mirror/v2/", headers=headers)
    client.flush()
    assert runner.pending
    answered.cancel()
    answered.addErrback(lambda reason: None)
    client.flush()
    with LoggedEvents() as logged:
        runner.run()
        client.flush()
    assert logged.failures() == []
    # And one that stays is answered once the check is done.
    headers = {b"Authorization": [basic("bob", "other")]}
    answered = client.get("http://mirror/v2/", headers=headers)
    client.flush()
    runner.run()
    client.flush()
    response = await answered
    assert (response.code, await response.content()) == (200, b"registry /v2/")


def test_concurrent_guesses_from_one_address_cannot_outrun_the_count() -> None:
    """
    Failures are counted when their checks end: an address may not start
    more than a couple of checks of different credentials at once, or it
    could try any number of passwords before the first failure is counted
    (and fill the threads the checks run in).
    """
    clock, runner = Clock(), Runner()
    auth = ClientAuthenticator(
        USERS, clock, runner, attempts=FailedAttempts(clock, limit=10)
    )
    guesses = [auth.admit("192.0.2.1", basic("alice", f"guess{i}")) for i in range(200)]
    assert runner.calls == CHECKS_PER_ADDRESS
    refused = [g for g in guesses if isinstance(g, OCIError)]
    assert len(refused) == 200 - CHECKS_PER_ADDRESS
    assert {(e.status, e.headers[b"Retry-After"]) for e in refused} == {(429, b"1")}
    # Another address is not held up, and the same credentials share a check.
    elsewhere = [auth.admit("192.0.2.2", basic("alice", "same")) for _ in range(5)]
    assert runner.calls == CHECKS_PER_ADDRESS + 1
    runner.run()
    assert all(settled(g) is not None for g in guesses)
    assert all(settled(e) is not None for e in elsewhere)
    # Once its checks have ended, the address may try again.
    auth.admit("192.0.2.1", basic("alice", "again"))
    assert runner.calls == CHECKS_PER_ADDRESS + 2
