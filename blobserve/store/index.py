"""
L{StoreIndex}: what the store holds, kept in an SQLite database beside the
blobs (the one source of truth) and mirrored in memory, so that a hit never
waits for the database.

The database changes in transactions on its own thread (L{IDatabase}); the
memory changes at once, in the reactor thread. Accesses are remembered in
memory and written in batches. A blob's row goes through states that a crash
cannot leave wrong: C{committing} before its file is renamed into place and
C{present} after the rename is durable; C{evicting} before its file is
removed, and no row after. At start, rows left C{committing} are checked
against their files and rows left C{evicting} finished, so an intact index
never needs a walk of the store.

Downloads that have not ended have a row too (a I{partial}), from the moment
their temporary file is created until their blob is committed or they fail
for good: after a stop or a crash, the next run resumes them from the bytes
on disk.

Which repositories of which registries are known to hold each blob (the
upstream said so: it served the blob for that repository, or answered a
C{HEAD} for it) is kept too, in memory for the hit path and in the database
for the next run; a blob's repositories go with the blob.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from blobserve.digest import Digest, InvalidDigest
from blobserve.oneshot import OneShotEvent
from blobserve.store.database import IDatabase
from blobserve.store.layout import blob_path, blobs_directory, records_directory

log = Logger()

#: The schema this code reads and writes (SQLite's C{user_version}).
SCHEMA_VERSION = 3

#: The statements that bring a database of version N to version N + 1.
MIGRATIONS: dict[int, list[str]] = {
    0: [
        """
        CREATE TABLE blobs (
            digest TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            media_type TEXT,
            committed_at REAL NOT NULL,
            last_access REAL NOT NULL,
            access_count INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL
        )
        """,
        "CREATE INDEX blobs_by_last_access ON blobs (last_access)",
        """
        CREATE TABLE repositories (
            registry TEXT NOT NULL,
            repository TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (registry, repository, digest)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )
        """,
    ],
    1: [
        # Downloads that have not ended, by digest (one download per digest
        # at a time). The file's size, not `written`, says how much of the
        # blob is on disk after a crash.
        """
        CREATE TABLE partials (
            digest TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            written INTEGER NOT NULL,
            registry TEXT,
            repository TEXT NOT NULL,
            expected_length INTEGER,
            etag TEXT,
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    ],
    2: [
        # Until version 3 every request that a blob was served for added
        # its repository, whether the upstream had confirmed that the
        # repository holds it or not: none of those rows can be trusted.
        "DELETE FROM repositories",
        "CREATE INDEX repositories_by_digest ON repositories (digest)",
    ],
}

#: Seconds between two writes of the accesses remembered in memory.
FLUSH_INTERVAL = 5.0

_COMMITTING, _PRESENT, _EVICTING = "committing", "present", "evicting"
_NO_INDEX = "there was none"


class IndexDamaged(Exception):
    """
    The index cannot be read: it is not a database, fails its integrity
    check, or was written by a newer blobserve.
    """


@define
class BlobEntry:
    """
    What the index knows of one committed blob.
    """

    size: int
    media_type: str | None
    committed_at: float
    last_access: float
    access_count: int = 0


@frozen
class Origin:
    """
    Where a download comes from, as a later run needs to know it.

    @ivar registry: the registry, as C{--upstream} names it (L{None} if not
        known).
    @ivar repository: the repository it was asked for in.
    @ivar expected_length: the blob's size, if the upstream declared it.
    @ivar etag: the upstream's C{ETag}, if it sent one.
    """

    registry: str | None
    repository: str
    expected_length: int | None = None
    etag: str | None = None


@define
class PartialEntry:
    """
    What the index knows of one download that has not ended.

    @ivar name: its temporary file's name in the store's C{tmp/}.
    @ivar written: how many bytes were on disk when it was last recorded; the
        file's size is the truth (after a crash it is all there is).
    @ivar started_at: when the download began.
    @ivar updated_at: when C{written} was last recorded.
    """

    name: str
    origin: Origin
    started_at: float
    updated_at: float
    written: int = 0


@frozen
class LoadReport:
    """
    How the index came up: read as it was, or rebuilt from the files (and
    why), with how many blobs it holds and how long it took.
    """

    blobs: int
    seconds: float
    rebuilt_because: str | None = None
    migrated_records: bool = False


def _schema_version(connection: sqlite3.Connection) -> int:
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(connection: sqlite3.Connection) -> None:
    """
    Bring the database to L{SCHEMA_VERSION}, one step at a time.

    @raise IndexDamaged: if it was written by a newer blobserve.
    """
    version = _schema_version(connection)
    if version > SCHEMA_VERSION:
        raise IndexDamaged(f"schema version {version} is newer than this blobserve")
    while version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            connection.execute(statement)
        version += 1
        # PRAGMA takes no parameters; version is an int of ours.
        connection.execute(f"PRAGMA user_version = {version:d}")


def _check(connection: sqlite3.Connection) -> None:
    try:
        result = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise IndexDamaged(str(e)) from None
    if result != "ok":
        raise IndexDamaged(f"integrity check: {result}")


def _blob_files(root: str) -> Iterator[tuple[Digest, os.stat_result]]:
    """
    The committed blob files under C{root/blobs}, by digest.
    """
    blobs = blobs_directory(root)
    for algorithm in sorted(os.listdir(blobs)):
        for prefix in sorted(os.listdir(os.path.join(blobs, algorithm))):
            directory = os.path.join(blobs, algorithm, prefix)
            if not os.path.isdir(directory):
                continue
            for entry in os.scandir(directory):
                try:
                    digest = Digest.parse(f"{algorithm}:{entry.name}")
                except InvalidDigest:
                    continue
                if entry.name[:2] == prefix and entry.is_file(follow_symlinks=False):
                    yield digest, entry.stat(follow_symlinks=False)


def _old_record(root: str, digest: Digest) -> dict[str, Any]:
    """
    What the store's earlier layout recorded of a blob in C{records/}.
    """
    path = os.path.join(
        records_directory(root), digest.algorithm, digest.hex[:2], digest.hex
    )
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def rebuild(connection: sqlite3.Connection, root: str) -> int:
    """
    Fill an empty index from the blob files under C{root}: sizes from the
    files, media types from the earlier layout's records where there are
    some. A file whose record says another size is removed.

    @return: how many blobs the index holds now.
    """
    count = 0
    for digest, stat in _blob_files(root):
        record = _old_record(root, digest)
        if "size" in record and record["size"] != stat.st_size:
            os.unlink(blob_path(root, digest))
            continue
        media_type = record.get("media_type")
        connection.execute(
            "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, 0, ?)",
            (
                str(digest),
                stat.st_size,
                media_type if isinstance(media_type, str) else None,
                stat.st_mtime,
                stat.st_mtime,
                _PRESENT,
            ),
        )
        count += 1
    return count


def _settle(connection: sqlite3.Connection, root: str) -> None:
    """
    Finish what a crash interrupted: commits whose file is in place are
    present, others are forgotten; evictions are carried out.
    """
    for digest, size, state in connection.execute(
        "SELECT digest, size, state FROM blobs WHERE state != ?", (_PRESENT,)
    ).fetchall():
        try:
            path = blob_path(root, Digest.parse(digest))
        except InvalidDigest:
            raise IndexDamaged(f"a row names no digest: {digest!r}") from None
        try:
            on_disk = os.stat(path).st_size
        except FileNotFoundError:
            on_disk = None
        if state == _COMMITTING and on_disk == size:
            connection.execute(
                "UPDATE blobs SET state = ? WHERE digest = ?", (_PRESENT, digest)
            )
            continue
        if on_disk is not None:
            os.unlink(path)
        connection.execute("DELETE FROM blobs WHERE digest = ?", (digest,))


def _partial_rows(
    connection: sqlite3.Connection,
) -> list[tuple[Digest, PartialEntry]]:
    """
    The unfinished downloads the index holds; a row that names no digest is
    deleted (its file, if any, is then removed as a stray temporary).
    """
    partials = []
    for digest, name, written, *origin, started_at, updated_at in connection.execute(
        "SELECT digest, name, written, registry, repository, expected_length,"
        " etag, started_at, updated_at FROM partials"
    ).fetchall():
        try:
            parsed = Digest.parse(digest)
        except InvalidDigest:
            connection.execute("DELETE FROM partials WHERE digest = ?", (digest,))
            continue
        partials.append(
            (
                parsed,
                PartialEntry(name, Origin(*origin), started_at, updated_at, written),
            )
        )
    return partials


def _repository_rows(
    connection: sqlite3.Connection,
) -> list[tuple[Digest, str, str]]:
    """
    The repositories known to hold each stored blob; rows of blobs the
    store no longer holds (a download that was answered but never
    committed) are deleted.
    """
    connection.execute(
        "DELETE FROM repositories WHERE digest NOT IN (SELECT digest FROM blobs)"
    )
    repositories = []
    for registry, repository, digest in connection.execute(
        "SELECT registry, repository, digest FROM repositories"
    ).fetchall():
        try:
            repositories.append((Digest.parse(digest), registry, repository))
        except InvalidDigest:
            raise IndexDamaged(f"a row names no digest: {digest!r}") from None
    return repositories


class StoreIndex:
    """
    The committed blobs of one store: in memory for the reactor, in an
    SQLite database for good.

    Until L{load} has fired, the index is not L{ready}: it knows nothing, and
    the store looks at its files instead.
    """

    def __init__(self, root: str, database: IDatabase, clock: IReactorTime) -> None:
        self._root = root
        self._database = database
        self._clock = clock
        # Least recently used first.
        self._entries: OrderedDict[Digest, BlobEntry] = OrderedDict()
        self._touched: set[Digest] = set()
        # The repositories known to hold each digest, by (registry,
        # repository); and those not written yet.
        self._repositories: dict[Digest, set[tuple[str, str]]] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self._removed_while_loading: set[Digest] = set()
        self._partials: dict[Digest, PartialEntry] = {}
        # Partials recorded or forgotten while the index loads: what it
        # reads of them is older.
        self._partials_added_while_loading: set[Digest] = set()
        self._partials_removed_while_loading: set[tuple[Digest, str]] = set()
        self._partials_known: OneShotEvent[None] = OneShotEvent()
        self._flushing = LoopingCall(self.flush)
        self._flushing.clock = clock
        self.ready = False
        #: The total size of the blobs the index holds.
        self.size = 0

    # Start and stop.

    def load(self) -> Deferred[LoadReport]:
        """
        Read the index, or rebuild it from the files if it is missing or
        damaged (an index of the earlier layout's C{records/} is built from
        them, and they are removed), and bring it into memory.

        @return: fires with how it went; the index is L{ready} then.
        """
        started = time.monotonic()

        def read(
            connection: sqlite3.Connection,
        ) -> tuple[
            list[tuple[Digest, BlobEntry]],
            list[tuple[Digest, PartialEntry]],
            list[tuple[Digest, str, str]],
            str | None,
        ]:
            fresh = _schema_version(connection) == 0
            _check(connection)
            migrate(connection)
            if fresh:
                return [], [], [], _NO_INDEX
            _settle(connection, self._root)
            return (
                self._rows(connection),
                _partial_rows(connection),
                _repository_rows(connection),
                None,
            )

        def rebuilt(connection: sqlite3.Connection) -> list[tuple[Digest, BlobEntry]]:
            migrate(connection)
            rebuild(connection, self._root)
            return self._rows(connection)

        async def run() -> LoadReport:
            try:
                rows, partials, repositories, because = await self._database.run(read)
            except (IndexDamaged, sqlite3.DatabaseError) as e:
                rows, partials, because = [], [], f"it was damaged ({e})"
                repositories = []
                self._fill_partials([])
                await self._database.reset()
            except BaseException:
                self._fill_partials([])
                raise
            self._fill_partials(partials)
            records = records_directory(self._root)
            migrating = os.path.isdir(records)
            if because is not None:
                rebuilding = time.monotonic()
                rows = await self._database.run(rebuilt)
                # A new store has no index yet, and nothing to rebuild it
                # from: no reason for a warning.
                emit = log.info if because == _NO_INDEX and not rows else log.warn
                emit(
                    "built the store index from its files ({why}): {blobs} blobs"
                    " in {seconds:.2f}s",
                    why=because,
                    blobs=len(rows),
                    seconds=time.monotonic() - rebuilding,
                )
                # What this run recorded before a damaged index was reset.
                for digest, entry in list(self._partials.items()):
                    self._insert_partial(digest, entry)
            self._fill(rows, repositories)
            if migrating:
                shutil.rmtree(records, ignore_errors=True)
            report = LoadReport(
                len(self._entries),
                time.monotonic() - started,
                because,
                migrating,
            )
            log.info(
                "store index: {blobs} blobs, {size} bytes, ready in {seconds:.2f}s",
                blobs=report.blobs,
                size=self.size,
                seconds=report.seconds,
            )
            self._flushing.start(FLUSH_INTERVAL, now=False)
            return report

        return Deferred.fromCoroutine(run())

    def close(self) -> Deferred[None]:
        """
        Write what is remembered in memory, and close the database.
        """
        if self._flushing.running:
            self._flushing.stop()
        d = self.flush()
        d.addBoth(lambda _: self._database.close())
        return d

    @staticmethod
    def _rows(connection: sqlite3.Connection) -> list[tuple[Digest, BlobEntry]]:
        rows = []
        for digest, *entry in connection.execute(
            "SELECT digest, size, media_type, committed_at, last_access,"
            " access_count FROM blobs ORDER BY last_access"
        ):
            try:
                rows.append((Digest.parse(digest), BlobEntry(*entry)))
            except InvalidDigest:
                raise IndexDamaged(f"a row names no digest: {digest!r}") from None
        return rows

    def _fill_partials(self, partials: list[tuple[Digest, PartialEntry]]) -> None:
        if self._partials_known.happened:
            return
        # Downloads recorded or forgotten since the index was read stand.
        for digest, partial in partials:
            if (
                digest not in self._partials_added_while_loading
                and (digest, partial.name) not in self._partials_removed_while_loading
            ):
                self._partials[digest] = partial
        self._partials_added_while_loading.clear()
        self._partials_removed_while_loading.clear()
        self._partials_known.succeed_with(None)

    def _fill(
        self,
        rows: list[tuple[Digest, BlobEntry]],
        repositories: list[tuple[Digest, str, str]],
    ) -> None:
        # Commits and removals while the index loaded are newer than what it
        # read: they stand.
        added = dict(self._entries)
        self._entries.clear()
        for digest, entry in rows:
            if digest not in added and digest not in self._removed_while_loading:
                self._entries[digest] = entry
        self._entries.update(added)
        for digest, registry, repository in repositories:
            if digest not in self._removed_while_loading:
                self._repositories.setdefault(digest, set()).add((registry, repository))
        self._removed_while_loading.clear()
        self.size = sum(entry.size for entry in self._entries.values())
        self.ready = True

    # What the reactor asks, at once.

    def get(self, digest: Digest) -> BlobEntry | None:
        """
        What the index knows of the committed blob C{digest}, if anything.
        """
        return self._entries.get(digest)

    def __len__(self) -> int:
        return len(self._entries)

    def least_recently_used(self) -> Iterator[Digest]:
        """
        The blobs, least recently used first.
        """
        return iter(list(self._entries))

    def touch(self, digest: Digest) -> None:
        """
        Remember that C{digest} was read now; it is written with the next
        batch.
        """
        entry = self._entries.get(digest)
        if entry is None:
            return
        entry.last_access = self._clock.seconds()
        entry.access_count += 1
        self._entries.move_to_end(digest)
        self._touched.add(digest)

    def saw(self, registry: str, repository: str, digest: Digest) -> None:
        """
        Remember that repository C{repository} of C{registry} holds C{digest}
        (L{holds} says so at once); it is written with the next batch. Only
        what the upstream said belongs here.
        """
        seen = self._repositories.setdefault(digest, set())
        if (registry, repository) not in seen:
            seen.add((registry, repository))
            self._seen.add((registry, repository, str(digest)))

    def holds(self, registry: str, repository: str, digest: Digest) -> bool:
        """
        Whether repository C{repository} of C{registry} is known to hold
        C{digest}: L{saw} said so, in this run or, for a blob still stored,
        in an earlier one.
        """
        return (registry, repository) in self._repositories.get(digest, ())

    # Changes, durable when their Deferred fires.

    def begin_commit(
        self, digest: Digest, size: int, media_type: str | None
    ) -> Deferred[None]:
        """
        Say that C{digest} is about to be renamed into the store.
        """
        now = self._clock.seconds()

        def insert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, 0, ?)",
                (str(digest), size, media_type, now, now, _COMMITTING),
            )

        return self._database.run(insert)

    def add(self, digest: Digest, size: int, media_type: str | None) -> None:
        """
        Make the blob C{digest}, just renamed into the store, known.
        """
        now = self._clock.seconds()
        old = self._entries.pop(digest, None)
        if old is not None:
            self.size -= old.size
        self._entries[digest] = BlobEntry(size, media_type, now, now)
        self.size += size

    def end_commit(self, digest: Digest) -> Deferred[None]:
        """
        Say that the rename of C{digest} into the store is durable.
        """
        return self._set_state([digest], _PRESENT)

    def begin_removal(self, digests: list[Digest]) -> Deferred[None]:
        """
        Forget C{digests} now, and say durably that their files are to go: if
        the process ends before L{end_removal}, the next start removes them.
        """
        for digest in digests:
            entry = self._entries.pop(digest, None)
            if entry is not None:
                self.size -= entry.size
            self._touched.discard(digest)
            # Its repositories go with it: the next time the blob is
            # fetched, the repository it is fetched for is recorded anew.
            self._forget_repositories(digest)
            if not self.ready:
                self._removed_while_loading.add(digest)
        return self._set_state(digests, _EVICTING)

    def _forget_repositories(self, digest: Digest) -> None:
        seen = self._repositories.pop(digest, set())
        for registry, repository in seen:
            self._seen.discard((registry, repository, str(digest)))

    def end_removal(self, digests: list[Digest]) -> Deferred[None]:
        """
        Say that the files of C{digests} are gone.
        """
        rows = [(str(d),) for d in digests]

        def delete(connection: sqlite3.Connection) -> None:
            connection.executemany("DELETE FROM blobs WHERE digest = ?", rows)
            connection.executemany("DELETE FROM repositories WHERE digest = ?", rows)

        return self._database.run(delete)

    def _set_state(self, digests: list[Digest], state: str) -> Deferred[None]:
        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE blobs SET state = ? WHERE digest = ?",
                [(state, str(d)) for d in digests],
            )

        return self._database.run(update)

    def record_settings(self, settings: dict[str, str]) -> Deferred[None]:
        """
        Keep C{settings} (such as the configured limits) in the index, where
        tools that read the store find them.
        """

        def write(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "INSERT OR REPLACE INTO settings VALUES (?, ?)", settings.items()
            )

        return self._database.run(write)

    # Downloads that have not ended.

    def when_partials_known(self) -> Deferred[None]:
        """
        Fire once L{load} has read the unfinished downloads: soon after it
        begins, before any rebuild (which finds none), and also if it fails.
        Until then, L{partial} knows only those of this run.
        """
        return self._partials_known.observe()

    def partial(self, digest: Digest) -> PartialEntry | None:
        """
        What the index knows of an unfinished download of C{digest}, if any.
        """
        return self._partials.get(digest)

    def partials(self) -> Mapping[Digest, PartialEntry]:
        """
        The unfinished downloads, by digest (a read-only view).
        """
        return MappingProxyType(self._partials)

    def add_partial(self, digest: Digest, name: str, origin: Origin) -> Deferred[None]:
        """
        Record a download of C{digest} from C{origin} that has just created
        its temporary file C{name}, in place of any earlier one of the same
        digest.
        """
        now = self._clock.seconds()
        entry = self._partials[digest] = PartialEntry(name, origin, now, now)
        if not self._partials_known.happened:
            self._partials_added_while_loading.add(digest)
        return self._insert_partial(digest, entry)

    def _insert_partial(self, digest: Digest, entry: PartialEntry) -> Deferred[None]:
        origin = entry.origin
        row = (
            str(digest),
            entry.name,
            entry.written,
            origin.registry,
            origin.repository,
            origin.expected_length,
            origin.etag,
            entry.started_at,
            entry.updated_at,
        )

        def insert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO partials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        return self._logged(self._database.run(insert), "record", digest)

    def update_partial(self, digest: Digest, name: str, written: int) -> Deferred[None]:
        """
        Record that the unfinished download of C{digest} in the file C{name}
        has C{written} bytes on disk.
        """
        entry = self._partials.get(digest)
        if entry is None or entry.name != name:
            return succeed(None)
        entry.written = written
        entry.updated_at = now = self._clock.seconds()

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE partials SET written = ?, updated_at = ?"
                " WHERE digest = ? AND name = ?",
                (written, now, str(digest), name),
            )

        return self._logged(self._database.run(update), "record", digest)

    def remove_partial(self, digest: Digest, name: str) -> Deferred[None]:
        """
        Forget the unfinished download of C{digest} in the file C{name}: it
        was committed, failed for good, or its file is gone. Nothing happens
        if the download recorded for C{digest} has another file.
        """
        entry = self._partials.get(digest)
        if entry is not None and entry.name == name:
            del self._partials[digest]
        elif self._partials_known.happened:
            return succeed(None)
        else:
            # It may be one the index has not read yet.
            self._partials_removed_while_loading.add((digest, name))

        def delete(connection: sqlite3.Connection) -> None:
            connection.execute(
                "DELETE FROM partials WHERE digest = ? AND name = ?",
                (str(digest), name),
            )

        return self._logged(self._database.run(delete), "forget", digest)

    @staticmethod
    def _logged(d: Deferred[None], what: str, digest: Digest) -> Deferred[None]:
        d.addErrback(
            lambda reason: log.failure(
                "could not {what} the partial download of {digest}",
                reason,
                what=what,
                digest=str(digest),
            )
        )
        return d

    def flush(self) -> Deferred[None]:
        """
        Write the accesses and repositories remembered since the last batch.
        """
        touched = [
            (entry.last_access, entry.access_count, str(digest))
            for digest in self._touched
            if (entry := self._entries.get(digest)) is not None
        ]
        seen = list(self._seen)
        self._touched.clear()
        self._seen.clear()

        def write(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE blobs SET last_access = ?, access_count = ? WHERE digest = ?",
                touched,
            )
            connection.executemany(
                "INSERT OR IGNORE INTO repositories VALUES (?, ?, ?)", seen
            )

        d = self._database.run(write)
        d.addErrback(lambda reason: log.failure("could not write accesses", reason))
        return d
