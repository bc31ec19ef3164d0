"""
C{blobserve-fsck STORAGE}: re-hash every blob of a store, make its index
agree with its files, and report every change.

It takes the store's lock (L{blobserve.store.lock}) for its whole run, so it
never works on a store a running blobserve uses, and blobserve does not start
on the store while it runs. A damaged cache then repairs itself (the next
request fetches a removed blob again) instead of serving a broken layer
forever.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from blobserve.digest import SUPPORTED_ALGORITHMS, Digest, InvalidDigest
from blobserve.store.database import ImmediateDatabase
from blobserve.store.index import SCHEMA_VERSION, BlobEntry, StoreIndex
from blobserve.store.layout import index_path
from blobserve.store.lock import StoreLock, StoreLocked

_READ_SIZE = 1024 * 1024

_T = TypeVar("_T")

#: Exit statuses.
CLEAN, CHANGED, UNREADABLE, IN_USE = 0, 1, 2, 3

_EPILOG = """\
exit status:
  0  every blob verified and the index agreed with the files: nothing changed
  1  something was repaired: each change is listed on stdout
  2  the store cannot be read (not a store, an I/O error, an index of a newer
     blobserve): what was changed before is listed, nothing more is changed
  3  the store is in use by blobserve (or another blobserve-fsck): nothing
     was checked or changed; stop it, then run blobserve-fsck again
"""


class StoreUnreadable(Exception):
    """
    The store cannot be checked: fsck stops, having changed nothing more.
    """


class Action(Enum):
    """
    What fsck did to a file or a row.
    """

    REMOVED = "removed"
    ADDED = "added row for"
    DELETED = "deleted row for"
    CORRECTED = "corrected row for"
    SETTLED = "settled row for"
    REBUILT = "rebuilt"


@frozen
class Change:
    """
    One change fsck made: what it did, to which file or blob, and why.
    """

    action: Action
    subject: str
    reason: str

    def __str__(self) -> str:
        return f"{self.action.value} {self.subject}: {self.reason}"


@define
class Report:
    """
    What a check found: how many blobs verified, and every change it made,
    in order.
    """

    verified: int = 0
    changes: list[Change] = field(factory=list)

    def of(self, action: Action) -> list[str]:
        """
        The files or blobs that had C{action} done to them.
        """
        return [c.subject for c in self.changes if c.action is action]

    @property
    def removed(self) -> list[str]:
        """
        The files removed, relative to the store.
        """
        return self.of(Action.REMOVED)

    def summary(self) -> str:
        """
        One line: how many blobs verified, files removed, changes to the index.
        """
        index = sum(1 for c in self.changes if c.action is not Action.REMOVED)
        return (
            f"{self.verified} blobs verified, {len(self.removed)} removed,"
            f" {index} changes to the index"
        )


def _entries(root: Path) -> Iterator[tuple[Path, Digest | None]]:
    """
    Every file under C{root/blobs}, with the digest its place names (or
    L{None} where the place names none).
    """
    blobs = root / "blobs"
    for path in sorted(blobs.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(blobs).parts
        digest = None
        if len(relative) == 3 and relative[0] in SUPPORTED_ALGORITHMS:
            algorithm, prefix, hex_digest = relative
            try:
                digest = Digest.parse(f"{algorithm}:{hex_digest}")
            except InvalidDigest:
                digest = None
            if digest is not None and prefix != hex_digest[:2]:
                digest = None
        yield path, digest


def _verifies(path: Path, digest: Digest) -> bool:
    hasher = digest.hasher()
    with path.open("rb") as f:
        while chunk := f.read(_READ_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest() == digest.hex


def _now(d: Deferred[_T]) -> _T:
    """
    The result of C{d}, which has fired already: the database runs work at
    once, in this thread.

    @raise Exception: what C{d} failed with.
    """
    results: list[_T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    return results[0]


def _unsettled(database: ImmediateDatabase) -> dict[str, str]:
    """
    The rows a crash left between two states, by digest, as the index holds
    them before it is loaded (and settled); none if it cannot be read, as
    loading then rebuilds it.

    @raise StoreUnreadable: if a newer blobserve wrote the index: rebuilding
        it would throw away what this one cannot read.
    """

    def read(connection: sqlite3.Connection) -> dict[str, str]:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnreadable(
                f"its index was written by a newer blobserve (schema {version},"
                f" this one reads {SCHEMA_VERSION}): use that blobserve's fsck"
            )
        if version == 0:
            return {}
        return dict(
            connection.execute(
                "SELECT digest, state FROM blobs WHERE state != 'present'"
            ).fetchall()
        )

    try:
        return _now(database.run(read))
    except sqlite3.DatabaseError:
        return {}


def _settled(report: Report, unsettled: dict[str, str], index: StoreIndex) -> None:
    """
    Report what loading the index did to the rows a crash left between two
    states (L{blobserve.store.index} settles them as blobserve does at start).
    """
    for digest, state in sorted(unsettled.items()):
        kept = index.get(Digest.parse(digest)) is not None
        if state == "committing":
            reason = (
                "its commit had finished: kept"
                if kept
                else "its commit had not finished: deleted, and its file if any"
            )
        else:
            reason = "its removal had begun: deleted, and its file"
        report.changes.append(Change(Action.SETTLED, digest, reason))


def _remove(
    report: Report,
    root: Path,
    path: Path,
    reason: str,
    index: StoreIndex,
    digest: Digest | None,
) -> None:
    """
    Remove the file at C{path}, and its row if it has one: the row says the
    file is going first, so that an fsck cut short leaves no row without a
    file that blobserve would not clear at start.
    """
    rows = [digest] if digest is not None and index.get(digest) is not None else []
    _now(index.begin_removal(rows))
    path.unlink(missing_ok=True)
    _now(index.end_removal(rows))
    report.changes.append(Change(Action.REMOVED, str(path.relative_to(root)), reason))


def _add_row(database: ImmediateDatabase, digest: Digest, path: Path) -> int:
    """
    Add a row for the verified blob file at C{path}, as a rebuild of the
    index does: its size, its time of commit and of last access the file's
    modification time, no media type (a manifest without one is fetched
    again when it is asked for).

    @return: the blob's size.
    """
    stat = path.stat()

    def insert(connection: sqlite3.Connection) -> None:
        connection.execute(
            "INSERT OR REPLACE INTO blobs (digest, size, media_type,"
            " committed_at, last_access, access_count, state)"
            " VALUES (?, ?, NULL, ?, ?, 0, 'present')",
            (str(digest), stat.st_size, stat.st_mtime, stat.st_mtime),
        )

    _now(database.run(insert))
    return stat.st_size


def _correct_size(database: ImmediateDatabase, digest: Digest, size: int) -> None:
    def update(connection: sqlite3.Connection) -> None:
        connection.execute(
            "UPDATE blobs SET size = ? WHERE digest = ?", (size, str(digest))
        )

    _now(database.run(update))


def _repair(
    report: Report, root: Path, database: ImmediateDatabase, index: StoreIndex
) -> None:
    """
    Verify every file under C{root/blobs} and make the loaded C{index} agree
    with the files.
    """
    files: dict[Digest, Path] = {}
    for path, named in _entries(root):
        if named is None:
            _remove(report, root, path, "names no blob", index, None)
        elif path.is_symlink() or not path.is_file():
            _remove(report, root, path, "is not a regular file", index, named)
        else:
            files[named] = path
    # The rows left once what is no blob went with its rows.
    rows: dict[Digest, BlobEntry] = {}
    for digest in index.least_recently_used():
        entry = index.get(digest)
        if entry is not None:
            rows[digest] = entry

    for digest in sorted(rows.keys() - files.keys(), key=str):
        _now(index.begin_removal([digest]))
        _now(index.end_removal([digest]))
        report.changes.append(Change(Action.DELETED, str(digest), "no file"))

    for digest, path in sorted(files.items(), key=lambda item: item[1]):
        try:
            verifies = _verifies(path, digest)
        except PermissionError:
            # Not damage: fsck runs as another user than blobserve.
            raise
        except OSError as e:
            _remove(report, root, path, f"cannot be read ({e})", index, digest)
            continue
        if not verifies:
            _remove(report, root, path, "does not verify", index, digest)
            continue
        report.verified += 1
        entry = rows.get(digest)
        if entry is None:
            size = _add_row(database, digest, path)
            report.changes.append(
                Change(Action.ADDED, str(digest), f"a file without one ({size} bytes)")
            )
            continue
        # The file verifies, so its size is the blob's: the row is wrong.
        size = path.stat().st_size
        if entry.size != size:
            _correct_size(database, digest, size)
            report.changes.append(
                Change(
                    Action.CORRECTED,
                    str(digest),
                    f"its size is {size} bytes, not the {entry.size} it said",
                )
            )


def check(root: Path, report: Report | None = None) -> Report:
    """
    Verify every blob of the store at C{root} and repair the store: remove
    what does not verify and what lies where no blob can be; rebuild an
    index that cannot be read, settle the rows a crash left between two
    states as blobserve does at start, delete rows without files, add rows
    for files without them, and correct sizes that disagree with their
    verified files. Downloads in progress (C{tmp/}) and whatever else the
    index holds are left alone.

    @param report: where to record the changes as they are made (a new one
        by default): if the check fails part way, it holds those made so far.
    @return: C{report}.
    @raise StoreLocked: if blobserve, or another fsck, uses the store.
    @raise StoreUnreadable: if the store cannot be read.
    @raise OSError: if a file cannot be read or changed.
    """
    if not (root / "blobs").is_dir():
        raise StoreUnreadable(f"{root} is not a blobserve store")
    lock = StoreLock.acquire(str(root), "blobserve-fsck")
    if report is None:
        report = Report()
    try:
        database = ImmediateDatabase(index_path(str(root)))
        index = StoreIndex(str(root), database, Clock())
        try:
            unsettled = _unsettled(database)
            loaded = _now(index.load())
            if loaded.rebuilt_because is not None:
                report.changes.append(
                    Change(
                        Action.REBUILT,
                        "the index from the files",
                        loaded.rebuilt_because,
                    )
                )
            else:
                _settled(report, unsettled, index)
            _repair(report, root, database, index)
        finally:
            _now(index.close())
        return report
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check and repair a store, and say what changed; the exit status is one of
    L{CLEAN}, L{CHANGED}, L{UNREADABLE} or L{IN_USE}.
    """
    parser = argparse.ArgumentParser(
        prog="blobserve-fsck",
        description="Re-hash every blob of a blobserve store, remove those"
        " that do not verify, and make the store's index agree with its files."
        " It refuses to run while blobserve uses the store.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("storage", type=Path, help="the --storage directory")
    arguments = parser.parse_args(argv)
    root: Path = arguments.storage
    report = Report()
    try:
        check(root, report)
    except StoreLocked as e:
        print(f"blobserve-fsck: {e}", file=sys.stderr)
        return IN_USE
    except (StoreUnreadable, OSError, sqlite3.Error) as e:
        # What was changed before it stopped is changed: say so.
        for change in report.changes:
            print(change)
        print(f"blobserve-fsck: {e}", file=sys.stderr)
        return UNREADABLE
    for change in report.changes:
        print(change)
    print(report.summary())
    return CHANGED if report.changes else CLEAN


if __name__ == "__main__":
    sys.exit(main())
