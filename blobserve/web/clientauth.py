"""
Client authentication: HTTP Basic against an htpasswd file of bcrypt
entries, in front of every route but a few open ones, with the bcrypt
checks off the reactor's thread, remembered for a while, and failed
attempts limited per client address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from blobserve.oneshot import OneShotEvent
from blobserve.textfile import UnreadableFile, read_text_file
from blobserve.web.resource import OCIError, write_error

log = Logger()

#: The prefixes of bcrypt hashes (C{htpasswd -B} writes C{$2y$}).
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")

#: The challenge a client without (good) credentials gets.
CHALLENGE = b'Basic realm="blobserve"'

#: Runs a blocking call away from the reactor's thread and returns its result.
RunBlocking = Callable[..., "Deferred[Any]"]


class UnusableHtpasswd(Exception):
    """
    An htpasswd file cannot be read, or holds entries blobserve cannot check.
    The message never holds a hash.
    """


def parse_htpasswd(text: str) -> dict[str, bytes]:
    """
    The users of an htpasswd file and their bcrypt hashes. Blank lines and
    lines starting with C{#} are skipped.

    @raise UnusableHtpasswd: if a line is not C{user:bcrypt-hash} (MD5, SHA
        and crypt entries are refused: make them with C{htpasswd -B}), a user
        comes twice, or there is no user at all.
    """
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise UnusableHtpasswd(f"line {number} is not user:hash")
        if not hashed.startswith(_BCRYPT_PREFIXES) or not hashed.isascii():
            raise UnusableHtpasswd(
                f"line {number} (user {user[:64]!r}) is not a bcrypt entry:"
                " make it with htpasswd -B"
            )
        if user in users:
            raise UnusableHtpasswd(f"line {number}: user {user[:64]!r} comes twice")
        users[user] = hashed.encode("ascii")
    if not users:
        raise UnusableHtpasswd("holds no user")
    return users


def read_htpasswd(path: str) -> dict[str, bytes]:
    """
    The users of the htpasswd file at C{path} (see L{parse_htpasswd}).

    @raise UnusableHtpasswd: if it cannot be read or parsed.
    """
    try:
        text = read_text_file(path)
    except UnreadableFile as e:
        raise UnusableHtpasswd(str(e)) from None
    return parse_htpasswd(text)


def _basic(header: bytes) -> tuple[str, bytes] | None:
    """
    The user and password of a C{Basic} C{Authorization} header, if it is
    one.
    """
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        pair = base64.b64decode(encoded.strip(), validate=True)
        user, colon, password = pair.partition(b":")
        name = user.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not colon or not name:
        return None
    return name, password


def _matches(password: bytes, hashed: bytes) -> bool:
    """
    Whether C{password} is the one bcrypt C{hashed} (run in a thread: it
    takes milliseconds to a second, by the hash's cost).
    """
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        # A password bcrypt cannot take (over 72 bytes), or a broken hash.
        return False


class FailedAttempts:
    """
    Failed authentication attempts by client address: one that fails
    C{limit} times within C{window} seconds is blocked for C{block}
    seconds. At most C{addresses} addresses are remembered (the longest
    quiet forgotten first).
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = 10,
        window: float = 60.0,
        block: float = 60.0,
        addresses: int = 10_000,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._block = block
        self._addresses = addresses
        # Recent failures' times by address; the most recent address last.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def blocked_for(self, address: str) -> float | None:
        """
        Seconds until C{address} may try again, if it is blocked.
        """
        until = self._blocked.get(address)
        if until is None:
            return None
        left = until - self._clock.seconds()
        if left <= 0:
            del self._blocked[address]
            return None
        return left

    def failed(self, address: str) -> None:
        """
        C{address} presented credentials that are wrong.
        """
        now = self._clock.seconds()
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self._limit)
        times.append(now)
        if len(times) == self._limit and now - times[0] <= self._window:
            log.warn(
                "{address} failed to authenticate {limit} times within"
                " {window:g}s: refused for {block:g}s",
                address=address,
                limit=self._limit,
                window=self._window,
                block=self._block,
            )
            self._blocked.pop(address, None)
            self._blocked[address] = now + self._block
            times.clear()
            _bound(self._blocked, self._addresses)
        self._failures[address] = times
        _bound(self._failures, self._addresses)


def _bound(table: OrderedDict[Any, Any], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)


#: How many checks of different credentials one address may have running
#: at once: a client sends the same credentials with every request (one
#: check serves them all), so more is guessing, which must not outrun the
#: count of failed attempts (counted when a check ends).
CHECKS_PER_ADDRESS = 2


class ClientAuthenticator:
    """
    Decides whether a request's C{Authorization} lets it in.

    A bcrypt check runs in C{run_blocking}, never in the reactor's thread;
    credentials found good are remembered for C{remember} seconds (up to
    C{cache_size} of them, by a keyed hash of the user and password, never
    the password itself), and concurrent checks of the same credentials
    share one bcrypt run. An address may have at most
    L{CHECKS_PER_ADDRESS} checks of different credentials running at once;
    one more is refused at once with 429. Failed attempts are counted by
    C{attempts}, and an address it blocks is refused before its credentials
    are looked at.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        clock: IReactorTime,
        run_blocking: RunBlocking,
        attempts: FailedAttempts | None = None,
        remember: float = 300.0,
        cache_size: int = 1024,
    ) -> None:
        self._clock = clock
        self._run_blocking = run_blocking
        self._attempts = attempts if attempts is not None else FailedAttempts(clock)
        self._remember = remember
        self._cache_size = cache_size
        self._key = os.urandom(32)
        self._users: Mapping[str, bytes] = {}
        self._good: OrderedDict[bytes, float] = OrderedDict()
        self._checking: dict[bytes, OneShotEvent[bool]] = {}
        # Checks running, by the address that started them.
        self._running: dict[str, int] = {}
        self.replace_users(users)

    def replace_users(self, users: Mapping[str, bytes]) -> None:
        """
        Check against C{users} from now on; forget what was found good.
        """
        self._users = dict(users)
        self._good.clear()
        self._checking.clear()

    def admit(
        self, address: str, authorization: bytes | None
    ) -> OCIError | Deferred[OCIError | None] | None:
        """
        L{None} if a request from C{address} with the C{authorization}
        header may go on; the error to answer it with if not (401
        C{UNAUTHORIZED} with the challenge, or 429 C{TOOMANYREQUESTS} with
        C{Retry-After} while C{address} is blocked); or a Deferred of one
        of these while a bcrypt check runs.
        """
        blocked = self._attempts.blocked_for(address)
        if blocked is not None:
            return OCIError(
                429,
                "TOOMANYREQUESTS",
                "too many failed authentication attempts: try again later",
                {b"Retry-After": b"%d" % math.ceil(blocked)},
            )
        if authorization is None:
            return _unauthorized("authentication required")
        presented = _basic(authorization)
        if presented is None:
            self._attempts.failed(address)
            return _unauthorized("HTTP Basic credentials required")
        user, password = presented
        key = hmac.digest(self._key, user.encode() + b"\0" + password, hashlib.sha256)
        until = self._good.get(key)
        if until is not None:
            if until > self._clock.seconds():
                self._good.move_to_end(key)
                return None
            del self._good[key]
        checked = self._checking.get(key)
        if checked is None:
            if self._running.get(address, 0) >= CHECKS_PER_ADDRESS:
                return OCIError(
                    429,
                    "TOOMANYREQUESTS",
                    "too many authentication attempts at once: try again later",
                    {b"Retry-After": b"1"},
                )
            checked = self._checking[key] = OneShotEvent()
            self._running[address] = self._running.get(address, 0) + 1
            self._check(key, user, password, checked, address)
        return checked.observe().addCallback(self._verdict, address)

    def _check(
        self,
        key: bytes,
        user: str,
        password: bytes,
        checked: OneShotEvent[bool],
        address: str,
    ) -> None:
        users = self._users
        hashed = users.get(user)
        # An unknown user costs as long a check as a known one, against
        # some user's hash, so that timing does not tell which users exist.
        against = hashed if hashed is not None else next(iter(users.values()))
        d = self._run_blocking(_matches, password, against)

        def done(matched: bool) -> None:
            running = self._running.pop(address, 1) - 1
            if running:
                self._running[address] = running
            good = matched and hashed is not None
            if self._checking.get(key) is checked:
                del self._checking[key]
                # Only if the users were not replaced meanwhile.
                if good:
                    self._good[key] = self._clock.seconds() + self._remember
                    _bound(self._good, self._cache_size)
            checked.succeed_with(good)

        def broken(reason: Failure) -> None:
            log.failure("could not check a password", reason)
            done(False)

        d.addCallback(done).addErrback(broken)

    def _verdict(self, good: bool, address: str) -> OCIError | None:
        if good:
            return None
        self._attempts.failed(address)
        return _unauthorized("wrong user name or password")


def _unauthorized(message: str) -> OCIError:
    return OCIError(401, "UNAUTHORIZED", message, {b"WWW-Authenticate": CHALLENGE})


class _Refusal(Resource):
    """
    Answers any request with C{error}.
    """

    isLeaf = True

    def __init__(self, error: OCIError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Request) -> int:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        # For a HEAD, write() sends the headers alone.
        request.write(write_error(request, self._error))
        request.finish()
        return NOT_DONE_YET


class _Deciding(Resource):
    """
    Waits for a bcrypt check, then answers the request from C{root}, or
    with the refusal; not at all if its client has gone meanwhile.
    """

    isLeaf = True

    def __init__(self, verdict: Deferred[OCIError | None], root: IResource) -> None:
        super().__init__()
        self._verdict = verdict
        self._root = root

    def render(self, request: Request) -> int:
        gone = False

        def left(reason: Failure) -> None:
            nonlocal gone
            gone = True

        request.notifyFinish().addErrback(left)

        def decided(error: OCIError | None) -> None:
            if gone:
                return
            if error is not None:
                request.render(_Refusal(error))
                return
            # Traversal stopped here, one segment into the path: go on from
            # the root, from that segment.
            assert request.prepath is not None and request.postpath is not None
            request.postpath.insert(0, request.prepath.pop())
            request.render(getChildForRequest(self._root, request))

        def broken(reason: Failure) -> None:
            log.failure("could not answer an authenticated request", reason)
            if not gone and not request.startedWriting:
                request.render(_Refusal(OCIError(500, "UNKNOWN", "internal error")))

        self._verdict.addCallback(decided).addErrback(broken)
        return NOT_DONE_YET


class ClientAuthGate(Resource):
    """
    The site's root when clients must authenticate: a request for one of
    C{open_paths} (exactly), or whose credentials C{authenticator} admits,
    goes on to C{root}; any other is refused as the authenticator says.
    """

    def __init__(
        self,
        root: IResource,
        authenticator: ClientAuthenticator,
        open_paths: Collection[bytes],
    ) -> None:
        super().__init__()
        self._root = root
        self._authenticator = authenticator
        self._open_paths = open_paths

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if request.path in self._open_paths:
            return self._child(path, request)
        address = getattr(request.getClientAddress(), "host", "-")
        verdict = self._authenticator.admit(
            address, request.getHeader(b"Authorization")
        )
        if isinstance(verdict, Deferred):
            return _Deciding(verdict, self._root)
        if verdict is not None:
            return _Refusal(verdict)
        return self._child(path, request)

    def _child(self, path: bytes, request: Request) -> IResource:
        child: IResource = self._root.getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> int:
        # Not reached: a request's path has at least one segment, and
        # getChildWithDefault decides for it.
        return _Refusal(_unauthorized("authentication required")).render(request)


def htpasswd_reloader(
    path: str, authenticator: ClientAuthenticator
) -> Callable[[], None]:
    """
    A call that reloads the htpasswd file at C{path} into C{authenticator}
    when the file has changed (by its size, modification time or inode)
    since the last call, and logs what it did; a file that became unusable
    is logged and the users read before are kept.
    """

    def identity() -> tuple[int, int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    seen = identity()

    def reload() -> None:
        nonlocal seen
        now = identity()
        if now == seen:
            return
        seen = now
        try:
            users = read_htpasswd(path)
        except UnusableHtpasswd as e:
            log.error(
                "--htpasswd {path} {why}: keeping the users read before",
                path=path,
                why=str(e),
            )
            return
        authenticator.replace_users(users)
        log.info(
            "--htpasswd {path} changed: {count} users now", path=path, count=len(users)
        )

    return reload
