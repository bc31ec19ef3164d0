"""
How long a commit takes, with and without the eviction it sets off:
C{python -m bench.commits DIR --blobs N --size BYTES [--limit-blobs K]}
prints one JSON object.

The store runs as it does in blobserve, on a real reactor: its index on a
thread of its own, the fsync and unlink calls in the reactor's thread pool.
Each blob is written to its temporary file before the clock starts; a
commit is timed from C{commit()} to its Deferred firing (file fsync,
index row, rename, directory fsync, index row), and with eviction until the
eviction it set off is done too (index rows, unlinks, index rows). With
C{--limit-blobs K} the store may hold K blobs (C{--max-size}), so once full
a commit evicts whenever the store is past K (then down to 95 % of it);
only the commits of the second half of the run, on a full store, are
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from blobserve.digest import Digest
from blobserve.store.database import ThreadedDatabase
from blobserve.store.eviction import Evictor
from blobserve.store.files import DirectoryBlobStore
from blobserve.store.index import StoreIndex
from blobserve.store.layout import index_path


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(
    reactor: Any, directory: str, blobs: int, size: int, limit_blobs: int
) -> dict[str, Any]:
    database = ThreadedDatabase(index_path(directory), reactor)
    database.start()
    index = StoreIndex(directory, database, reactor)
    store = DirectoryBlobStore(directory, index)
    evictor = Evictor(store, max_size=limit_blobs * size or None)
    await index.load()
    base = os.urandom(size)
    commits: list[float] = []
    settled: list[float] = []
    evicting: list[float] = []
    for n in range(blobs):
        data = n.to_bytes(8, "big") + base[8:]
        temporary = store.create_temporary(Digest.of(data))
        temporary.write(data)
        evictions = evictor.evictions
        started = time.perf_counter()
        await store.commit(temporary)
        committed = time.perf_counter()
        # Queued behind the eviction the commit set off, if any.
        await evictor.make_room()
        done = time.perf_counter()
        temporary.close()
        if n >= blobs // 2:
            commits.append(committed - started)
            settled.append(done - started)
            if evictor.evictions > evictions:
                evicting.append(done - committed)
    await index.close()
    return {
        "size_kib": size // 1024,
        "limit_blobs": limit_blobs or "",
        "commits": len(commits),
        "commit_p50_ms": round(percentile(commits, 0.5) * 1000, 2),
        "commit_p99_ms": round(percentile(commits, 0.99) * 1000, 2),
        "with_eviction_p50_ms": round(percentile(settled, 0.5) * 1000, 2),
        "with_eviction_p99_ms": round(percentile(settled, 0.99) * 1000, 2),
        "evicting_commits": len(evicting),
        "eviction_mean_ms": round(sum(evicting) / len(evicting) * 1000, 2)
        if evicting
        else "",
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.commits", description=__doc__
    )
    parser.add_argument("directory", help="an empty directory for the store")
    parser.add_argument("--blobs", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024 * 1024, help="bytes")
    parser.add_argument(
        "--limit-blobs", type=int, default=0, help="--max-size, in blobs; 0: none"
    )
    arguments = parser.parse_args(argv)

    async def run(reactor: Any) -> None:
        result = await measure(
            reactor,
            arguments.directory,
            arguments.blobs,
            arguments.size,
            arguments.limit_blobs,
        )
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
