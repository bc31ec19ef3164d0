"""
The health page: the store's write probe (cached, shared, bounded in time),
the reactor's lag, and the answer load balancers read.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from blobserve.ops.health import (
    PROBE_PREFIX,
    CheckResult,
    HealthResource,
    IHealthCheck,
    LagMonitor,
    StoreCheck,
    probe_directory,
    store_check,
)

from fakes import LoggedEvents, connect, has_fired, result_of, store_at


@define
class Probes:
    """
    A probe runner whose probes end when the test says.
    """

    started: list[Deferred[object]] = field(factory=list)

    def __call__(self) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.started.append(d)
        return d

    def succeed(self) -> None:
        self.started[-1].callback(None)

    def fail(self, error: Exception) -> None:
        self.started[-1].errback(Failure(error))


READ_ONLY = OSError(errno.EROFS, "Read-only file system", "/srv/blobs/tmp/x")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def probes() -> Probes:
    return Probes()


@pytest.fixture
def store(clock: Clock, probes: Probes) -> StoreCheck:
    return StoreCheck(probes, clock, cache_seconds=2.0, timeout=3.0)


def test_the_checks_provide_their_interface(clock: Clock, probes: Probes) -> None:
    assert verifyObject(IHealthCheck, StoreCheck(probes, clock))
    assert verifyObject(IHealthCheck, LagMonitor(clock))


def test_a_probe_outcome_is_reused_for_the_cache_time(
    store: StoreCheck, clock: Clock, probes: Probes
) -> None:
    first = store.check()
    clock.advance(0.25)
    probes.succeed()
    assert result_of(first) == CheckResult(True, {"probe_seconds": 0.25})

    clock.advance(1.9)
    assert result_of(store.check()).ok
    assert len(probes.started) == 1

    clock.advance(0.1)
    again = store.check()
    assert len(probes.started) == 2
    assert not has_fired(again)


def test_a_clock_set_back_does_not_keep_an_outcome_longer(
    store: StoreCheck, clock: Clock, probes: Probes
) -> None:
    clock.advance(3600)
    store.check()
    probes.succeed()
    clock.rightNow -= 600
    store.check()
    assert len(probes.started) == 2


def test_checks_while_a_probe_runs_share_it(store: StoreCheck, probes: Probes) -> None:
    waiting = [store.check() for _ in range(3)]
    assert len(probes.started) == 1
    assert not any(has_fired(d) for d in waiting)

    probes.succeed()
    assert all(result_of(d).ok for d in waiting)


def test_a_refused_write_fails_the_check_with_a_readable_reason_then_recovers(
    store: StoreCheck, clock: Clock, probes: Probes
) -> None:
    failing = store.check()
    probes.fail(READ_ONLY)
    assert result_of(failing) == CheckResult(
        False, {"error": "[Errno 30] Read-only file system"}
    )
    # A failure is kept as long as a success: a broken disk is not probed
    # more often.
    clock.advance(1.0)
    assert not result_of(store.check()).ok
    assert len(probes.started) == 1

    clock.advance(1.0)
    recovered = store.check()
    probes.succeed()
    assert result_of(recovered).ok


def test_a_probe_too_slow_fails_the_check_and_no_other_starts_till_it_returns(
    store: StoreCheck, clock: Clock, probes: Probes
) -> None:
    hung = store.check()
    clock.advance(2.9)
    assert not has_fired(hung)
    clock.advance(0.1)
    assert result_of(hung) == CheckResult(
        False, {"error": "the store probe took more than 3 s"}
    )

    clock.advance(2.0)
    still = result_of(store.check())
    assert still == CheckResult(
        False, {"error": "the store probe started 5.0 s ago has not returned"}
    )
    assert len(probes.started) == 1

    # It returns at last: what it says so late changes nothing, but the next
    # check probes afresh, and its answer counts.
    probes.succeed()
    assert not result_of(store.check()).ok
    clock.advance(2.0)
    fresh = store.check()
    assert len(probes.started) == 2
    probes.succeed()
    assert result_of(fresh).ok


def test_the_store_failing_and_recovering_are_logged_once_each(
    store: StoreCheck, clock: Clock, probes: Probes
) -> None:
    with LoggedEvents() as logged:
        for outcome in (READ_ONLY, READ_ONLY, None, None):
            store.check()
            if outcome is None:
                probes.succeed()
            else:
                probes.fail(outcome)
            clock.advance(2.0)
    assert logged.messages() == [
        "the store fails its health check: [Errno 30] Read-only file system",
        "the store passes its health check again",
    ]


def test_the_probe_writes_syncs_and_removes_a_file_of_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[list[tuple[str, bytes]]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append([(p.name, p.read_bytes()) for p in tmp_path.iterdir()])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    probe_directory(str(tmp_path))
    [[(name, content)]] = synced
    assert name.startswith(PROBE_PREFIX)
    assert content
    assert list(tmp_path.iterdir()) == []


def test_a_probe_file_left_by_a_crash_is_removed_at_start_and_is_no_download(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    left = tmp_path / "tmp" / f"{PROBE_PREFIX}0123abcd"
    left.write_bytes(b"x")
    cleanup = store.remove_stale_temporaries()
    assert not left.exists()
    assert (cleanup.kept, cleanup.expired) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_the_real_probe_runs_in_a_thread_and_says_why_a_store_is_unwritable(
    tmp_path: Path,
) -> None:
    # Not chmod: root writes anyway. A file where a directory should be
    # refuses every user.
    assert (await store_check(str(tmp_path), reactor).check()).ok
    assert list(tmp_path.iterdir()) == []

    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    failed = await store_check(str(not_a_directory), reactor).check()
    assert failed == CheckResult(False, {"error": "[Errno 20] Not a directory"})


@pytest.fixture
def lag(clock: Clock) -> LagMonitor:
    monitor = LagMonitor(clock, interval=0.5, bound=1.0)
    monitor.startService()
    return monitor


def test_a_reactor_on_time_passes(lag: LagMonitor, clock: Clock) -> None:
    clock.pump([0.5] * 4)
    assert result_of(lag.check()) == CheckResult(True, {"lag_seconds": 0.0})


def test_a_stalled_reactor_fails_until_its_timer_is_on_time_again(
    lag: LagMonitor, clock: Clock
) -> None:
    clock.advance(0.5)
    # One step of 2.5 s: the timer due at 1.0 fires at 3.0.
    with LoggedEvents() as logged:
        clock.advance(2.5)
        assert result_of(lag.check()) == CheckResult(
            False, {"lag_seconds": 2.0, "error": "the reactor runs 2.0 s late"}
        )
        clock.advance(0.5)
    assert result_of(lag.check()) == CheckResult(True, {"lag_seconds": 0.0})
    assert logged.messages() == [
        "the reactor ran 2.00 s late",
        "the reactor keeps time again",
    ]


def test_a_lag_within_the_bound_passes(lag: LagMonitor, clock: Clock) -> None:
    clock.advance(1.5)
    assert result_of(lag.check()) == CheckResult(True, {"lag_seconds": 1.0})


def test_a_timer_overdue_now_counts_before_it_fires(
    lag: LagMonitor, clock: Clock
) -> None:
    # The reactor is busy: time passes, and the timer has not fired yet.
    clock.rightNow += 2.0
    assert not result_of(lag.check()).ok


def test_a_stopped_monitor_fails_and_leaves_no_timer(
    lag: LagMonitor, clock: Clock
) -> None:
    lag.stopService()
    assert clock.getDelayedCalls() == []
    assert result_of(lag.check()) == CheckResult(
        False, {"error": "the lag monitor is not running"}
    )


@implementer(IHealthCheck)
@define
class FixedCheck:
    """
    A check answering what the test sets, or waiting while it is L{None}.
    """

    result: CheckResult | None = field(factory=lambda: CheckResult(True, {}))
    waiting: list[Deferred[CheckResult]] = field(factory=list)
    cancelled: int = 0

    def check(self) -> Deferred[CheckResult]:
        if self.result is not None:
            return succeed(self.result)

        def cancel(d: Deferred[CheckResult]) -> None:
            self.cancelled += 1

        d: Deferred[CheckResult] = Deferred(cancel)
        self.waiting.append(d)
        return d


def get(resource: HealthResource, method: str = "GET") -> Any:
    connection = connect(resource)
    connection.request(method, "/_blobserve/health")
    return connection


def test_all_checks_passing_is_200_ok_and_never_cached() -> None:
    resource = HealthResource(
        {"store": FixedCheck(), "reactor": FixedCheck(CheckResult(True, {"x": 1}))}
    )
    status, headers, body = get(resource).response()
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["content-length"] == str(len(body))
    assert json.loads(body) == {
        "status": "ok",
        "checks": {"store": {"ok": True}, "reactor": {"ok": True, "x": 1}},
    }


def test_a_failing_check_is_503_and_named() -> None:
    resource = HealthResource(
        {
            "store": FixedCheck(CheckResult(False, {"error": "disk says no"})),
            "reactor": FixedCheck(),
        }
    )
    status, _, body = get(resource).response()
    assert status == 503
    assert json.loads(body) == {
        "status": "failing",
        "checks": {
            "store": {"ok": False, "error": "disk says no"},
            "reactor": {"ok": True},
        },
    }


def test_head_answers_the_same_status_without_a_body() -> None:
    resource = HealthResource(
        {"store": FixedCheck(CheckResult(False, {"error": "no"}))}
    )
    connection = get(resource, "HEAD")
    status, headers, body = connection.response()
    assert status == 503
    assert headers["cache-control"] == "no-store"
    assert body == b""


def test_the_answer_waits_for_every_check() -> None:
    slow = FixedCheck(None)
    connection = get(HealthResource({"store": slow, "reactor": FixedCheck()}))
    assert connection.transport.value() == b""
    slow.waiting[0].callback(CheckResult(True, {}))
    assert connection.response()[0] == 200


def test_a_client_gone_stops_the_wait_and_gets_nothing() -> None:
    slow = FixedCheck(None)
    connection = get(HealthResource({"store": slow}))
    connection.disconnect()
    assert slow.cancelled == 1
    assert connection.transport.value() == b""


def test_a_check_that_breaks_its_promise_is_a_logged_500() -> None:
    @implementer(IHealthCheck)
    class Broken:
        def check(self) -> Deferred[CheckResult]:
            return fail(RuntimeError("a bug"))

    with LoggedEvents() as logged:
        status, _, body = get(HealthResource({"store": Broken()})).response()
    assert status == 500
    assert json.loads(body) == {"status": "unknown"}
    assert [str(f.value) for f in logged.failures()] == ["a bug"]


def test_the_page_fails_on_a_refused_write_and_passes_after_recovery(
    clock: Clock, probes: Probes
) -> None:
    lag = LagMonitor(clock)
    lag.startService()
    resource = HealthResource({"store": StoreCheck(probes, clock), "reactor": lag})

    failing = get(resource)
    probes.fail(READ_ONLY)
    status, _, body = failing.response()
    assert status == 503
    assert json.loads(body)["checks"] == {
        "store": {"ok": False, "error": "[Errno 30] Read-only file system"},
        "reactor": {"ok": True, "lag_seconds": 0.0},
    }

    clock.pump([0.5] * 4)
    passing = get(resource)
    probes.succeed()
    status, _, body = passing.response()
    assert status == 200
    assert json.loads(body)["status"] == "ok"
