"""
blobserve-fsck: what verifies stays, what does not goes, the index is made to
agree with the files, every change is reported, and a store in use is left
alone.
"""

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from blobserve import fsck
from blobserve.digest import Digest
from blobserve.fsck import main
from blobserve.store.index import SCHEMA_VERSION, Origin
from blobserve.store.layout import blob_path, index_path
from blobserve.store.lock import StoreLock

from fakes import commit_blob, result_of, store_at

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def rows(root: Path, query: str = "SELECT digest, size, state FROM blobs") -> Any:
    connection = sqlite3.connect(index_path(str(root)))
    try:
        return sorted(connection.execute(query).fetchall())
    finally:
        connection.close()


def change(root: Path, statement: str, *parameters: Any) -> None:
    connection = sqlite3.connect(index_path(str(root)), isolation_level=None)
    try:
        connection.execute(statement, parameters)
    finally:
        connection.close()


def present(*blobs: bytes) -> list[tuple[str, int, str]]:
    """
    The rows of an index that holds C{blobs}, all present.
    """
    return sorted((str(Digest.of(data)), len(data), "present") for data in blobs)


def test_clean_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"one")
    commit_blob(store, b"two", MANIFEST_TYPE)
    before = rows(tmp_path, "SELECT * FROM blobs")
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == (
        "2 blobs verified, 0 removed, 0 changes to the index\n"
    )
    assert rows(tmp_path, "SELECT * FROM blobs") == before


def test_damaged_blobs_are_removed_with_their_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    good = commit_blob(store, b"good")
    truncated = commit_blob(store, b"truncated", "application/json")
    truncated.write_bytes(b"trunc")
    flipped = commit_blob(store, b"flipped")
    flipped.write_bytes(b"flipPed")
    stray = tmp_path / "blobs" / "sha256" / "zz"
    stray.mkdir()
    (stray / "not-a-digest").write_bytes(b"")

    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"removed {flipped.relative_to(tmp_path)}: does not verify\n" in out
    assert f"removed {truncated.relative_to(tmp_path)}: does not verify\n" in out
    assert "removed blobs/sha256/zz/not-a-digest: names no blob\n" in out
    assert out.endswith("1 blobs verified, 3 removed, 0 changes to the index\n")
    assert good.exists()
    assert not truncated.exists() and not flipped.exists()
    assert rows(tmp_path) == present(b"good")


def test_a_link_where_a_blob_belongs_is_removed_with_its_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    outside = tmp_path / "outside"
    outside.write_bytes(b"linked")
    path = commit_blob(store, b"linked")
    path.unlink()
    path.symlink_to(outside)

    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out == (
        f"removed {path.relative_to(tmp_path)}: is not a regular file\n"
        "0 blobs verified, 1 removed, 0 changes to the index\n"
    )
    assert not path.is_symlink()
    assert outside.exists()
    assert rows(tmp_path) == []


def test_rows_without_files_are_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"kept")
    commit_blob(store, b"gone").unlink()

    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out == (
        f"deleted row for {Digest.of(b'gone')}: no file\n"
        "1 blobs verified, 0 removed, 1 changes to the index\n"
    )
    assert rows(tmp_path) == present(b"kept")


def test_files_without_rows_are_added_if_they_verify_and_removed_if_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"indexed")
    unindexed = commit_blob(store, b"unindexed")
    change(tmp_path, "DELETE FROM blobs WHERE digest = ?", str(Digest.of(b"unindexed")))
    bad = Path(blob_path(str(tmp_path), Digest.of(b"bad")))
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not what it says")

    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"added row for {Digest.of(b'unindexed')}: a file without one (9 bytes)\n"
        in out
    )
    assert f"removed {bad.relative_to(tmp_path)}: does not verify\n" in out
    assert not bad.exists()
    assert rows(tmp_path) == present(b"indexed", b"unindexed")
    # As a rebuild of the index would: the file's time, no media type.
    [(committed_at, last_access, media_type)] = rows(
        tmp_path,
        "SELECT committed_at, last_access, media_type FROM blobs"
        f" WHERE digest = '{Digest.of(b'unindexed')}'",
    )
    assert committed_at == last_access == unindexed.stat().st_mtime
    assert media_type is None


def test_a_size_that_disagrees_with_a_verified_file_is_corrected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"twelve bytes", MANIFEST_TYPE)
    change(tmp_path, "UPDATE blobs SET size = 7")

    assert main([str(tmp_path)]) == 1
    assert (
        f"corrected row for {Digest.of(b'twelve bytes')}: its size is 12 bytes,"
        " not the 7 it said\n" in capsys.readouterr().out
    )
    assert rows(tmp_path, "SELECT size, media_type, state FROM blobs") == [
        (12, MANIFEST_TYPE, "present")
    ]


def test_rows_a_crash_left_are_settled_as_blobserve_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    # A commit that wrote its row and crashed before the rename...
    unrenamed = Digest.of(b"never renamed")
    result_of(store.index.begin_commit(unrenamed, 13, None))
    # ...one that crashed after it...
    renamed = commit_blob(store, b"renamed")
    change(tmp_path, "UPDATE blobs SET state = 'committing'")
    # ...and a removal that crashed before the file went.
    evicted = commit_blob(store, b"evicted")
    result_of(store.index.begin_removal([Digest.of(b"evicted")]))

    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"settled row for {unrenamed}: its commit had not finished: deleted,"
        " and its file if any\n" in out
    )
    assert (
        f"settled row for {Digest.of(b'renamed')}: its commit had finished: kept\n"
        in out
    )
    assert (
        f"settled row for {Digest.of(b'evicted')}: its removal had begun:"
        " deleted, and its file\n" in out
    )
    assert renamed.exists()
    assert not evicted.exists()
    assert rows(tmp_path) == present(b"renamed")


@pytest.mark.parametrize(
    ("damage", "because"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:100]), "it was damaged"),
        (lambda path: path.write_bytes(b"not a database" * 100), "it was damaged"),
        (lambda path: path.unlink(), "there was none"),
    ],
    ids=["truncated", "garbage", "missing"],
)
def test_a_damaged_or_missing_index_is_rebuilt_from_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, because: str
) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"one")
    commit_blob(store, b"two")
    result_of(store.index.close())
    for suffix in ("-wal", "-shm"):
        Path(index_path(str(tmp_path)) + suffix).unlink(missing_ok=True)
    damage(Path(index_path(str(tmp_path))))

    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"rebuilt the index from the files: {because}")
    assert out.endswith("2 blobs verified, 0 removed, 1 changes to the index\n")
    assert rows(tmp_path) == present(b"one", b"two")


def test_an_index_of_a_newer_blobserve_is_left_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    damaged = commit_blob(store, b"damaged")
    damaged.write_bytes(b"damage")
    change(tmp_path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    assert main([str(tmp_path)]) == 2
    assert "newer blobserve" in capsys.readouterr().err
    assert rows(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert rows(tmp_path) == [(str(Digest.of(b"damaged")), 7, "present")]
    assert damaged.exists()


def test_downloads_in_progress_and_unknown_tables_are_left_alone(
    tmp_path: Path,
) -> None:
    # Unfinished downloads, and what a later blobserve keeps, are none of
    # fsck's business: it neither reads their files nor their rows.
    store = store_at(str(tmp_path))
    commit_blob(store, b"committed")
    digest = Digest.of(b"partial")
    temporary = store.create_temporary(digest, Origin("docker.io", "x", 7, None))
    temporary.write(b"part")
    store.keep_partial(temporary)
    partial = Path(temporary.path)
    change(tmp_path, "CREATE TABLE later (key TEXT PRIMARY KEY, value INTEGER)")
    change(tmp_path, "INSERT INTO later VALUES ('x', 7)")

    assert main([str(tmp_path)]) == 0
    assert partial.read_bytes() == b"part"
    assert rows(tmp_path, "SELECT digest, written FROM partials") == [(str(digest), 4)]
    assert rows(tmp_path, "SELECT * FROM later") == [("x", 7)]


def test_the_next_start_finds_the_store_consistent(tmp_path: Path) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"kept", MANIFEST_TYPE)
    commit_blob(store, b"gone").unlink()
    commit_blob(store, b"bad").write_bytes(b"bat")
    change(tmp_path, "DELETE FROM blobs WHERE digest = ?", str(Digest.of(b"kept")))
    assert main([str(tmp_path)]) == 1

    index = store_at(str(tmp_path)).index
    assert list(index.least_recently_used()) == [Digest.of(b"kept")]
    assert main([str(tmp_path)]) == 0


def test_a_store_in_use_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_at(str(tmp_path))
    damaged = commit_blob(store, b"damaged")
    damaged.write_bytes(b"damage")
    server = StoreLock.acquire(str(tmp_path), "blobserve")
    try:
        assert main([str(tmp_path)]) == 3
    finally:
        server.release()
    out, err = capsys.readouterr()
    assert out == ""
    assert f"the store {tmp_path} is in use by blobserve" in err
    assert damaged.exists()
    assert rows(tmp_path) == [(str(Digest.of(b"damaged")), 7, "present")]


def test_fsck_lets_the_store_go_when_it_is_done(tmp_path: Path) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"one").write_bytes(b"two")
    assert main([str(tmp_path)]) == 1
    StoreLock.acquire(str(tmp_path), "blobserve").release()


def test_changes_made_before_a_failure_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"gone").unlink()
    commit_blob(store, b"unreadable")

    def refused(path: Path, digest: Digest) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fsck, "_verifies", refused)
    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == f"deleted row for {Digest.of(b'gone')}: no file\n"
    assert "Permission denied" in err
    # Not taken for damage: the file stays.
    assert Path(blob_path(str(tmp_path), Digest.of(b"unreadable"))).exists()
    StoreLock.acquire(str(tmp_path), "blobserve").release()


def test_not_a_store(tmp_path: Path) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()


def test_help_gives_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for status in "0123":
        assert f"\n  {status}  " in out
