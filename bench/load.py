"""
The clients of a benchmark run: blob fetches on threads of this process
(timed, and hashed or not), raw sockets that stop reading, and ApacheBench
for small requests.

A fetch is a plain HTTP/1.0 C{GET} read with C{recv_into} into one buffer and
hashed from it: one process of those costs far less CPU than curl piped into
a hasher, so on a small machine the clients measure the server, not
themselves. The other kind of client, C{read1}, reads with C{http.client}'s
C{read1(1 MiB)} and hashes each piece, the way the independent harness of
issue #14 does, whose late joiners waited three times longer than C{recv}'s.
A third kind, C{drain}, reads like C{recv} and only counts the bytes: what a
server can send when its clients cost it nothing. L{pull_image} pulls a whole
image the way containerd does.

Every kind also notes its first byte at the wire: the kernel stamps each
packet with the time it left or arrived (C{SO_TIMESTAMPING}), so the seconds
from the request leaving the client's socket to the first response byte
reaching it count what the server took, not how long the client's own
thread, one of many on the same cores, waited for the CPU or the GIL before
its request went or after the byte arrived.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from attrs import define

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: What containerd accepts when it resolves a tag.
IMAGE_ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
    ]
)
#: How many layers containerd fetches at once for one pull.
LAYERS_AT_ONCE = 3
_BUFFER = 256 * 1024
_READ1 = 1024 * 1024
#: Linux's C{SO_TIMESTAMPING} (its C{SCM_TIMESTAMPING} too), which Python's
#: socket module does not name, and the flags asking for the kernel's
#: software stamps of what a socket sends (as the packet reaches the device,
#: reported on the error queue without the packet) and receives:
#: C{TX_SOFTWARE | RX_SOFTWARE | SOFTWARE | OPT_TSONLY}.
_SO_TIMESTAMPING = 37
_STAMPS = (1 << 1) | (1 << 3) | (1 << 4) | (1 << 11)
#: What a stamp comes as: three C{struct timespec}, the software one first.
_TIMESTAMPING = struct.Struct("qqqqqq")
#: Room for a stamp and the error that carries a sent packet's stamp.
_ANCILLARY = 256
T = TypeVar("T")


@define
class Fetch:
    """
    One client's view of one blob download.

    @ivar first_byte: seconds from its start to the first response byte.
    @ivar done: seconds from its start to the end of the body.
    @ivar sha256: the body's digest, or C{""} for a client that does not hash.
    @ivar started: when it started, on the monotonic clock.
    @ivar error: why it failed to connect or to read a response (then
        C{status} is 0), or C{""}.
    @ivar wire_first_byte: seconds from sending the request, once
        connected, to the first response byte's arrival at the client's
        socket, by the kernel's stamp: L{None} if it failed.
    """

    status: int
    size: int
    first_byte: float
    done: float
    sha256: str
    started: float
    error: str = ""
    wire_first_byte: float | None = None


def fetch(
    url: str,
    hash_body: bool = True,
    accept: str = "*/*",
    timeout: float = 600,
    byte_range: str | None = None,
) -> Fetch:
    """
    C{GET} C{url} and read the whole response: up to its C{Content-Length},
    or to the end of the connection without one.

    @param byte_range: the C{Range} header to send, if any.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    started = time.monotonic()
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    hasher = hashlib.sha256() if hash_body else None
    with socket.create_connection((parts.hostname, parts.port), timeout) as s:
        ranged = f"Range: {byte_range}\r\n" if byte_range else ""
        sending = _stamped(s)
        s.sendall(
            f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n"
            f"Accept: {accept}\r\n{ranged}\r\n".encode()
        )
        sent = _departure(s, sending)
        wire_first_byte = _arrival(s) - sent
        head = b""
        first_byte = 0.0
        while b"\r\n\r\n" not in head:
            received = s.recv_into(buffer)
            if not received:
                raise ConnectionError(f"{url}: connection closed in the headers")
            first_byte = first_byte or time.monotonic() - started
            head += view[:received]
        head, _, body = head.partition(b"\r\n\r\n")
        status = int(head.split(None, 2)[1])
        declared = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(declared[1]) if declared else None
        size = len(body)
        if hasher is not None:
            hasher.update(body)
        while length is None or size < length:
            received = s.recv_into(buffer)
            if not received:
                break
            size += received
            if hasher is not None:
                hasher.update(view[:received])
    done = time.monotonic() - started
    digest = hasher.hexdigest() if hasher is not None else ""
    return Fetch(status, size, first_byte, done, digest, started, "", wire_first_byte)


def fetch_read1(url: str, hash_body: bool = True, timeout: float = 600) -> Fetch:
    """
    C{GET} C{url} with C{http.client} and read the body with C{read1} of up
    to 1 MiB at a time, hashing each piece: a client like those of the
    harness in issue #14. Its first byte is when the status line and headers
    have been read.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    started = time.monotonic()
    hasher = hashlib.sha256() if hash_body else None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.connect()
        sending = _stamped(connection.sock)
        connection.request("GET", parts.path, headers={"Accept": "*/*"})
        sent = _departure(connection.sock, sending)
        wire_first_byte = _arrival(connection.sock) - sent
        response = connection.getresponse()
        first_byte = time.monotonic() - started
        size = 0
        while piece := response.read1(_READ1):
            size += len(piece)
            if hasher is not None:
                hasher.update(piece)
    finally:
        connection.close()
    done = time.monotonic() - started
    digest = hasher.hexdigest() if hasher is not None else ""
    return Fetch(
        response.status, size, first_byte, done, digest, started, "", wire_first_byte
    )


def _stamped(connection: socket.socket) -> float:
    """
    Have the kernel stamp what C{connection} sends and receives with the
    time it left or arrived: the time now, on the same clock, for a request
    whose stamp does not come.
    """
    connection.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPING, _STAMPS)
    return time.time()


def _departure(connection: socket.socket, otherwise: float) -> float:
    """
    When the request just sent on C{connection}, which must be L{_stamped},
    left it, by the kernel's stamp; C{otherwise} if none has come.
    """
    timeout = connection.gettimeout()
    # Not readable however long it waits: only an error queue is there.
    connection.settimeout(0)
    try:
        _, ancillary, _, _ = connection.recvmsg(1, _ANCILLARY, socket.MSG_ERRQUEUE)
    except BlockingIOError:
        return otherwise
    finally:
        connection.settimeout(timeout)
    stamp = _stamp(ancillary)
    return otherwise if stamp is None else stamp


def _arrival(connection: socket.socket) -> float:
    """
    Wait for the first byte of the response on C{connection}, which must be
    L{_stamped}, and leave it there to be read: when it arrived, by the
    kernel's stamp (or now, on a connection closed without a byte).
    """
    data, ancillary, _, _ = connection.recvmsg(1, _ANCILLARY, socket.MSG_PEEK)
    stamp = _stamp(ancillary) if data else None
    return time.time() if stamp is None else stamp


def _stamp(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """
    The kernel's software stamp among a message's C{ancillary} data, if any.
    """
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPING:
            seconds, nanoseconds, *_ = _TIMESTAMPING.unpack_from(data)
            if seconds or nanoseconds:
                return float(seconds + nanoseconds / 1e9)
    return None


def fetch_drain(url: str, hash_body: bool = False, timeout: float = 600) -> Fetch:
    """
    C{GET} C{url} like L{fetch} and count the body's bytes without hashing
    them, whatever C{hash_body} says: a client that costs the machine as
    little as a client can, so that the server sets the pace. Its C{sha256}
    is C{""}: only the status and the size of its body can be checked.
    """
    return fetch(url, hash_body=False, timeout=timeout)


#: The kinds of client a scenario can use, by name: C{recv} reads raw
#: sockets into one buffer, C{read1} is L{fetch_read1}, C{drain} is
#: L{fetch_drain}.
CLIENTS: dict[str, Callable[..., Fetch]] = {
    "recv": fetch,
    "read1": fetch_read1,
    "drain": fetch_drain,
}

#: The kinds of client that hash what they read, whose bodies can be checked
#: against their digest.
HASHING = frozenset({"recv", "read1"})


def _fetch_or_fail(kind: str, url: str, hash_body: bool, timeout: float) -> Fetch:
    """
    One fetch by a client of C{kind}; a connection that is refused, reset
    or closed before a response is a L{Fetch} with status 0 and its error.
    """
    started = time.monotonic()
    try:
        return CLIENTS[kind](url, hash_body, timeout=timeout)
    except (OSError, http.client.HTTPException) as e:
        failed = time.monotonic() - started
        return Fetch(0, 0, 0.0, failed, "", started, f"{type(e).__name__}: {e}")


def together(count: int, client: Callable[[int, float], T]) -> list[T]:
    """
    C{client(n, began)} for each C{n} below C{count}, each on a thread of its
    own, all let go at once at C{began} (on the monotonic clock): their
    results, in order.
    """
    # Every thread is started before the first client is let go: starting
    # threads one by one while the earlier ones already read spread 256
    # clients "at once" over four seconds, each start waiting for the GIL
    # behind the readers.
    go = threading.Event()
    began = 0.0

    def run(n: int) -> T:
        go.wait()
        return client(n, began)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(run, n) for n in range(count)]
        began = time.monotonic()
        go.set()
        return [f.result() for f in futures]


def fetch_staggered(
    url: str,
    count: int,
    spread: float,
    timeout: float,
    hash_body: bool = True,
    kind: str = "recv",
) -> list[Fetch]:
    """
    C{count} clients of C{kind} (see L{CLIENTS}) fetching C{url} at once,
    arriving evenly over C{spread} seconds (all together when it is 0).
    Clients that fail to connect or read come back with their error.
    """

    def client(n: int, began: float) -> Fetch:
        delay = began + spread * n / count - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return _fetch_or_fail(kind, url, hash_body, timeout)

    return together(count, client)


def fetch_together(urls: Sequence[str], timeout: float, kind: str) -> list[Fetch]:
    """
    One client of C{kind} for each of C{urls}, all at once, each on its own
    connection: their fetches, in the order of C{urls}.
    """
    return together(
        len(urls), lambda n, _: _fetch_or_fail(kind, urls[n], True, timeout)
    )


@define
class Pull:
    """
    One client's pull of one image.

    @ivar blobs: the config's digest and fetch, then each layer's, in the
        manifest's order; empty when the manifest could not be had.
    @ivar started: when it started, on the monotonic clock.
    @ivar done: seconds from its start to the end of its last body.
    @ivar error: why the manifest could not be had or read, or C{""}.
    """

    blobs: list[tuple[str, Fetch]]
    started: float
    done: float
    error: str = ""


def pull_image(url: str, name: str, tag: str, timeout: float, kind: str) -> Pull:
    """
    Pull the image C{name:tag} from the registry at C{url} the way containerd
    does: the manifest by tag, then its config, then its layers in the
    manifest's order, L{LAYERS_AT_ONCE} at a time, each read by a client of
    C{kind} on its own connection. A manifest that cannot be had or is not
    an image manifest is a L{Pull} with no blobs and its error.
    """
    started = time.monotonic()
    request = urllib.request.Request(
        f"{url}/v2/{name}/manifests/{tag}", headers={"Accept": IMAGE_ACCEPT}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            manifest = json.load(response)
        config = manifest["config"]["digest"]
        layers = [layer["digest"] for layer in manifest["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        failed = time.monotonic() - started
        return Pull([], started, failed, f"manifest: {type(e).__name__}: {e}")
    blob = f"{url}/v2/{name}/blobs/"
    fetched = [(config, _fetch_or_fail(kind, blob + config, True, timeout))]
    with ThreadPoolExecutor(max_workers=LAYERS_AT_ONCE) as pool:
        fetched += zip(
            layers,
            pool.map(lambda d: _fetch_or_fail(kind, blob + d, True, timeout), layers),
            strict=True,
        )
    return Pull(fetched, started, time.monotonic() - started)


def pull_together(
    url: str, name: str, tag: str, clients: int, timeout: float, kind: str
) -> list[Pull]:
    """
    C{clients} clients pulling C{name:tag} from C{url} at once (see
    L{pull_image}).
    """
    return together(clients, lambda *_: pull_image(url, name, tag, timeout, kind))


def fetch_for(url: str, clients: int, seconds: float) -> tuple[int, float]:
    """
    C{clients} clients fetching C{url} without hashing, each again and again
    until C{seconds} have passed: the bytes they received, and the seconds it
    took them (the last fetch started before the end is let finish).
    """
    began = time.monotonic()

    def client() -> int:
        received = 0
        while time.monotonic() - began < seconds:
            got = fetch(url, hash_body=False)
            if got.status != 200:
                raise RuntimeError(f"{url}: status {got.status}")
            received += got.size
        return received

    with ThreadPoolExecutor(max_workers=clients) as pool:
        moved = sum(pool.map(lambda _: client(), range(clients)))
    return moved, time.monotonic() - began


def fetch_each_until(urls: Sequence[str], stop: threading.Event) -> int:
    """
    Fetch C{urls} one after the other, without hashing, until C{stop} is set:
    how many came with a 200 and their whole body.
    """
    whole = 0
    for url in urls:
        if stop.is_set():
            break
        got = fetch(url, hash_body=False)
        whole += got.status == 200 and got.size > 0
    return whole


def stalled_clients(url: str, count: int) -> list[socket.socket]:
    """
    C{count} clients that ask for C{url} and then never read.
    """
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        sockets.append(s)
    return sockets


@define
class Throughput:
    requests_per_second: float
    p99_ms: float


def ab(url: str, seconds: int, connections: int, head: bool = False) -> Throughput:
    """
    Run ApacheBench with keep-alive against C{url} (C{HEAD} requests with
    C{head}); its requests per second and 99th percentile latency.

    ApacheBench speaks HTTP/1.0, whose keep-alive Twisted does not honour:
    against blobserve each request is a new connection (see L{wrk}, which
    waits for a body after a C{HEAD}, so cannot replace it there).
    """
    argv = ["ab", "-q", "-k", f"-c{connections}", f"-t{seconds}", "-n1000000"]
    if head:
        argv += ["-i", "-H", f"Accept: {OCI_MANIFEST}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, check=True, timeout=seconds + 30
    ).stdout.decode()
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    if failed is None or int(failed.group(1)) or "Non-2xx" in out:
        raise RuntimeError(f"ab saw failed requests:\n{out}")
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\d+)", out, re.M)
    assert rate is not None and p99 is not None, out
    return Throughput(float(rate.group(1)), float(p99.group(1)))


#: wrk's latencies: a number and its unit.
_WRK_LATENCY = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def wrk(url: str, seconds: int, connections: int) -> Throughput:
    """
    Run wrk against C{url}: C{GET} over C{connections} HTTP/1.1 connections
    kept alive, as registry clients keep theirs; its requests per second
    and 99th percentile latency. Any error or status other than 2xx or 3xx
    fails the run.
    """
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(
        argv, capture_output=True, check=True, timeout=seconds + 30
    ).stdout.decode()
    return wrk_figures(out)


def wrk_figures(out: str) -> Throughput:
    """
    The requests per second and 99th percentile latency in wrk's report
    C{out}; L{RuntimeError} if it saw errors or statuses other than 2xx
    or 3xx.
    """
    if "Non-2xx or 3xx responses" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = _WRK_LATENCY.search(out)
    if rate is None or p99 is None:
        raise RuntimeError(f"wrk said no rate or latency:\n{out}")
    return Throughput(float(rate[1]), float(p99[1]) * _WRK_UNITS[p99[2]])
