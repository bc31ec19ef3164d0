"""
C{blobserve-fsck STORAGE}: re-hash every committed blob, remove those that do
not verify, and report.

Run it while blobserve is stopped, or on a store it does not write to: a
damaged cache then repairs itself (the next request fetches the blob again)
instead of serving a broken layer forever.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from attrs import define, field

from blobserve.digest import SUPPORTED_ALGORITHMS, Digest, InvalidDigest

_READ_SIZE = 1024 * 1024


@define
class Report:
    """
    What a check found: how many blobs verified, and what was removed.
    """

    verified: int = 0
    removed: list[str] = field(factory=list)


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


def check(root: Path) -> Report:
    """
    Verify every blob of the store at C{root}; remove what fails, what lies
    where no digest can be, and the records of removed blobs.
    """
    report = Report()
    for path, digest in _entries(root):
        if digest is not None and path.is_file() and not path.is_symlink():
            try:
                if _verifies(path, digest):
                    report.verified += 1
                    continue
            except OSError:
                pass
        report.removed.append(str(path.relative_to(root)))
        path.unlink()
        if digest is not None:
            record = root / "records" / digest.algorithm / digest.hex[:2]
            (record / digest.hex).unlink(missing_ok=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check a store; exit 0 if everything verified, 1 if something was removed,
    2 if the store cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="blobserve-fsck",
        description="Re-hash every blob of a blobserve store and remove those"
        " that do not verify.",
    )
    parser.add_argument("storage", type=Path, help="the --storage directory")
    arguments = parser.parse_args(argv)
    root: Path = arguments.storage
    if not (root / "blobs").is_dir():
        print(f"blobserve-fsck: {root} is not a blobserve store", file=sys.stderr)
        return 2
    try:
        report = check(root)
    except OSError as e:
        print(f"blobserve-fsck: {e}", file=sys.stderr)
        return 2
    for removed in report.removed:
        print(f"removed {removed}: does not verify")
    print(f"{report.verified} blobs verified, {len(report.removed)} removed")
    return 1 if report.removed else 0


if __name__ == "__main__":
    sys.exit(main())
