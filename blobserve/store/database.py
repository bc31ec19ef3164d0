"""
L{Database}: the store's SQLite database, used from one thread of its own so
that the reactor never waits for it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

_T = TypeVar("_T")

#: Work done on the database: a function of the connection, run in a
#: transaction that commits when it returns and rolls back when it raises.
Work = Callable[[sqlite3.Connection], _T]


class IDatabase(Interface):
    """
    A database that runs work in transactions, one at a time, in order.
    """

    def run(work: Work[Any]) -> Deferred[Any]:
        """
        Run C{work} in a transaction of its own, after all work asked for
        before it.

        @return: fires with what C{work} returned, or fails with what it
            raised (the transaction then rolled back).
        """

    def close() -> Deferred[None]:
        """
        Close the connection once the work asked for so far is done.
        """

    def reset() -> Deferred[None]:
        """
        Close the connection and delete the database's files: the next work
        starts on an empty database. For a database that is damaged.
        """


def connect(path: str) -> sqlite3.Connection:
    """
    Open the database at C{path}: write-ahead logged, every commit durable.
    Transactions are begun and ended explicitly (see L{in_transaction}).
    """
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    # A committed transaction survives a power cut, not only a crash: the
    # index says a blob is in the store only once that is true for good.
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def delete_files(path: str) -> None:
    """
    Remove the database at C{path} and its write-ahead log.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def in_transaction(connection: sqlite3.Connection, work: Work[_T]) -> _T:
    """
    Run C{work} in a transaction on C{connection}.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = work(connection)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return result


class _DaemonThread(threading.Thread):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


@implementer(IDatabase)
class ThreadedDatabase:
    """
    An L{IDatabase} on one connection, used only from a pool of one thread:
    work runs off the reactor thread, one transaction at a time, in the
    order it was asked for.
    """

    def __init__(self, path: str, reactor: IReactorFromThreads) -> None:
        self._path = path
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name="blobserve-index")
        # A daemon: a process whose reactor never stopped the pool (a test,
        # a crash on the way down) still exits. Every transaction is atomic,
        # so one cut short is one that never happened.
        self._pool.threadFactory = _DaemonThread
        self._connection: sqlite3.Connection | None = None

    def start(self) -> None:
        """
        Start the thread; work asked for before waits for it.
        """
        self._pool.start()

    def run(self, work: Work[_T]) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, self._run, work)

    def _run(self, work: Work[_T]) -> _T:
        if self._connection is None:
            self._connection = connect(self._path)
        return in_transaction(self._connection, work)

    def close(self) -> Deferred[None]:
        d: Deferred[None] = deferToThreadPool(self._reactor, self._pool, self._close)
        return d.addBoth(self._stop)

    def reset(self) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self._reset)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _reset(self) -> None:
        self._close()
        delete_files(self._path)

    def _stop(self, result: object) -> object:
        self._pool.stop()
        return result


@implementer(IDatabase)
class ImmediateDatabase:
    """
    An L{IDatabase} that runs work at once, in the caller's thread: for
    tools that run no reactor (fsck) and for tests.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None

    def run(self, work: Work[_T]) -> Deferred[_T]:
        if self._connection is None:
            self._connection = connect(self._path)
        try:
            return succeed(in_transaction(self._connection, work))
        except Exception:
            return fail(Failure())

    def close(self) -> Deferred[None]:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        return succeed(None)

    def reset(self) -> Deferred[None]:
        self.close()
        delete_files(self._path)
        return succeed(None)
