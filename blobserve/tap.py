"""
What C{twistd blobserve} runs: command-line options and the service they make.
"""

from __future__ import annotations

import gc
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit, setrlimit
from typing import Any, ClassVar
from urllib.parse import urlsplit

from prometheus_client import disable_created_metrics
from treq.client import HTTPClient
from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.pages import notFound

from blobserve.config import (
    apply_config,
    check_endpoint,
    given_options,
    read_config,
    upstream_url,
)
from blobserve.fetch.download import NO_EVENTS, Download
from blobserve.fetch.inflight import InFlightTable
from blobserve.fetch.layers import LayerPrefetcher
from blobserve.fetch.progress import ProgressLines, ProgressSampler
from blobserve.fetch.retry import RetryPolicy
from blobserve.fetch.slots import UpstreamSlots
from blobserve.ops.access import AccessLog, IExchangeObserver
from blobserve.ops.health import HealthResource, LagMonitor, store_check
from blobserve.ops.logs import (
    FORMATS,
    CannotLogThere,
    check_destination,
    twistd_json_observer,
    twistd_text_observer,
)
from blobserve.ops.metrics import Figures, Metrics, MetricsPage
from blobserve.serve.zerocopy_check import ZeroCopy, self_test
from blobserve.shutdown import GracefulStop, StopInOrder
from blobserve.store.database import ThreadedDatabase
from blobserve.store.eviction import Evictor
from blobserve.store.files import DirectoryBlobStore
from blobserve.store.index import StoreIndex
from blobserve.store.layout import index_path, temporary_directory
from blobserve.store.lock import StoreLock
from blobserve.textfile import UnreadableFile, read_text_file
from blobserve.upstream.auth import Credentials
from blobserve.upstream.client import (
    NO_ANSWERS,
    QuietConnectionPool,
    RegistryUpstream,
    Upstreams,
)
from blobserve.upstream.credentials import UnusableCredentials, read_credentials
from blobserve.web.clientauth import (
    ClientAuthenticator,
    ClientAuthGate,
    UnusableHtpasswd,
    htpasswd_reloader,
    read_htpasswd,
)
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache
from blobserve.web.resource import RegistryResource
from blobserve.web.root import OPEN_PATHS, site_root
from blobserve.web.site import IConnectionCounts, IConnections, registry_site
from blobserve.web.status import StatusResource

log = Logger()

#: How many --htpasswd checks (bcrypt) run at once.
BCRYPT_THREADS = 2

#: How many connections --metrics-listen takes at once.
METRICS_CONNECTIONS = 16

#: Seconds between two looks at whether the --htpasswd file changed.
HTPASSWD_CHECK_INTERVAL = 5.0

#: The environment variable that may hold the upstream password.
PASSWORD_VARIABLE = "BLOBSERVE_UPSTREAM_PASSWORD"

#: The registry mirrored when no --upstream is given: Docker Hub.
DEFAULT_REGISTRY = "docker.io"
DEFAULT_UPSTREAM = "https://registry-1.docker.io"

#: Where blobserve listens when no --listen is given.
DEFAULT_LISTEN = "tcp:5000:interface=127.0.0.1"

#: How many connections the kernel queues for blobserve to accept, on an
#: endpoint whose string does not say: a rollout's nodes connect at once, and
#: beyond Twisted's default of 50 a connection waits for a SYN retry (a
#: second or more). As many as --max-connections allows by default; Linux
#: caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024

# Endpoint types that take a backlog= argument.
_WITH_BACKLOG = frozenset({"tcp", "tcp6", "unix", "ssl"})


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    The server endpoint string C{description}, with C{backlog=} added if it
    is of a type that takes one and does not give it.
    """
    kind = re.split(r"(?<!\\):", description, maxsplit=1)[0].strip().lower()
    if kind not in _WITH_BACKLOG or re.search(r"(?<!\\):backlog=", description):
        return description
    return f"{description}:backlog={backlog}"


def _positive_float(value: str) -> float:
    number = float(value)
    # (A timer of "inf" seconds never fires: no bound at all.)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"must be a positive number, not {value}")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"must not be negative, not {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative, not {value}")
    return number


def _node_name(value: str) -> str:
    """
    A node name: what a response header and a metric label can carry.
    """
    if not 0 < len(value) <= 64 or not all(
        c.isascii() and (c.isalnum() or c in "-._") for c in value
    ):
        raise ValueError(
            "a node name is 1 to 64 letters, digits, '-', '.' or '_',"
            f" not {value[:70]!r}"
        )
    return value


def _positive_count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return number


#: The most parallel range requests one blob is fetched over.
MAX_SEGMENTS = 16


def _segments(value: str) -> int:
    text = value.strip()
    # Leading zeros dropped, so that a bounded length bounds the number
    # before int() reads it (CPython refuses more than 4300 digits).
    digits = text.lstrip("0")
    if (
        not (text.isascii() and text.isdigit())
        or len(digits) > 2
        or not 1 <= int(digits or "0") <= MAX_SEGMENTS
    ):
        raise ValueError(f"must be from 1 to {MAX_SEGMENTS}, not {value[:40]!r}")
    return int(digits)


def _log_format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}, not {value[:40]!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: str) -> int:
    """
    A size in bytes, from a number of bytes or of binary kilo-, mega-, giga-
    or terabytes (C{500M}, C{64G}, C{2T}; a trailing C{B} or C{iB} is allowed).

    @raise ValueError: if it is no such size, or not positive.
    """
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    if not (number.isascii() and number.isdigit()) or len(number) > 15:
        raise ValueError(f"not a size: {value[:40]!r}")
    size = int(number) * _SIZE_UNITS[unit]
    if size < 1:
        raise ValueError(f"must be at least one byte, not {value[:40]!r}")
    return size


class Options(usage.Options):
    """
    C{twistd blobserve} options.
    """

    optFlags: ClassVar[list[list[str | None]]] = [
        [
            "no-metrics",
            None,
            "Serve no Prometheus metrics (and count nothing for them).",
        ],
        ["no-access-log", None, "Log no line per request."],
        [
            "prefetch-layers",
            None,
            "When an image manifest is served, fetch its config and layers"
            " that the store lacks before clients ask for them (for rollouts).",
        ],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        [
            "config",
            "c",
            None,
            "A TOML file of settings, a key for each option (see README.rst,"
            " Configuration file); options given here win over it.",
        ],
        [
            "metrics-listen",
            None,
            None,
            "Serve the Prometheus metrics at /metrics on this endpoint"
            " (a Twisted server endpoint string) instead of on --listen's.",
        ],
        ["storage", "s", "./blobserve-data", "The directory blobs are kept in."],
        [
            "upstream-username",
            None,
            None,
            "User name for the default upstream. The password comes from"
            " --upstream-password-file or the environment variable"
            f" {PASSWORD_VARIABLE}, never from the command line.",
        ],
        [
            "upstream-password-file",
            None,
            None,
            "A file holding the password for --upstream-username.",
        ],
        [
            "htpasswd",
            None,
            None,
            "Make clients authenticate with HTTP Basic, as a user of this"
            " htpasswd file of bcrypt entries (htpasswd -B), on every path but"
            " /_blobserve/health and /metrics. The file is read again when it"
            " changes.",
        ],
        [
            "upstream-retries",
            None,
            5,
            "How often a broken upstream transfer is resumed before the"
            " download fails.",
            _count,
        ],
        [
            "upstream-retry-delay",
            None,
            0.5,
            "Seconds before the first resume of a broken transfer; each next"
            " waits twice as long (at most 30 s).",
            _positive_float,
        ],
        [
            "upstream-concurrency",
            None,
            16,
            "How many blob downloads may talk to upstreams at once; more wait"
            " their turn, first come first served.",
            _positive_count,
        ],
        [
            "upstream-segments",
            None,
            4,
            "Over how many parallel range requests a blob larger than"
            " --segment-size is fetched, when its upstream declares its length"
            " and honours ranges (1 to 16; 1: one connection per blob). Each"
            " request past the first takes an --upstream-concurrency slot, only"
            " if one is free.",
            _segments,
        ],
        [
            "segment-size",
            None,
            "64M",
            "Blobs larger than this (bytes, or with K, M, G or T) are fetched"
            " over --upstream-segments range requests.",
            parse_size,
        ],
        [
            "upstream-queue",
            None,
            256,
            "How many blob downloads may wait for an upstream slot; beyond"
            " that, and after waiting --upstream-timeout for a slot, clients"
            " get 503 TOOMANYREQUESTS with Retry-After.",
            _count,
        ],
        [
            "max-blob-size",
            None,
            "64G",
            "The largest blob fetched (bytes, or with K, M, G or T): an"
            " upstream declaring more is refused with 403 DENIED, a body"
            " without a length is cut off past it.",
            parse_size,
        ],
        [
            "max-size",
            None,
            None,
            "The most bytes of blobs the store may hold (bytes, or with K, M,"
            " G or T). Over it after a commit, the least recently used blobs"
            " that no response is reading are evicted until the store holds"
            " 95 % of it; a download that would not fit even then is refused"
            " with 507 UNAVAILABLE before anything is written. Default: no"
            " limit.",
            parse_size,
        ],
        [
            "min-free",
            None,
            None,
            "The fewest bytes to keep free on the store's file system (bytes,"
            " or with K, M, G or T): under it, blobs are evicted as for"
            " --max-size until 5 % of it more is free. Default: none.",
            parse_size,
        ],
        [
            "client-timeout",
            None,
            60.0,
            "Seconds after which a client is dropped: when its request is not"
            " complete that long after its first byte, when it sends nothing"
            " that long before or between requests, or when it takes nothing"
            " of a response that long.",
            _positive_float,
        ],
        [
            "max-connections",
            None,
            1024,
            "How many client connections may be open at once; one more is"
            " answered 503 and closed at once, and those open go on.",
            _positive_count,
        ],
        [
            "tag-ttl",
            None,
            60.0,
            "Seconds a tag's digest is trusted before the upstream is asked again.",
            _positive_float,
        ],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds to wait for a connection to the upstream, for its"
            " response headers, and for a whole manifest or token (token"
            " servers included); also the longest a download waits for its"
            " turn (--upstream-queue).",
            _positive_float,
        ],
        [
            "upstream-idle-timeout",
            None,
            30.0,
            "Seconds an upstream body may send nothing before its connection"
            " is dropped and the transfer resumed.",
            _positive_float,
        ],
        [
            "shutdown-grace",
            None,
            10.0,
            "Seconds responses in progress may take to end once blobserve is"
            " told to stop (SIGTERM): it no longer listens, and cuts the"
            " connections still busy after that. Downloads whose bytes have"
            " all arrived are committed; the others are kept, to be resumed"
            " after the restart.",
            _seconds,
        ],
        [
            "node-name",
            None,
            socket.gethostname(),
            "This node's name, for a cluster: in the start-up line, the"
            " status page, the metrics (blobserve_node_info) and the"
            " X-Blobserve-Node header of every response. Default: the host"
            " name.",
            _node_name,
        ],
        [
            "progress-interval",
            None,
            10.0,
            "Seconds between two log lines on the progress of a download in"
            " flight (bytes so far, rate, clients); none for a download that"
            " ends sooner. 0 turns them off.",
            _seconds,
        ],
        [
            "partial-max-age",
            None,
            86400.0,
            "Seconds after its last write that an unfinished download kept"
            " from an earlier run (stopped or killed) can still be resumed; at"
            " start, older ones are removed.",
            _positive_float,
        ],
        [
            "log-format",
            None,
            "text",
            "How the log is written: text (Twisted's lines) or json (one JSON"
            " object a line, for a log shipper), where twistd writes its log"
            " (--logfile; stdout with --nodaemon and no --logfile). Not with"
            " --syslog.",
            _log_format,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["upstreams"] = {}
        self["upstream-credentials"] = {}
        self._given: set[str] = set()

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Which options the command line gives, before they are parsed:
        # they win over the --config file, whether they come before or after it.
        self._given = given_options(self, sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, value: str) -> None:
        try:
            check_endpoint(value)
        except ValueError as e:
            raise usage.UsageError(f"--listen {e}") from None
        self["listen"].append(value)

    opt_listen.__doc__ = (
        "Where to listen, as a Twisted server endpoint string; repeat to listen"
        f" on several (e.g. TCP and a UNIX socket). [default: {DEFAULT_LISTEN}]"
    )
    opt_l = opt_listen

    def opt_upstream(self, value: str) -> None:
        registry, url = parse_upstream(value)
        if registry in self["upstreams"]:
            raise usage.UsageError(f"--upstream given twice for {registry}")
        self["upstreams"][registry] = url

    # twistd shows an option method's docstring as it is: keep it one line.
    opt_upstream.__doc__ = (
        "A registry to mirror, as URL or REGISTRY=URL; repeat for more registries."
        " The first is the default for requests without ?ns=."
        " [default: docker.io=https://registry-1.docker.io]"
    )
    opt_u = opt_upstream

    def opt_upstream_credentials(self, value: str) -> None:
        registry, separator, path = value.partition("=")
        if not separator or not registry or not path:
            raise usage.UsageError(
                f"--upstream-credentials needs REGISTRY=FILE, not {value[:80]!r}"
            )
        if registry in self["upstream-credentials"]:
            raise usage.UsageError(f"--upstream-credentials given twice for {registry}")
        self["upstream-credentials"][registry] = path

    opt_upstream_credentials.__doc__ = (
        "REGISTRY=FILE: the credentials for the --upstream named REGISTRY, from"
        " FILE: user:password on one line, or a docker config.json (its auths"
        " entry for the registry); repeat for more registries."
    )

    def postOptions(self) -> None:
        if self["config"] is not None:
            apply_config(self, read_config(self["config"], self), self._given)
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["upstreams"]:
            self["upstreams"] = {DEFAULT_REGISTRY: DEFAULT_UPSTREAM}
        self["credentials"] = self._credentials()
        self["registry-credentials"] = self._registry_credentials()
        self["htpasswd-users"] = None
        if self["htpasswd"] is not None:
            try:
                self["htpasswd-users"] = read_htpasswd(self["htpasswd"])
            except UnusableHtpasswd as e:
                raise usage.UsageError(f"--htpasswd {self['htpasswd']} {e}") from None
        if self["no-metrics"] and self["metrics-listen"]:
            raise usage.UsageError("--metrics-listen serves metrics: drop --no-metrics")
        if isinstance(self["max-blob-size"], str):  # the default is not coerced
            self["max-blob-size"] = parse_size(self["max-blob-size"])
        if isinstance(self["segment-size"], str):
            self["segment-size"] = parse_size(self["segment-size"])
        if self["log-format"] == "json":
            try:
                check_destination(self.twistd_options())
            except CannotLogThere as e:
                raise usage.UsageError(str(e)) from None

    def twistd_options(self) -> dict[str, Any]:
        """
        twistd's own options (C{--logfile}, C{--nodaemon}, ...), or none if
        these were not parsed as twistd's subcommand.
        """
        parent = getattr(self, "parent", None)
        return dict(parent) if parent is not None else {}

    def _credentials(self) -> Credentials | None:
        username = self["upstream-username"]
        password_file = self["upstream-password-file"]
        if username is None:
            if password_file is not None:
                raise usage.UsageError(
                    "--upstream-password-file needs --upstream-username"
                )
            return None
        if password_file is not None:
            try:
                password = read_text_file(password_file).rstrip("\r\n")
            except UnreadableFile as e:
                raise usage.UsageError(f"--upstream-password-file {e}") from None
        elif PASSWORD_VARIABLE in os.environ:
            password = os.environ[PASSWORD_VARIABLE]
        else:
            raise usage.UsageError(
                "--upstream-username needs --upstream-password-file"
                f" or {PASSWORD_VARIABLE} in the environment"
            )
        return Credentials(username, password)

    def _registry_credentials(self) -> dict[str, Credentials]:
        """
        The credentials of each registry that has some: the default's from
        C{--upstream-username}, any's from C{--upstream-credentials}.
        """
        upstreams = self["upstreams"]
        found: dict[str, Credentials] = {}
        if self["credentials"] is not None:
            found[next(iter(upstreams))] = self["credentials"]
        for registry, path in self["upstream-credentials"].items():
            if registry not in upstreams:
                raise usage.UsageError(
                    f"--upstream-credentials names {registry!r}, which no"
                    " --upstream mirrors"
                )
            if registry in found:
                raise usage.UsageError(
                    f"--upstream-credentials for {registry!r}, the default"
                    " upstream, which --upstream-username gives credentials to"
                )
            names = (registry, urlsplit(upstreams[registry]).netloc)
            try:
                found[registry] = read_credentials(path, names)
            except UnusableCredentials as e:
                raise usage.UsageError(
                    f"--upstream-credentials for {registry}: {path} {e}"
                ) from None
        return found


def parse_upstream(value: str) -> tuple[str, str]:
    """
    Split an C{--upstream} value into a registry name and a URL. A bare URL's
    registry is its host and port, but Docker Hub's API host stands for
    C{docker.io}, as clients name it.

    @raise usage.UsageError: if the URL is not an http(s) URL with a host,
        or carries a user or password (which would be logged with it).
    """
    registry, separator, url = value.partition("=")
    if not separator:
        registry, url = "", value
    try:
        url = upstream_url(url)
    except ValueError as e:
        raise usage.UsageError(f"--upstream {e}") from None
    if not registry:
        registry = urlsplit(url).netloc
        if registry == urlsplit(DEFAULT_UPSTREAM).netloc:
            registry = DEFAULT_REGISTRY
    return registry, url


class _ConnectionPoolService(Service):
    """
    Closes the upstream connection pool when the service stops.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


class _ThreadPoolService(Service):
    """
    Runs a thread pool while the service runs.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()


class _StoreIndexService(Service):
    """
    Loads the store's index when the service starts (the store serves from
    its files while it loads), then calls C{after_load}, and C{partials_known}
    once it knows the unfinished downloads of earlier runs; writes what is
    pending and closes it when the service stops; only then does it let the
    store's lock go.
    """

    def __init__(
        self,
        database: ThreadedDatabase,
        index: StoreIndex,
        lock: StoreLock,
        after_load: Callable[[], object] = lambda: None,
        partials_known: Callable[[], None] = lambda: None,
    ) -> None:
        self._database = database
        self._index = index
        self._lock = lock
        self._after_load = after_load
        self._partials_known = partials_known
        self._loaded: Deferred[object] | None = None

    def startService(self) -> None:
        super().startService()
        self._database.start()
        self._loaded = (
            self._index.load()
            .addErrback(
                lambda reason: log.failure(
                    "the store index did not load: serving from the files", reason
                )
            )
            .addCallback(lambda _: self._after_load())
        )
        known = self._index.when_partials_known()
        known.addCallback(lambda _: self._partials_known())
        known.addErrback(
            lambda reason: log.failure("could not clean the store up", reason)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        loaded = self._loaded or succeed(None)
        closed = loaded.addBoth(lambda _: self._index.close())

        def release(result: None) -> None:
            self._lock.release()
            return result

        return closed.addBoth(release)


class _FreezeStartupHeap(Service):
    """
    Puts everything alive once the service starts (modules, classes, the
    wiring) out of the garbage collector's sight, so its collections walk
    only what requests create. Without it the first collection after start,
    during the first request, walks every object the imports made: the
    benchmark measured 20 ms more to the first client's first byte.
    """

    def startService(self) -> None:
        super().startService()
        gc.collect()
        gc.freeze()


def _remove_stale_temporaries(store: DirectoryBlobStore) -> None:
    """
    Remove what earlier runs left in the store's C{tmp/} but the unfinished
    downloads young enough to resume, and say so.
    """
    cleanup = store.remove_stale_temporaries()
    if cleanup.kept:
        log.info(
            "kept {count} unfinished downloads ({size} bytes) of an earlier run:"
            " they resume when next asked for",
            count=cleanup.kept,
            size=cleanup.kept_bytes,
        )
    if cleanup.expired:
        log.info(
            "removed {count} unfinished downloads older than --partial-max-age",
            count=cleanup.expired,
        )
    if cleanup.unrecorded:
        log.info(
            "removed {count} unfinished downloads of an earlier run",
            count=cleanup.unrecorded,
        )


def descriptors_needed(max_connections: int, upstream_concurrency: int) -> int:
    """
    How many file descriptors blobserve may hold at once: a socket and a
    reader per client, a socket, a temporary and a reader per download, and
    some to spare (the listener, the logs, the store's index).
    """
    return 2 * max_connections + 3 * upstream_concurrency + 64


def raise_descriptor_limit(needed: int) -> int:
    """
    Raise this process's soft limit of open files to its hard limit, and say
    so in the log if that is still fewer than C{needed}: past the limit new
    connections are closed unanswered, and blobs cannot be opened.

    @return: the soft limit now.
    """
    soft, hard = getrlimit(RLIMIT_NOFILE)
    if hard == RLIM_INFINITY or hard > soft:
        target = needed if hard == RLIM_INFINITY else hard
        if target > soft:
            try:
                setrlimit(RLIMIT_NOFILE, (target, hard))
                soft = target
            except (OSError, ValueError):
                log.failure("could not raise the limit of open files")
    if soft < needed:
        log.warn(
            "only {limit} open files are allowed, and --max-connections and"
            " --upstream-concurrency may need {needed}: raise the limit"
            " (ulimit -n, LimitNOFILE=) or lower --max-connections",
            limit=soft,
            needed=needed,
        )
    return soft


def _log_observer(options: Options) -> Callable[[], ILogObserver] | None:
    """
    What makes the log observer of C{options}' C{--log-format}, where
    blobserve writes its log in twistd's place; L{None} where twistd writes
    it (its syslog, or a daemon's standard output, which it refuses), where
    twistd's C{--logger} names another observer, and where blobserve runs
    under something else than twistd (C{twist}), whose log is its own: the
    observer opens its file at once.
    """
    twistd = options.twistd_options()
    if "nodaemon" not in twistd or twistd.get("logger"):
        return None
    if options["log-format"] == "json":
        return partial(twistd_json_observer, twistd)
    try:
        check_destination(twistd)
    except CannotLogThere:
        return None
    return partial(twistd_text_observer, twistd)


class _BlobserveService(StopInOrder):
    """
    blobserve's services, stopped in order, which give the twistd
    application they join the log observer they are made with, if any:
    twistd uses an application's L{ILogObserver} instead of its own text
    log (unless its C{--logger} names another).
    """

    def __init__(self, log_observer: Callable[[], ILogObserver] | None) -> None:
        super().__init__()
        self._log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes its application only once makeService has returned,
        # and asks it for a log observer once this service has joined it:
        # the one moment a plugin can give it one.
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer())
        super().setServiceParent(parent)


def _bytes_or(size: int | None, otherwise: str) -> str:
    return otherwise if size is None else f"{size} bytes"


def _version() -> str:
    try:
        return version("blobserve")
    except PackageNotFoundError:
        return "(version unknown: not installed)"


def _log_start(options: Options) -> None:
    """
    Say in one line what blobserve serves, from where, and within which
    limits. Of the credentials it says only that there are some.
    """
    credentials = options["registry-credentials"]
    upstreams = ", ".join(
        f"{registry}={url}" + (" with credentials" if registry in credentials else "")
        for registry, url in options["upstreams"].items()
    )
    listen = ", ".join(options["listen"])
    if options["no-metrics"]:
        listen += " (no metrics)"
    elif options["metrics-listen"]:
        listen += f", metrics on {options['metrics-listen']}"
    if options["htpasswd-users"] is not None:
        listen += (
            f", clients authenticate as one of {len(options['htpasswd-users'])}"
            f" users of {options['htpasswd']}"
        )
    log.info(
        "blobserve {version} starting as node {node}: listening on {listen};"
        " upstreams"
        " {upstreams}; storage {storage}; store limits: --max-size {max_size},"
        " --min-free {min_free}; --max-blob-size {max_blob_size} bytes,"
        " --max-connections {max_connections}, --upstream-concurrency"
        " {upstream_concurrency}, --upstream-queue {upstream_queue},"
        " --client-timeout {client_timeout:g}s, --tag-ttl {tag_ttl:g}s",
        version=_version(),
        node=options["node-name"],
        listen=listen,
        upstreams=upstreams,
        storage=os.path.abspath(options["storage"]),
        max_size=_bytes_or(options["max-size"], "none (no limit)"),
        min_free=_bytes_or(options["min-free"], "none"),
        max_blob_size=options["max-blob-size"],
        max_connections=options["max-connections"],
        upstream_concurrency=options["upstream-concurrency"],
        upstream_queue=options["upstream-queue"],
        client_timeout=options["client-timeout"],
        tag_ttl=options["tag-ttl"],
    )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Wire the store, the upstream client, the in-flight table and the web site
    into one service listening where C{options} say.
    """
    if reactor is None:
        from twisted.internet import reactor

    root = options["storage"]
    os.makedirs(root, exist_ok=True)
    # Before anything touches the store: a second blobserve, or one started
    # while blobserve-fsck repairs the store, must change nothing there. It
    # raises StoreLocked, and twistd exits non-zero with the reason. Held
    # until the index is closed at stop, or the process ends.
    lock = StoreLock.acquire(root, "blobserve")
    database = ThreadedDatabase(index_path(root), reactor)
    index = StoreIndex(root, database, reactor)
    store = DirectoryBlobStore(root, index, partial_max_age=options["partial-max-age"])
    evictor = Evictor(store, options["max-size"], options["min-free"])
    _log_start(options)

    metrics = None
    if not options["no-metrics"]:
        # Prometheus needs no "_created" series beside each counter: it
        # tells restarts by counters going down.
        disable_created_metrics()
        metrics = Metrics()
        metrics.identify(options["node-name"], _version())
    pool = QuietConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool, connectTimeout=options["upstream-timeout"])
    client = HTTPClient(agent)
    registries = options["upstreams"]
    default = next(iter(registries))
    upstreams = Upstreams(
        {
            registry: RegistryUpstream(
                url,
                client,
                reactor,
                timeout=options["upstream-timeout"],
                credentials=options["registry-credentials"].get(registry),
                events=(
                    NO_ANSWERS if metrics is None else metrics.upstream_events(registry)
                ),
            )
            for registry, url in registries.items()
        },
        default=default,
    )
    slots = UpstreamSlots(
        options["upstream-concurrency"],
        options["upstream-queue"],
        options["upstream-timeout"],
        reactor,
    )
    downloads = InFlightTable(
        partial(
            Download,
            store=store,
            clock=reactor,
            idle_timeout=options["upstream-idle-timeout"],
            retry=RetryPolicy(
                retries=options["upstream-retries"],
                delay=options["upstream-retry-delay"],
            ),
            slots=slots,
            max_size=options["max-blob-size"],
            evictor=evictor,
            events=NO_EVENTS if metrics is None else metrics,
            segments=options["upstream-segments"],
            segment_size=options["segment-size"],
        )
    )
    manifests = ManifestCache(store, reactor, ttl=options["tag-ttl"])
    zero_copy = ZeroCopy(partial(self_test, reactor, reactor))
    layers = None
    if options["prefetch-layers"]:
        layers = LayerPrefetcher(
            store,
            downloads,
            slots=slots,
            max_size=options["max-blob-size"],
            started=(lambda: None) if metrics is None else metrics.prefetch_started,
        )
    resource = RegistryResource(
        store,
        downloads,
        manifests,
        upstreams,
        clock=reactor,
        client_timeout=options["client-timeout"],
        sink_for=zero_copy.sink_for,
        listings=ListingCache(reactor, ttl=options["tag-ttl"]),
        layers=layers,
    )
    progress = ProgressSampler(downloads, reactor, resource.following)
    status = StatusResource(
        store,
        downloads,
        resource.responses_in_progress,
        evictor.status,
        progress=progress,
        slots=slots,
        cache=None if metrics is None else metrics.cache_counts,
        node=options["node-name"],
    )
    lag = LagMonitor(reactor)
    health = HealthResource(
        {"store": store_check(temporary_directory(root), reactor), "reactor": lag}
    )
    raise_descriptor_limit(
        descriptors_needed(options["max-connections"], options["upstream-concurrency"])
    )
    observers: list[IExchangeObserver] = []
    if not options["no-access-log"]:
        observers.append(AccessLog())
    metrics_page = None
    if metrics is not None:
        observers.append(metrics)

        def figures() -> Figures:
            return Figures(
                downloads=list(downloads),
                clients=sum(resource.following().values()),
                responses=resource.responses_in_progress(),
                store=evictor.status(),
                slots=(slots.taken, slots.waiting),
                connections=IConnectionCounts(site).figures(),
            )

        metrics.watch(figures)
        metrics_page = MetricsPage(metrics.registry)
    root = site_root(
        resource,
        {b"status": status, b"health": health},
        None if options["metrics-listen"] else metrics_page,
    )
    reload_htpasswd = None
    bcrypt_threads = None
    if options["htpasswd-users"] is not None:
        # Threads of their own: checks that pile up (a client guessing from
        # many addresses) wait for these, not for the threads that commit
        # blobs, probe the store's health and resolve upstream names.
        bcrypt_threads = ThreadPool(0, BCRYPT_THREADS, "bcrypt")

        def run_blocking(f: Callable[..., object], *args: object) -> Deferred[Any]:
            return deferToThreadPool(reactor, bcrypt_threads, f, *args)

        authenticator = ClientAuthenticator(
            options["htpasswd-users"], reactor, run_blocking
        )
        root = ClientAuthGate(root, authenticator, OPEN_PATHS)
        reload_htpasswd = htpasswd_reloader(options["htpasswd"], authenticator)
    site = registry_site(
        root,
        timeout=options["client-timeout"],
        max_connections=options["max-connections"],
        reactor=reactor,
        observers=tuple(observers),
        node_name=options["node-name"],
    )

    service = _BlobserveService(_log_observer(options))

    # Once the index is loaded, a store over a limit lowered since the last
    # run is evicted down at once, not at the next commit.
    def loaded() -> Deferred[int]:
        limits = {"max_size": options["max-size"], "min_free": options["min-free"]}
        index.record_settings(
            {key: "" if value is None else str(value) for key, value in limits.items()}
        ).addErrback(lambda reason: log.failure("could not record the limits", reason))
        return evictor.make_room()

    # First in, so last out: the index is written when everything else stopped.
    _StoreIndexService(
        database,
        index,
        lock,
        loaded,
        partial(_remove_stale_temporaries, store),
    ).setServiceParent(service)
    _ConnectionPoolService(pool).setServiceParent(service)
    if bcrypt_threads is not None:
        _ThreadPoolService(bcrypt_threads).setServiceParent(service)
    # Stopped once the listener has stopped, and before the upstream pool
    # and the index, which stopping downloads still need.
    GracefulStop(
        IConnections(site), downloads, options["shutdown-grace"], reactor
    ).setServiceParent(service)
    if layers is not None:
        # Stopped before the downloads are: it starts no more once they stop.
        layers.setServiceParent(service)
    # Unlike a bare StreamServerEndpointService, which only logs a failure
    # to listen and runs on without a port, this one raises it at start, and
    # twistd exits non-zero.
    for endpoint in options["listen"]:
        strports.service(with_backlog(endpoint), site, reactor).setServiceParent(
            service
        )
    if options["metrics-listen"] and metrics_page is not None:
        # Within the same bounds as the registry's site, but a few
        # connections: scrapers are few.
        metrics_site = registry_site(
            site_root(notFound(), {}, metrics_page),
            timeout=options["client-timeout"],
            max_connections=METRICS_CONNECTIONS,
            reactor=reactor,
        )
        strports.service(
            options["metrics-listen"], metrics_site, reactor
        ).setServiceParent(service)
    if reload_htpasswd is not None:
        reloads = TimerService(HTPASSWD_CHECK_INTERVAL, reload_htpasswd)
        reloads.clock = reactor
        reloads.setServiceParent(service)
    _FreezeStartupHeap().setServiceParent(service)
    if options["progress-interval"] > 0:
        lines = ProgressLines(progress, options["progress-interval"], reactor)
        lines.setServiceParent(service)
    # Started after the freeze, which would keep what the self-test makes.
    zero_copy.setServiceParent(service)
    # Stopped first: while blobserve stops, its health check fails.
    lag.setServiceParent(service)
    return service
