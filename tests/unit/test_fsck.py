"""
blobserve-fsck: what verifies stays, what does not goes.
"""

from pathlib import Path

import pytest

from blobserve.digest import Digest
from blobserve.fsck import main

from fakes import commit_blob, store_at


def test_clean_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = store_at(str(tmp_path))
    commit_blob(store, b"one")
    commit_blob(store, b"two", "application/vnd.oci.image.manifest.v1+json")
    assert main([str(tmp_path)]) == 0
    assert "2 blobs verified, 0 removed" in capsys.readouterr().out


def test_damaged_blobs_are_removed(
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
    assert "1 blobs verified, 3 removed" in out
    assert good.exists()
    assert not truncated.exists() and not flipped.exists()
    assert store.open(Digest.of(b"truncated")) is None
    assert store.media_type(Digest.of(b"truncated")) is None


def test_not_a_store(tmp_path: Path) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
