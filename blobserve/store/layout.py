"""
Where things lie in a store's directory.

Committed blobs at C{ROOT/blobs/<algorithm>/<first two hex>/<hex>};
downloads in progress in C{ROOT/tmp/}, on the same file system, so that a
commit is a rename; the index at C{ROOT/index.sqlite}; the name of the
process that holds the store's lock (see L{blobserve.store.lock}) in
C{ROOT/lock}.
"""

from __future__ import annotations

import os

from blobserve.digest import Digest


def blobs_directory(root: str) -> str:
    return os.path.join(root, "blobs")


def temporary_directory(root: str) -> str:
    return os.path.join(root, "tmp")


def blob_path(root: str, digest: Digest) -> str:
    """
    Where the committed blob C{digest} of the store at C{root} lies.
    """
    return os.path.join(
        blobs_directory(root), digest.algorithm, digest.hex[:2], digest.hex
    )


def index_path(root: str) -> str:
    """
    The store's SQLite index: safe to delete while blobserve is stopped (it
    is rebuilt from the files at the next start).
    """
    return os.path.join(root, "index.sqlite")


def lock_path(root: str) -> str:
    """
    Where the holder of the store's lock writes its name, for whoever the
    lock refuses. The lock itself is on C{root}.
    """
    return os.path.join(root, "lock")


def records_directory(root: str) -> str:
    """
    Where the store's earlier layout kept each blob's size and media type;
    migrated into the index once, then removed.
    """
    return os.path.join(root, "records")
