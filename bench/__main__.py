"""
Run the benchmark: C{python -m bench [--smoke] [--sizes 256,1024] ...}.

Everything runs on loopback; every server is started for one scenario and
stopped by its PID. The upstream is Debian's docker-registry behind nginx
with a per-connection C{limit_rate}, so the upstream is the slow link; the
throttle's access log tells how many GETs and bytes each system asked of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench import load, servers

MiB = 1024 * 1024
GiB = 1024 * MiB
CACHES: dict[str, Callable[[Path, str], tuple[servers.Server, str]]] = {
    "blobserve": servers.blobserve,
    "registry-proxy": lambda here, upstream: servers.registry(here, proxy_of=upstream),
    "nginx-cache": servers.caching_proxy,
    # The C caches issue 14's targets compare blobserve with.
    "varnish": servers.varnish,
    "trafficserver": servers.trafficserver,
    # blobserve counting nothing and logging no line per request: what the
    # metrics and the access log cost, when run beside "blobserve".
    "blobserve-quiet": lambda here, upstream: servers.blobserve(
        here, upstream, "--no-metrics", "--no-access-log"
    ),
    # blobserve fetching every blob over one connection: what segmented
    # fetch changes, when run beside "blobserve".
    "blobserve-single": lambda here, upstream: servers.blobserve(
        here, upstream, "--upstream-segments=1"
    ),
    # blobserve fetching an image's layers as soon as its manifest is served;
    # the image scenario runs it beside "blobserve".
    "blobserve-prefetch": lambda here, upstream: servers.blobserve(
        here, upstream, "--prefetch-layers"
    ),
}

#: The systems a run compares unless told otherwise. Not Traffic Server:
#: a client that asks and never reads holds up the clients after it until
#: its 30 s inactivity timeout, and they get cut-off bodies (the stalled
#: scenario), which would fail every smoke run.
DEFAULT_SYSTEMS = ("blobserve", "registry-proxy", "nginx-cache", "varnish")

#: The image scenario's layers, in the manifest's order: the big ones last,
#: as in most images; 472 MiB in all. The smoke run's are 64 to 512 KiB.
IMAGE_LAYERS_MIB = (4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 96, 128)
SMOKE_IMAGE_LAYERS_KIB = (64, 64, 96, 96, 128, 128, 192, 192, 256, 256, 384, 512)
IMAGE = "bench/image"


def wrong_bodies(
    fetches: Sequence[load.Fetch], size: int, sha: str
) -> list[load.Fetch]:
    """
    The fetches whose answer was not a 200 with C{size} bytes hashing to
    C{sha}; of a client that does not hash (its C{sha256} is C{""}), only the
    status and size are checked.
    """
    return [
        f
        for f in fetches
        if f.status != 200 or f.size != size or (f.sha256 and f.sha256 != sha)
    ]


#: blobserve's defaults for --upstream-segments and --segment-size: a blob
#: larger than this comes over up to that many range requests.
BLOBSERVE_SEGMENTS, BLOBSERVE_SEGMENT_SIZE = 4, 64 * MiB

#: What a segmented fetch may receive twice: the first segment is the body of
#: a plain GET, cut where the second begins, and what the upstream had sent
#: past that point by then is at most one TCP receive window (Linux's default
#: tcp_rmem allows it 6 MiB).
IN_FLIGHT_WHEN_CUT = 6 * MiB


def fetched_once(
    gets: int,
    sent: int,
    size: int,
    segments: int = BLOBSERVE_SEGMENTS,
    segment_size: int = BLOBSERVE_SEGMENT_SIZE,
) -> bool:
    """
    Whether the upstream's C{gets} GETs and C{sent} bytes for a blob of
    C{size} bytes are one fetch of it: one GET of its bytes, or for a blob
    fetched in segments one GET per segment at most and each byte once but
    for those in flight when the first segment was cut.
    """
    if size <= segment_size or segments == 1:
        return (gets, sent) == (1, size)
    return 1 <= gets <= segments and size <= sent <= size + IN_FLIGHT_WHEN_CUT


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _distribution(name: str, seconds: Sequence[float]) -> dict[str, float | str]:
    """
    C{name}'s p50, p90, p99 and maximum in milliseconds, as columns; blank
    when there are no values.
    """
    points = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    return {
        f"{name}_{point}_ms": _ms(percentile(seconds, fraction)) if seconds else ""
        for point, fraction in points.items()
    }


def _serving(
    server: servers.Server, url: str, clients: int, seconds: float
) -> dict[str, float]:
    """
    C{clients} clients fetching C{url} from C{server} over and over for
    C{seconds}: the MiB per second, the server's CPU seconds per GiB, and
    the whole machine's (on loopback the kernel charges the sending of a
    packet either to the server or to the client whose acknowledgement made
    room for it: the machine's CPU, clients alike for every system, is what
    the server's way of sending costs).
    """
    cpu, machine = server.cpu_seconds(), servers.machine_cpu_seconds()
    moved, elapsed = load.fetch_for(url, clients, seconds)
    used = server.cpu_seconds() - cpu
    gib = moved / GiB
    return {
        "mib_per_s": moved / MiB / elapsed,
        "cpu_s_per_gib": used / gib,
        "machine_cpu_s_per_gib": (servers.machine_cpu_seconds() - machine) / gib,
    }


def _medians(figures: Sequence[dict[str, float]]) -> dict[str, float]:
    """
    The median of each figure over C{figures}.
    """
    return {key: statistics.median(f[key] for f in figures) for key in figures[0]}


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    """
    C{figures} with their floats rounded for a table: MiB per second to a
    tenth, the rest to hundredths.
    """
    return {
        key: round(value, 1 if key == "mib_per_s" else 2)
        if isinstance(value, float)
        else value
        for key, value in figures.items()
    }


def _at_the_wire(fetches: Sequence[load.Fetch]) -> list[float]:
    """
    The first bytes of C{fetches} as their sockets saw them arrive (see
    L{load.Fetch.wire_first_byte}), for those that got one.
    """
    return [f.wire_first_byte for f in fetches if f.wire_first_byte is not None]


class Bench:
    """
    One benchmark run: the upstream, its test blobs, and the results so far.
    """

    def __init__(self, workdir: Path, rate: int) -> None:
        self.workdir = workdir
        self.rate = rate
        self.results: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.upstream, self.upstream_url = servers.registry(workdir / "upstream")
        self.blobs: dict[int, tuple[str, str]] = {}
        self.blob_sets: dict[tuple[int, int], list[tuple[str, str]]] = {}
        self.images: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        #: The image scenario's floor by client kind: see L{image}.
        self.image_floors: dict[str, float] = {}
        self._scenario = 0

    def blob(self, size: int) -> tuple[str, str]:
        """
        A random, incompressible blob of C{size} bytes in the upstream: its
        digest and sha256 hex.
        """
        if size not in self.blobs:
            data = os.urandom(size)
            digest = servers.push_blob(self.upstream_url, "bench/blobs", data)
            self.blobs[size] = (digest, hashlib.sha256(data).hexdigest())
        return self.blobs[size]

    @contextmanager
    def system(
        self, name: str, flags: Sequence[str] = ()
    ) -> Iterator[tuple[servers.Server, str, Path]]:
        """
        A fresh throttle, and a fresh instance of C{name} with an empty cache
        behind it (blobserve with C{flags}): the server to measure, its URL,
        and the throttle's folder.
        """
        self._scenario += 1
        here = self.workdir / f"scenario-{self._scenario}-{name}"
        throttle, throttle_url = servers.throttle(
            here / "throttle", self.upstream_url, self.rate
        )
        started = [throttle]
        try:
            if name == "direct":
                server, url = throttle, throttle_url
            else:
                if flags:
                    server, url = servers.blobserve(here / name, throttle_url, *flags)
                else:
                    server, url = CACHES[name](here / name, throttle_url)
                started.append(server)
            yield server, url, here / "throttle"
        finally:
            for process in reversed(started):
                process.stop()
            shutil.rmtree(here, ignore_errors=True)

    def record(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        print(json.dumps(result), flush=True)

    def check(self, what: str, fetches: list[load.Fetch], size: int, sha: str) -> bool:
        wrong = wrong_bodies(fetches, size, sha)
        if wrong:
            self.failures.append(f"{what}: {len(wrong)} wrong bodies, e.g. {wrong[0]}")
        return not wrong

    def cold(self, name: str, size: int, clients: int, kind: str = "recv") -> None:
        """
        C{clients} clients of C{kind} fetching one uncached blob of C{size}
        bytes, arriving evenly over the first half of the upstream transfer.
        """
        fetches, head, tail = self._fan_out(
            "cold", name, size, clients, kind, spread=size / self.rate / 2
        )
        first_bytes = [f.first_byte for f in fetches]
        self.record(
            {
                **head,
                "ttfb_p50_ms": _ms(percentile(first_bytes, 0.5)),
                "ttfb_p99_ms": _ms(percentile(first_bytes, 0.99)),
                # The first client waits for the upstream's answer; the
                # later ones are the late joiners.
                **_distribution("late_ttfb", first_bytes[1:]),
                # The same joiners' first bytes from the request's sending to
                # their arrival, which the clients' own waits for the CPU do
                # not stretch.
                **_distribution("late_wire_ttfb", _at_the_wire(fetches[1:])),
                **tail,
            }
        )

    def crowd(self, name: str, size: int, clients: int, kind: str = "recv") -> None:
        """
        C{clients} clients of C{kind}, all started at once, fetching one
        uncached blob of C{size} bytes: a rollout's hundreds of nodes pulling
        the same layer. Clients refused or cut off are counted, not raised.
        """
        fetches, head, tail = self._fan_out("crowd", name, size, clients, kind, 0)
        answered = [f for f in fetches if not f.error]
        self.record(
            {
                **head,
                "connection_errors": len(fetches) - len(answered),
                **_distribution("ttfb", [f.first_byte for f in answered]),
                **_distribution("wire_ttfb", _at_the_wire(answered)),
                **tail,
                "mib_per_s": round(size * len(answered) / MiB / tail["last_done_s"]),
            }
        )

    def segmented(
        self, size: int, clients: int, segments: int, segment_size: int
    ) -> None:
        """
        C{clients} clients at once fetching one uncached blob of C{size}
        bytes from a blobserve that fetches it over C{segments} range
        requests (blobs over C{segment_size}), or over one connection when
        C{segments} is 1: how soon the blob lands, beside one client
        fetching it straight from the throttle over one connection.
        """
        digest, sha = self.blob(size)
        flags = [f"--upstream-segments={segments}", f"--segment-size={segment_size}"]
        with self.system("blobserve", flags) as (server, url, throttle):
            began = time.monotonic()
            fetches = load.fetch_staggered(
                f"{url}/v2/bench/blobs/blobs/{digest}",
                clients,
                spread=0,
                timeout=size / self.rate * 10 + 60,
            )
            last_done = max(f.started + f.done for f in fetches) - began
            time.sleep(0.2)  # nginx logs a request once its last byte went
            gets, sent = servers.upstream_traffic(throttle, digest)
            what = f"segmented {size // MiB} MiB K={segments}"
            if not fetched_once(gets, sent, size, segments, segment_size):
                self.failures.append(f"{what}: {gets} upstream GETs, {sent} bytes")
            direct = next(
                r["last_done_s"]
                for r in reversed(self.results)
                if r["scenario"] == "segmented" and r["system"] == "direct"
            )
            self.record(
                {
                    "scenario": "segmented",
                    "system": "blobserve",
                    "segments": segments,
                    "size_mib": size // MiB,
                    "clients": clients,
                    "last_done_s": round(last_done, 2),
                    "vs_direct": round(direct / last_done, 2),
                    "upstream_gets": gets,
                    "upstream_ratio": round(sent / size, 3),
                    "correct": self.check(what, fetches, size, sha),
                    "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                }
            )

    def segmented_floor(self, size: int) -> None:
        """
        One client fetching the blob of C{size} bytes straight from the
        throttle, over one connection: what segmented fetch is compared with.
        """
        digest, sha = self.blob(size)
        with self.system("direct") as (_, url, _):
            fetch = load.fetch(
                f"{url}/v2/bench/blobs/blobs/{digest}",
                timeout=size / self.rate * 10 + 60,
            )
            self.check(f"segmented direct {size // MiB} MiB", [fetch], size, sha)
            self.record(
                {
                    "scenario": "segmented",
                    "system": "direct",
                    "segments": 1,
                    "size_mib": size // MiB,
                    "clients": 1,
                    "last_done_s": round(fetch.done, 2),
                    "vs_direct": 1.0,
                }
            )

    def _fan_out(
        self,
        scenario: str,
        name: str,
        size: int,
        clients: int,
        kind: str,
        spread: float,
    ) -> tuple[list[load.Fetch], dict[str, Any], dict[str, Any]]:
        """
        C{clients} clients of C{kind} fetching one uncached blob of C{size}
        bytes from a fresh C{name}, arriving evenly over C{spread} seconds:
        their fetches, and the columns every fan-out scenario has, those to
        put before its own and those after. Notes a failure when a body is
        wrong or blobserve asked the upstream more than once.
        """
        digest, sha = self.blob(size)
        transfer = size / self.rate
        with self.system(name) as (server, url, throttle):
            cpu = server.cpu_seconds()
            began = time.monotonic()
            fetches = load.fetch_staggered(
                f"{url}/v2/bench/blobs/blobs/{digest}",
                clients,
                spread=spread,
                timeout=transfer * 10 + 60 + clients,
                kind=kind,
            )
            # nginx logs a request once it has sent the last byte: a moment
            # after the client may have read it.
            time.sleep(0.2)
            gets, sent = servers.upstream_traffic(throttle, digest)
            what = f"{scenario} {name} {size // MiB} MiB N={clients} {kind}"
            if name == "blobserve" and not fetched_once(gets, sent, size):
                self.failures.append(f"{what}: {gets} upstream GETs, {sent} bytes")
            head = {
                "scenario": scenario,
                "system": name,
                "client_kind": kind,
                # Whether "correct" checked the bodies' digests too, or only
                # their status and size.
                "hashed": kind in load.HASHING,
                "size_mib": size // MiB,
                "clients": clients,
                "upstream_gets": gets,
                "upstream_ratio": round(sent / size, 2),
            }
            tail = {
                "done_p50_s": round(percentile([f.done for f in fetches], 0.5), 2),
                "last_done_s": round(
                    max(f.started + f.done for f in fetches) - began, 2
                ),
                "correct": self.check(what, fetches, size, sha),
                "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                # Per GiB sent to the clients.
                "cpu_s_per_gib": round(
                    (server.cpu_seconds() - cpu) * GiB / (size * clients), 2
                ),
            }
            return fetches, head, tail

    def image_blobs(self, layer_sizes: tuple[int, ...]) -> list[tuple[str, int]]:
        """
        An image of random, incompressible layers of C{layer_sizes} bytes in
        the upstream as C{bench/image:v1}, with its config and OCI manifest:
        the digest and size of its config, then of each layer, in the
        manifest's order.
        """
        if layer_sizes not in self.images:
            layers = [
                (servers.push_blob(self.upstream_url, IMAGE, os.urandom(size)), size)
                for size in layer_sizes
            ]
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
                }
            ).encode()
            blobs = [(servers.push_blob(self.upstream_url, IMAGE, config), len(config))]
            blobs += layers
            servers.push_image_manifest(
                self.upstream_url, IMAGE, "v1", blobs[0], blobs[1:]
            )
            self.images[layer_sizes] = blobs
        return self.images[layer_sizes]

    def image(
        self, name: str, layer_sizes: tuple[int, ...], clients: int, kind: str
    ) -> None:
        """
        C{clients} clients of C{kind} pulling one uncached image of layers
        of C{layer_sizes} bytes at once, the way containerd does (see
        L{load.pull_image}), every body hashed. C{direct} is the floor
        instead: one client fetching the config and every layer at once
        straight from the throttle, each over its own connection, the time
        the upstream needs to deliver each blob once; the other systems'
        rows are compared with the last floor measured for C{kind}. Notes a
        failure when a body is wrong or blobserve asked the upstream for a
        blob more than once.
        """
        blobs = self.image_blobs(layer_sizes)
        total = sum(size for _, size in blobs)
        timeout = max(layer_sizes) / self.rate * 10 + 60 + clients
        with self.system(name) as (server, url, throttle):
            cpu = server.cpu_seconds()
            began = time.monotonic()
            if name == "direct":
                urls = [f"{url}/v2/{IMAGE}/blobs/{digest}" for digest, _ in blobs]
                fetches = load.fetch_together(urls, timeout, kind)
                pulls = [
                    load.Pull(
                        [(d, f) for (d, _), f in zip(blobs, fetches, strict=True)],
                        began,
                        max(f.started + f.done for f in fetches) - began,
                    )
                ]
            else:
                pulls = load.pull_together(url, IMAGE, "v1", clients, timeout, kind)
            last_done = max(p.started + p.done for p in pulls) - began
            time.sleep(0.2)  # nginx logs a request once its last byte went
            traffic = [servers.upstream_traffic(throttle, d) for d, _ in blobs]
            what = f"image {name} N={clients} {kind}"
            wrong = [p.error for p in pulls if p.error]
            wrong += [
                f"{digest}: {f}"
                for p in pulls
                if not p.error
                for digest, f in p.blobs
                if wrong_bodies([f], dict(blobs).get(digest, -1), digest[7:])
            ]
            wrong += [
                f"pulled {[d for d, _ in p.blobs]}"
                for p in pulls
                if not p.error and [d for d, _ in p.blobs] != [d for d, _ in blobs]
            ]
            if wrong:
                self.failures.append(f"{what}: {len(wrong)} wrong, e.g. {wrong[0]}")
            refetched = [
                (digest, gets, sent)
                for (digest, size), (gets, sent) in zip(blobs, traffic, strict=True)
                if not fetched_once(gets, sent, size)
            ]
            if name.startswith("blobserve") and refetched:
                self.failures.append(
                    f"{what}: blobs fetched other than once from the upstream"
                    f" (digest, GETs, bytes): {refetched}"
                )
            if name == "direct":
                self.image_floors[kind] = last_done
            floor = self.image_floors.get(kind)
            self.record(
                {
                    "scenario": "image",
                    "system": name,
                    "client_kind": kind,
                    "clients": clients,
                    "image_mib": round(total / MiB, 1),
                    "last_done_s": round(last_done, 2),
                    "done_p50_s": round(percentile([p.done for p in pulls], 0.5), 2),
                    "floor_s": round(floor, 2) if floor else "",
                    "vs_floor": round(last_done / floor, 2) if floor else "",
                    "upstream_gets": sum(g for g, _ in traffic),
                    "max_gets_per_blob": max(g for g, _ in traffic),
                    "upstream_ratio": round(sum(s for _, s in traffic) / total, 2),
                    "correct": not wrong,
                    "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                    # Per GiB sent to the clients.
                    "cpu_s_per_gib": round(
                        (server.cpu_seconds() - cpu) * GiB / (total * clients), 2
                    ),
                }
            )

    def lazy(self, name: str, size: int, chunks: int, parallel: int) -> None:
        """
        A lazy-pulling snapshotter (stargz) reading a cold blob: the footer
        (its last 51 bytes), then the table of contents before it, then
        C{chunks} random chunks of 64 KiB, C{parallel} at a time; each phase
        timed from its first request to its last byte.
        """
        digest, _ = self.blob(size)
        chunk, toc = 64 * 1024, min(size // 4, 512 * 1024)
        with self.system(name) as (server, url, throttle):
            blob_url = f"{url}/v2/bench/blobs/blobs/{digest}"
            fetches: list[tuple[load.Fetch, int]] = []

            def read(start: int, end: int) -> load.Fetch:
                fetched = load.fetch(
                    blob_url,
                    hash_body=False,
                    timeout=size / self.rate * 10 + 60,
                    byte_range=f"bytes={start}-{end - 1}",
                )
                fetches.append((fetched, end - start))
                return fetched

            began = time.monotonic()
            footer = read(size - 51, size).done
            toc_done = read(size - 51 - toc, size - 51).done
            offsets = random.Random(size).sample(range(size // chunk), chunks)
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                done = list(
                    pool.map(lambda i: read(i * chunk, (i + 1) * chunk).done, offsets)
                )
            chunks_s = time.monotonic() - started
            total = time.monotonic() - began
            time.sleep(0.2)  # nginx logs a request once its last byte went
            gets, sent = servers.upstream_traffic(throttle, digest)
            what = f"lazy {name} {size // MiB} MiB"
            ranged = all(f.status == 206 and f.size == n for f, n in fetches)
            if name == "blobserve" and not ranged:
                self.failures.append(f"{what}: a range was not answered as asked")
            self.record(
                {
                    "scenario": "lazy",
                    "system": name,
                    "size_mib": size // MiB,
                    "full_download_s": round(size / self.rate, 1),
                    "footer_s": round(footer, 3),
                    "toc_s": round(toc_done, 3),
                    "chunks": chunks,
                    "chunk_p50_ms": round(percentile(done, 0.5) * 1000, 1),
                    "chunk_p99_ms": round(percentile(done, 0.99) * 1000, 1),
                    "chunks_s": round(chunks_s, 2),
                    "total_s": round(total, 2),
                    # Whether every answer was the 206 asked for (a cache
                    # that answers a miss with the whole blob is not).
                    "ranges_honoured": ranged,
                    "upstream_gets": gets,
                    "upstream_ratio": round(sent / size, 2),
                    "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                }
            )

    def stalled(self, name: str, size: int, normal: int, stalled: int) -> None:
        digest, sha = self.blob(size)
        transfer = size / self.rate
        with self.system(name) as (server, url, _):
            blob_url = f"{url}/v2/bench/blobs/blobs/{digest}"
            sockets = load.stalled_clients(blob_url, stalled)
            try:
                began = time.monotonic()
                fetches = load.fetch_staggered(
                    blob_url, normal, spread=0, timeout=transfer * 10 + 60
                )
                finished = max(f.started + f.done for f in fetches) - began
            finally:
                for s in sockets:
                    s.close()
            what = f"stalled {name} {size // MiB} MiB"
            self.record(
                {
                    "scenario": "stalled",
                    "system": name,
                    "size_mib": size // MiB,
                    "clients": normal,
                    "stalled_clients": stalled,
                    "last_done_s": round(finished, 2),
                    "correct": self.check(what, fetches, size, sha),
                    "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                }
            )

    def warm(self, name: str, size: int, clients: int, seconds: float) -> None:
        digest, sha = self.blob(size)
        with self.system(name) as (server, url, _):
            blob_url = f"{url}/v2/bench/blobs/blobs/{digest}"
            if name != "direct":
                # Fill the cache, then wait until it serves without upstream.
                self.check(
                    f"warm {name} fill",
                    [load.fetch(blob_url)],
                    size,
                    sha,
                )
                time.sleep(1)
            self._throughput(name, server, blob_url, size, clients, seconds)

    def warm_nginx(self, size: int, clients: int, seconds: float) -> None:
        with self.static_nginx(size) as (server, url):
            self._throughput("nginx-static", server, url, size, clients, seconds)

    def crowd_nginx(self, size: int, clients: int, kind: str) -> None:
        """
        The crowd's clients, all at once, fetching the crowd's blob from
        nginx serving it as a file: what serving alone costs, with nothing
        to wait for upstream.
        """
        _, sha = self.blob(size)
        with self.static_nginx(size) as (server, url):
            cpu = server.cpu_seconds()
            began = time.monotonic()
            fetches = load.fetch_staggered(
                url, clients, spread=0, timeout=60 + clients, kind=kind
            )
            last_done = max(f.started + f.done for f in fetches) - began
            answered = [f for f in fetches if not f.error]
            what = f"crowd nginx-static {size // MiB} MiB N={clients} {kind}"
            self.record(
                {
                    "scenario": "crowd",
                    "system": "nginx-static",
                    "client_kind": kind,
                    "hashed": kind in load.HASHING,
                    "size_mib": size // MiB,
                    "clients": clients,
                    "connection_errors": len(fetches) - len(answered),
                    **_distribution("ttfb", [f.first_byte for f in answered]),
                    **_distribution("wire_ttfb", _at_the_wire(answered)),
                    "done_p50_s": round(percentile([f.done for f in fetches], 0.5), 2),
                    "last_done_s": round(last_done, 2),
                    "correct": self.check(what, fetches, size, sha),
                    "peak_rss_mib": round(server.peak_rss() / MiB, 1),
                    "cpu_s_per_gib": round(
                        (server.cpu_seconds() - cpu) * GiB / (size * clients), 2
                    ),
                    "mib_per_s": round(size * len(answered) / MiB / last_done),
                }
            )

    @contextmanager
    def static_nginx(self, size: int) -> Iterator[tuple[servers.Server, str]]:
        """
        nginx serving the test blob of C{size} bytes as a file from disk,
        with C{sendfile}: the server and the file's URL.
        """
        digest, _ = self.blob(size)
        root = self.workdir / "static"
        (root / "blob").parent.mkdir(parents=True, exist_ok=True)
        blob = f"{self.upstream_url}/v2/bench/blobs/blobs/{digest}"
        with urllib.request.urlopen(blob) as response:
            (root / "blob").write_bytes(response.read())
        server, url = servers.static(self.workdir / "static-nginx", root)
        try:
            yield server, f"{url}/blob"
        finally:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(self.workdir / "static-nginx", ignore_errors=True)

    def _throughput(
        self,
        name: str,
        server: servers.Server,
        url: str,
        size: int,
        clients: int,
        seconds: float,
    ) -> None:
        self.record(
            {
                "scenario": "warm",
                "system": name,
                "size_mib": size // MiB,
                "clients": clients,
                **_rounded(_serving(server, url, clients, seconds)),
            }
        )

    def warm_rounds(self, size: int, clients: int, seconds: float, rounds: int) -> None:
        """
        blobserve and nginx serving the same cached blob to C{clients}
        clients, measured in turn for C{rounds} rounds: the median of each
        figure, and for blobserve the median of its figures over nginx's
        round by round, so that the machine's drift from one moment to the
        next weighs on both alike.
        """
        digest, sha = self.blob(size)
        with (
            self.system("blobserve") as (server, url, _),
            self.static_nginx(size) as (nginx, nginx_url),
        ):
            blob_url = f"{url}/v2/bench/blobs/blobs/{digest}"
            self.check("warm-rounds fill", [load.fetch(blob_url)], size, sha)
            time.sleep(1)
            served: dict[str, list[dict[str, float]]] = {"blobserve": [], "nginx": []}
            for _ in range(rounds):
                served["blobserve"].append(_serving(server, blob_url, clients, seconds))
                served["nginx"].append(_serving(nginx, nginx_url, clients, seconds))
        for name, figures in (
            ("blobserve", served["blobserve"]),
            ("nginx-static", served["nginx"]),
        ):
            row: dict[str, Any] = {
                "scenario": "warm-rounds",
                "system": name,
                "size_mib": size // MiB,
                "clients": clients,
                "rounds": rounds,
                **_rounded(_medians(figures)),
            }
            if name == "blobserve":
                ratios = [
                    {key: ours[key] / theirs[key] for key in ours}
                    for ours, theirs in zip(figures, served["nginx"], strict=True)
                ]
                row.update(
                    {
                        f"vs_nginx_{key}": value
                        for key, value in _medians(ratios).items()
                    }
                )
            self.record(_rounded(row))

    def small(self, names: Sequence[str], seconds: int) -> None:
        """
        Cached 4 KiB blobs (with wrk, over HTTP/1.1 connections kept alive
        as registry clients keep theirs) and C{HEAD} of a cached manifest by
        tag (with ApacheBench, a new connection per request), from each
        blobserve of C{names} and from docker-registry serving what it
        stores itself.
        """
        layer = os.urandom(4096)
        servers.push_manifest(self.upstream_url, "bench/small", "v1", layer)
        blob = f"/v2/bench/small/blobs/sha256:{hashlib.sha256(layer).hexdigest()}"
        manifest = "/v2/bench/small/manifests/v1"
        self._small(
            "registry", self.upstream, self.upstream_url, blob, manifest, seconds
        )
        for name in names:
            with self.system(name) as (server, url, _):
                fills = [
                    load.fetch(url + blob),
                    load.fetch(url + manifest, accept=load.OCI_MANIFEST),
                ]
                if any(f.status != 200 for f in fills):
                    self.failures.append(f"small: {name} could not fill its cache")
                self._small(name, server, url, blob, manifest, seconds)

    def _small(
        self,
        name: str,
        server: servers.Server,
        url: str,
        blob: str,
        manifest: str,
        seconds: int,
    ) -> None:
        blobs = load.wrk(url + blob, seconds, 16)
        heads = load.ab(url + manifest, seconds, 16, head=True)
        self.record(
            {
                "scenario": "small",
                "system": name,
                "blob_4k_rps": round(blobs.requests_per_second),
                "blob_4k_p99_ms": blobs.p99_ms,
                "head_manifest_rps": round(heads.requests_per_second),
                "head_manifest_p99_ms": heads.p99_ms,
            }
        )

    def eviction(
        self, seconds: int, size: int, pool: int, limit: int, writers: int
    ) -> None:
        """
        Hits of a cached 4 KiB blob (ApacheBench, 16 connections) while
        C{writers} clients fetch blobs of C{size} bytes that are all misses,
        one after the other, from a fresh blobserve: without a limit, and
        with C{--max-size} C{limit}, where once full the store evicts every
        few commits.
        Beside them, with nothing written, the same hits alone.
        """
        hot = os.urandom(4096)
        hot_path = "/v2/bench/hot/blobs/" + servers.push_blob(
            self.upstream_url, "bench/hot", hot
        )
        cold = [
            servers.push_blob(self.upstream_url, "bench/cold", os.urandom(size))
            for _ in range(pool)
        ]
        flags: tuple[str, ...]
        for writing, flags in [
            (False, ()),
            (True, ()),
            (True, (f"--max-size={limit}",)),
        ]:
            with self.system("blobserve", flags) as (_, url, _):
                if load.fetch(url + hot_path).status != 200:
                    self.failures.append("eviction: blobserve could not fill its cache")
                    return
                stop = threading.Event()
                urls = [f"{url}/v2/bench/cold/blobs/{digest}" for digest in cold]
                with ThreadPoolExecutor(max_workers=writers) as executor:
                    futures = [
                        executor.submit(load.fetch_each_until, urls[n::writers], stop)
                        for n in range(writers if writing else 0)
                    ]
                    began = time.monotonic()
                    try:
                        hits = load.ab(url + hot_path, seconds, 16)
                    finally:
                        elapsed = time.monotonic() - began
                        stop.set()
                    written = sum(f.result() for f in futures)
                if writing and written >= pool:
                    self.failures.append(
                        f"eviction: the writers ran out of blobs ({pool}) before"
                        " the end: raise the pool"
                    )
                with urllib.request.urlopen(f"{url}/_blobserve/status") as response:
                    store = json.load(response)["store"]
                self.record(
                    {
                        "scenario": "eviction",
                        "system": "blobserve",
                        "writes": f"{writers} x {size // 1024} KiB" if writing else "",
                        "max_size_mib": limit // MiB if flags else "",
                        "hits_per_s": round(hits.requests_per_second),
                        "hit_p99_ms": hits.p99_ms,
                        "commits_per_s": round(written / elapsed, 1),
                        "evictions_per_s": round(store["evictions"] / elapsed, 1),
                    }
                )

    def cluster(self, round_robin: bool, blobs: int, size: int, clients: int) -> None:
        """
        Three blobserve nodes behind HAProxy, as blobserve-haproxy-config
        writes it (each digest on one node) or with round robin instead:
        C{clients} clients, 20 ms apart, over C{blobs} uncached blobs,
        client n fetching blob n mod C{blobs}.
        """
        if (blobs, size) not in self.blob_sets:
            made = []
            for _ in range(blobs):
                data = os.urandom(size)
                digest = servers.push_blob(self.upstream_url, "bench/blobs", data)
                made.append((digest, hashlib.sha256(data).hexdigest()))
            self.blob_sets[blobs, size] = made
        chosen = self.blob_sets[blobs, size]
        self._scenario += 1
        balance = "round-robin" if round_robin else "digest-hash"
        here = self.workdir / f"scenario-{self._scenario}-cluster-{balance}"
        throttle, throttle_url = servers.throttle(
            here / "throttle", self.upstream_url, self.rate
        )
        started = [throttle]
        try:
            nodes = []
            for n in range(1, 4):
                node, node_url = servers.blobserve(
                    here / f"node{n}", throttle_url, f"--node-name=node{n}"
                )
                started.append(node)
                nodes.append(node_url.removeprefix("http://"))
            balancer, url = servers.haproxy(here / "haproxy", nodes, round_robin)
            started.append(balancer)
            began = time.monotonic()
            # The clients arrive 20 ms apart, in order: round robin then
            # sends the clients of one blob to different nodes in every run,
            # where threads started at once would arrive in a different order
            # each time and make its figure vary from run to run.
            with ThreadPoolExecutor(max_workers=clients) as pool:
                futures = []
                for n in range(clients):
                    time.sleep(max(0.0, began + 0.02 * n - time.monotonic()))
                    blob_url = f"{url}/v2/bench/blobs/blobs/{chosen[n % blobs][0]}"
                    futures.append(pool.submit(load.fetch, blob_url))
                fetches = [f.result() for f in futures]
            last_done = max(f.started + f.done for f in fetches) - began
            time.sleep(0.2)  # nginx logs a request after its last byte
            traffic = [
                servers.upstream_traffic(here / "throttle", d) for d, _ in chosen
            ]
            what = f"cluster {balance}"
            correct = all(
                self.check(what, [f], size, chosen[n % blobs][1])
                for n, f in enumerate(fetches)
            )
            gets = sum(g for g, _ in traffic)
            if not round_robin and gets != blobs:
                self.failures.append(f"{what}: {gets} upstream GETs for {blobs} blobs")
            self.record(
                {
                    "scenario": "cluster",
                    "balance": balance,
                    "nodes": 3,
                    "blobs": blobs,
                    "size_mib": size // MiB,
                    "clients": clients,
                    "upstream_gets": gets,
                    "upstream_ratio": round(
                        sum(s for _, s in traffic) / (size * blobs), 2
                    ),
                    "done_p50_s": round(percentile([f.done for f in fetches], 0.5), 2),
                    "last_done_s": round(last_done, 2),
                    "correct": correct,
                }
            )
        finally:
            for process in reversed(started):
                process.stop()
            shutil.rmtree(here, ignore_errors=True)

    def commits(self, blobs: int, size: int, limit_blobs: int) -> None:
        """
        The time a commit takes, without a limit and with C{--max-size} of
        C{limit_blobs} blobs (see L{bench.commits}).
        """
        for limit in (0, limit_blobs):
            directory = self.workdir / f"commits-{limit}"
            directory.mkdir()
            try:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.commits",
                        str(directory),
                        f"--blobs={blobs}",
                        f"--size={size}",
                        f"--limit-blobs={limit}",
                    ],
                    capture_output=True,
                    check=True,
                    timeout=600,
                ).stdout
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            self.record({"scenario": "commit", **json.loads(out)})

    def close(self) -> None:
        self.upstream.stop()


def table(results: list[dict[str, Any]]) -> str:
    """
    The results as aligned text, one table per scenario.
    """
    lines: list[str] = []
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rows = [r for r in results if r["scenario"] == scenario]
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "scenario"))
        cells = [[str(r.get(c, "")) for c in columns] for r in rows]
        widths = [
            max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)
        ]
        lines.append(f"{scenario}:")
        lines.append(
            "  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
        )
        for row in cells:
            lines.append(
                "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            )
        lines.append("")
    return "\n".join(lines)


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{os.cpu_count()} cores, {memory:.0f} GiB, {platform.machine()},"
        f" Linux {platform.release()}, Python {platform.python_version()}"
    )


def plan(arguments: argparse.Namespace) -> Iterator[Callable[[Bench], None]]:
    """
    The steps of a run, each a scenario for one system.
    """
    sizes = [int(s) * MiB for s in arguments.sizes.split(",")]
    clients = [int(n) for n in arguments.clients.split(",")]
    systems = arguments.systems.split(",")
    kinds = arguments.client_kinds.split(",")
    unknown = set(kinds) - set(load.CLIENTS)
    if unknown:
        raise SystemExit(f"unknown client kinds: {', '.join(sorted(unknown))}")
    stalled, warm_clients, seconds = 16, [8, 32], 10
    warm_size = 256 * MiB
    crowd_size, crowd_clients, crowd_kinds = (
        arguments.crowd_size * MiB,
        arguments.crowd_clients,
        kinds,
    )
    if arguments.smoke:
        sizes, clients, stalled, warm_clients, seconds = [4 * MiB], [4], 4, [4], 1
        warm_size = 4 * MiB
        # The crowd's clients are the other kind, so that CI runs both.
        crowd_size, crowd_clients, crowd_kinds = MiB, 8, ["read1", "drain"]
    scenarios = arguments.scenarios.split(",")
    if "cold" in scenarios:
        for size in sizes:
            yield partial(Bench.cold, name="direct", size=size, clients=1)
            for n in clients:
                for kind in kinds:
                    for name in systems:
                        yield partial(
                            Bench.cold, name=name, size=size, clients=n, kind=kind
                        )
    if "crowd" in scenarios:
        for kind in crowd_kinds:
            for name in systems:
                yield partial(
                    Bench.crowd,
                    name=name,
                    size=crowd_size,
                    clients=crowd_clients,
                    kind=kind,
                )
            yield partial(
                Bench.crowd_nginx, size=crowd_size, clients=crowd_clients, kind=kind
            )
    if "segmented" in scenarios:
        size = (4 if arguments.smoke else arguments.segmented_size) * MiB
        # Small segments in the smoke run, so that CI fetches a blob in four.
        segment_size = MiB if arguments.smoke else 64 * MiB
        yield partial(Bench.segmented_floor, size=size)
        for segments in (1, 4):
            yield partial(
                Bench.segmented,
                size=size,
                clients=2 if arguments.smoke else 4,
                segments=segments,
                segment_size=segment_size,
            )
    if "image" in scenarios:
        yield from _image_plan(arguments, systems, kinds)
    if "lazy" in scenarios:
        chunks, parallel = (10, 4) if arguments.smoke else (100, 8)
        for name in systems:
            yield partial(
                Bench.lazy, name=name, size=sizes[0], chunks=chunks, parallel=parallel
            )
    if "stalled" in scenarios:
        for name in systems:
            yield partial(
                Bench.stalled, name=name, size=sizes[0], normal=stalled, stalled=stalled
            )
    if "warm" in scenarios:
        for n in warm_clients:
            for name in systems:
                yield partial(
                    Bench.warm, name=name, size=warm_size, clients=n, seconds=seconds
                )
            yield partial(Bench.warm_nginx, size=warm_size, clients=n, seconds=seconds)
    if "warm-rounds" in scenarios:
        rounds = partial(Bench.warm_rounds, size=warm_size, seconds=seconds)
        for n in warm_clients:
            yield partial(rounds, clients=n, rounds=2 if arguments.smoke else 4)
    if "small" in scenarios:
        yield partial(
            Bench.small,
            names=[name for name in systems if name.startswith("blobserve")],
            seconds=seconds // 2 or 1,
        )
    if "cluster" in scenarios:
        blobs, size, n = (2, 4 * MiB, 4) if arguments.smoke else (8, 32 * MiB, 16)
        for round_robin in (False, True):
            yield partial(
                Bench.cluster,
                round_robin=round_robin,
                blobs=blobs,
                size=size,
                clients=n,
            )
    if "eviction" in scenarios:
        if arguments.smoke:
            yield partial(Bench.commits, blobs=20, size=64 * 1024, limit_blobs=4)
            yield partial(
                Bench.eviction, seconds=1, size=64 * 1024, pool=60, limit=MiB, writers=1
            )
        else:
            yield partial(Bench.commits, blobs=400, size=MiB, limit_blobs=32)
            yield partial(
                Bench.eviction,
                seconds=10,
                size=256 * 1024,
                pool=1000,
                limit=8 * MiB,
                writers=2,
            )


def _image_plan(
    arguments: argparse.Namespace, systems: list[str], kinds: list[str]
) -> Iterator[Callable[[Bench], None]]:
    """
    The image scenario's steps: for each kind of client that hashes (C{recv}
    when none of C{kinds} does), the floor, then each number of clients on
    each system, with blobserve-prefetch beside blobserve.
    """
    if arguments.smoke:
        layers, clients = tuple(k * 1024 for k in SMOKE_IMAGE_LAYERS_KIB), [2]
    else:
        layers = tuple(m * MiB for m in IMAGE_LAYERS_MIB)
        clients = [int(n) for n in arguments.image_clients.split(",")]
    if "blobserve" in systems and "blobserve-prefetch" not in systems:
        systems = [*systems, "blobserve-prefetch"]
    for kind in [k for k in kinds if k in load.HASHING] or ["recv"]:
        yield partial(
            Bench.image, name="direct", layer_sizes=layers, clients=1, kind=kind
        )
        for n in clients:
            for name in systems:
                yield partial(
                    Bench.image, name=name, layer_sizes=layers, clients=n, kind=kind
                )


def flags() -> argparse.ArgumentParser:
    """
    The command line of C{python -m bench}.
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for CI")
    parser.add_argument("--sizes", default="256,1024", help="cold blob sizes, MiB")
    parser.add_argument("--clients", default="1,8,32", help="cold fan-out clients")
    parser.add_argument(
        "--client-kinds",
        default="recv",
        help=f"the kinds of client for cold and crowd, of {', '.join(load.CLIENTS)}",
    )
    parser.add_argument(
        "--crowd-clients", type=int, default=256, help="clients of the crowd at once"
    )
    parser.add_argument(
        "--crowd-size", type=int, default=64, help="the crowd's blob size, MiB"
    )
    parser.add_argument(
        "--segmented-size",
        type=int,
        default=1024,
        help="the blob size of the segmented scenario, MiB",
    )
    parser.add_argument(
        "--image-clients",
        default="2,32",
        help="the image scenario's numbers of clients pulling at once",
    )
    parser.add_argument(
        "--rate", type=float, default=25, help="throttle per connection, MiB/s"
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"the caches to compare, of {', '.join(CACHES)}",
    )
    parser.add_argument(
        "--scenarios",
        default=(
            "cold,crowd,image,segmented,stalled,warm,warm-rounds,small,eviction,"
            "lazy,cluster"
        ),
        help="the scenarios to run",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = flags().parse_args(argv)
    rate = 2 * MiB if arguments.smoke else int(arguments.rate * MiB)

    workdir = Path(tempfile.mkdtemp(prefix="blobserve-bench-"))
    bench = Bench(workdir, rate)
    try:
        for step in plan(arguments):
            step(bench)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "machine": machine(),
        "throttle_mib_per_s": rate / MiB,
        "results": bench.results,
        "failures": bench.failures,
    }
    arguments.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nblobserve benchmark on {report['machine']},"
        f" upstream throttled to {rate / MiB:g} MiB/s per connection\n"
    )
    print(table(bench.results))
    for failure in bench.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
