"""
C{/_blobserve/health}: whether this blobserve can do its work, for load
balancers and orchestrators to ask every second or so: its store takes
writes, and its reactor keeps time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import Interface, implementer

from blobserve.oneshot import OneShotEvent

log = Logger()

#: How the files the store probe writes in the store's C{tmp/} begin. A
#: download's temporary is named C{<algorithm>-<hex>.<random>}, and only
#: those the index records are kept at start: a probe file a crash left
#: behind is removed then, with the other unrecorded temporaries.
PROBE_PREFIX = "health-probe."

#: What the probe writes.
_PROBE_CONTENT = b"blobserve health probe\n"


@frozen
class CheckResult:
    """
    One check's outcome, as the health page shows it.

    @ivar ok: whether the check passed.
    @ivar fields: what else it says: C{error}, a readable reason, when it
        did not pass; figures such as C{lag_seconds}.
    """

    ok: bool
    fields: Mapping[str, object] = field(factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, **self.fields}


class IHealthCheck(Interface):
    """
    One thing the health page checks.
    """

    def check() -> Deferred[CheckResult]:
        """
        The check's outcome now. The Deferred fires within a bounded time and
        never fails: a check that cannot tell says so in a failing result.
        Cancelling it only stops waiting.
        """


def probe_directory(directory: str) -> None:
    """
    Create a small file in C{directory}, write it, fsync it and remove it.
    Blocking: call it from a thread.

    @raise OSError: if the file system refuses any of it.
    """
    path = os.path.join(directory, f"{PROBE_PREFIX}{os.urandom(4).hex()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, _PROBE_CONTENT)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        # The clean-up at start may have removed it already.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def error_text(reason: Failure) -> str:
    """
    A failure as an operator reads it: C{[Errno 30] Read-only file system},
    without the path or a traceback.
    """
    error = reason.value
    if isinstance(error, OSError) and error.errno is not None:
        return f"[Errno {error.errno}] {error.strerror}"
    return reason.getErrorMessage() or type(error).__name__


@implementer(IHealthCheck)
class StoreCheck:
    """
    Whether the store takes writes: passes while a probe (see
    L{probe_directory}) succeeds within C{timeout} seconds.

    A probe's outcome is kept for C{cache_seconds}, so that checks every
    second do not each touch the disk, and checks while a probe runs share
    its outcome. At most one probe runs at a time: while one that timed out
    has not returned (a hung disk holds its thread), checks fail without
    starting another.
    """

    def __init__(
        self,
        probe: Callable[[], Deferred[object]],
        clock: IReactorTime,
        cache_seconds: float = 2.0,
        timeout: float = 3.0,
    ) -> None:
        """
        @param probe: runs one probe off the reactor thread; its Deferred
            fails with the reason if the store refused.
        """
        self._probe = probe
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._last: CheckResult | None = None
        self._last_at = 0.0
        self._running: OneShotEvent[CheckResult] | None = None
        # When the probe whose thread has not returned yet started.
        self._outstanding_since: float | None = None

    def check(self) -> Deferred[CheckResult]:
        age = self._clock.seconds() - self._last_at
        # A clock set back makes the age negative: that outcome is not kept.
        if self._last is not None and 0 <= age < self._cache_seconds:
            return succeed(self._last)
        if self._running is None:
            running = self._running = OneShotEvent[CheckResult]()
            self._start(running)
            return running.observe()
        return self._running.observe()

    def _start(self, event: OneShotEvent[CheckResult]) -> None:
        started = self._clock.seconds()
        if self._outstanding_since is not None:
            self._settle(
                event,
                CheckResult(
                    False,
                    {
                        "error": "the store probe started"
                        f" {started - self._outstanding_since:.1f} s ago"
                        " has not returned"
                    },
                ),
            )
            return
        self._outstanding_since = started

        def timed_out() -> None:
            error = f"the store probe took more than {self._timeout:g} s"
            self._settle(event, CheckResult(False, {"error": error}))

        timer = self._clock.callLater(self._timeout, timed_out)

        def returned(result: object) -> None:
            self._outstanding_since = None
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                outcome = CheckResult(False, {"error": error_text(result)})
            else:
                seconds = self._clock.seconds() - started
                outcome = CheckResult(True, {"probe_seconds": round(seconds, 3)})
            self._settle(event, outcome)

        maybeDeferred(self._probe).addBoth(returned)

    def _settle(self, event: OneShotEvent[CheckResult], outcome: CheckResult) -> None:
        # A probe returning after its timeout has nothing more to say.
        if event.happened:
            return
        if self._running is event:
            self._running = None
        if not outcome.ok and (self._last is None or self._last.ok):
            log.warn(
                "the store fails its health check: {error}",
                error=outcome.fields["error"],
            )
        elif outcome.ok and self._last is not None and not self._last.ok:
            log.info("the store passes its health check again")
        self._last, self._last_at = outcome, self._clock.seconds()
        event.succeed_with(outcome)


def store_check(directory: str, reactor: Any) -> StoreCheck:
    """
    A L{StoreCheck} probing C{directory} in the reactor's thread pool.
    """

    def probe() -> Deferred[object]:
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), probe_directory, directory
        )

    return StoreCheck(probe, reactor)


@implementer(IHealthCheck)
class LagMonitor(Service):
    """
    Whether the reactor keeps time: while it runs, a timer every C{interval}
    seconds measures how late it fires. The check fails while the lag, the
    last measured or that of the timer due now, is over C{bound} seconds, and
    while the monitor is not running.
    """

    def __init__(
        self, clock: IReactorTime, interval: float = 0.5, bound: float = 1.0
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._bound = bound
        self._lag = 0.0
        self._due = 0.0
        self._call: IDelayedCall | None = None

    # A timer set again at each firing, not a LoopingCall: that keeps to a
    # grid and skips the calls a stall made it miss, so the time a call was
    # due is its own; here it is always the one this timer was set for.
    def startService(self) -> None:
        super().startService()
        self._lag = 0.0
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self._clock.seconds() + self._interval
        self._call = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        lagging = self._lag > self._bound
        self._lag = max(0.0, self._clock.seconds() - self._due)
        if self._lag > self._bound and not lagging:
            log.warn("the reactor ran {lag:.2f} s late", lag=self._lag)
        elif lagging and self._lag <= self._bound:
            log.info("the reactor keeps time again")
        self._schedule()

    def lag(self) -> float:
        """
        How late the reactor is, in seconds: the last lag measured, or more
        if the next measure is overdue now.
        """
        return max(self._lag, self._clock.seconds() - self._due)

    def check(self) -> Deferred[CheckResult]:
        if not self.running:
            return succeed(
                CheckResult(False, {"error": "the lag monitor is not running"})
            )
        lag = self.lag()
        fields: dict[str, object] = {"lag_seconds": round(lag, 3)}
        if lag > self._bound:
            fields["error"] = f"the reactor runs {lag:.1f} s late"
        return succeed(CheckResult(lag <= self._bound, fields))


class HealthResource(Resource):
    """
    The health page: 200 with C{{"status": "ok", "checks": {...}}} while
    every check passes, else 503 with C{"status": "failing"}; each check's
    outcome under its name. Never cached; a HEAD answers the same status.
    """

    isLeaf = True

    def __init__(self, checks: Mapping[str, IHealthCheck]) -> None:
        super().__init__()
        self._checks = dict(checks)

    def render_GET(self, request: Request) -> object:
        self._answer(request)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> object:
        # The same answer: twisted.web sends a HEAD's headers only.
        self._answer(request)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        gone = False

        def went_away(reason: Failure) -> None:
            nonlocal gone
            gone = True
            checked.cancel()

        # Before the checks, which may all answer at once and end the request.
        request.notifyFinish().addErrback(went_away)
        names = list(self._checks)
        checked = gatherResults(
            [self._checks[name].check() for name in names], consumeErrors=True
        )

        def answer(results: list[CheckResult]) -> None:
            if gone:
                return
            ok = all(result.ok for result in results)
            checks = {name: r.as_json() for name, r in zip(names, results, strict=True)}
            status = "ok" if ok else "failing"
            self._send(
                request, 200 if ok else 503, {"status": status, "checks": checks}
            )

        def failed(reason: Failure) -> None:
            if gone:
                return
            if isinstance(reason.value, FirstError):
                reason = reason.value.subFailure
            log.failure("the health check failed", reason)
            self._send(request, 500, {"status": "unknown"})

        checked.addCallback(answer).addErrback(failed)

    @staticmethod
    def _send(request: Request, code: int, document: dict[str, object]) -> None:
        body = json.dumps(document).encode()
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"Cache-Control", b"no-store")
        request.write(body)
        request.finish()
