"""
twistd wiring: the plugin is found, options parse, the service listens.
"""

import gc
from importlib.metadata import version
from pathlib import Path
from resource import RLIM_INFINITY
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.protocols.policies import WrappingFactory
from twisted.python.usage import UsageError
from twisted.web.resource import IResource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from blobserve.fetch.progress import ProgressLines
from blobserve.ops.access import AccessLog
from blobserve.ops.health import HealthResource
from blobserve.ops.metrics import Metrics, MetricsPage
from blobserve.serve.zerocopy_check import ZeroCopy
from blobserve.shutdown import StopInOrder
from blobserve.store.database import ThreadedDatabase
from blobserve.store.index import StoreIndex
from blobserve.store.layout import index_path
from blobserve.store.lock import StoreLock, StoreLocked
from blobserve.tap import (
    BCRYPT_THREADS,
    LISTEN_BACKLOG,
    PASSWORD_VARIABLE,
    Options,
    _log_start,
    _StoreIndexService,
    _ThreadPoolService,
    descriptors_needed,
    makeService,
    parse_size,
    raise_descriptor_limit,
    with_backlog,
)
from blobserve.upstream.auth import Credentials
from blobserve.web.clientauth import ClientAuthGate
from blobserve.web.resource import RegistryResource
from blobserve.web.site import RegistrySite
from blobserve.web.status import StatusResource

from fakes import LoggedEvents, has_fired, result_of


class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A memory reactor that takes the results of work done in threads (the
    store's index, its start-up checks) and keeps them, undelivered: the
    tests of the wiring never run that work to its end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[object] = []

    def callFromThread(self, f: Any, *args: object, **kwargs: object) -> None:
        self.from_threads.append(f)


def resource_at(site: Site, path: bytes) -> Any:
    """
    The resource C{site} answers C{path} with.
    """
    found: IResource = site.getResourceFor(DummyRequest(path.split(b"/")[1:]))
    return found


def test_plugin_is_found() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["blobserve"].options is Options


def test_defaults() -> None:
    options = Options()
    options.parseOptions([])
    assert options["listen"] == ["tcp:5000:interface=127.0.0.1"]
    assert options["upstreams"] == {"docker.io": "https://registry-1.docker.io"}
    assert options["storage"] == "./blobserve-data"
    assert options["upstream-retries"] == 5
    assert options["upstream-concurrency"] == 16
    assert options["upstream-queue"] == 256
    assert options["max-blob-size"] == 64 * 2**30
    assert options["tag-ttl"] == 60.0
    assert options["client-timeout"] == 60.0
    assert options["max-connections"] == 1024
    assert options["max-size"] is None
    assert options["min-free"] is None
    assert options["shutdown-grace"] == 10.0
    assert options["partial-max-age"] == 86400.0


def test_flags() -> None:
    options = Options()
    options.parseOptions(
        [
            "--listen",
            r"tcp6:6000:interface=\:\:1",
            "--upstream",
            "http://127.0.0.1:5100",
            "--storage",
            "/srv/blobs",
            "--upstream-idle-timeout",
            "5",
            "--upstream-queue",
            "0",
            "--max-blob-size",
            "1500M",
            "--client-timeout",
            "7.5",
            "--max-connections",
            "4",
            "--max-size",
            "50G",
            "--min-free",
            "512M",
            "--shutdown-grace",
            "0",
            "--partial-max-age",
            "3600",
        ]
    )
    assert options["max-size"] == 50 * 2**30
    assert options["min-free"] == 512 * 2**20
    assert options["shutdown-grace"] == 0.0
    assert options["partial-max-age"] == 3600.0
    assert options["upstream-queue"] == 0
    assert options["max-blob-size"] == 1500 * 2**20
    assert options["listen"] == [r"tcp6:6000:interface=\:\:1"]
    assert options["upstreams"] == {"127.0.0.1:5100": "http://127.0.0.1:5100"}
    assert options["storage"] == "/srv/blobs"
    assert options["upstream-idle-timeout"] == 5.0
    assert options["client-timeout"] == 7.5
    assert options["max-connections"] == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["--upstream", "registry-1.docker.io"],
        ["--upstream", "ftp://example"],
        ["--upstream", "docker.io=https://a", "--upstream", "docker.io=https://b"],
        ["--upstream-timeout", "0"],
        ["--upstream-idle-timeout", "soon"],
        ["--upstream-retries", "-1"],
        ["--upstream-concurrency", "0"],
        ["--upstream-queue", "-1"],
        ["--upstream-segments", "0"],
        ["--upstream-segments", "17"],
        # Leading zeros hide no number past the bound.
        ["--upstream-segments", "0017"],
        ["--upstream-segments", "0100"],
        ["--upstream-segments", "four"],
        ["--upstream-segments", "9" * 5000],
        ["--segment-size", "0"],
        ["--segment-size", "big"],
        ["--max-blob-size", "0"],
        ["--max-blob-size", "12X"],
        ["--max-blob-size", "1" * 5000],
        ["--max-connections", "0"],
        ["--max-size", "0"],
        ["--max-size", "lots"],
        ["--min-free", "-1G"],
        ["--client-timeout", "0"],
        ["--shutdown-grace", "-1"],
        ["--shutdown-grace", "inf"],
        ["--client-timeout", "inf"],
        ["--upstream-timeout", "nan"],
        ["--partial-max-age", "0"],
        ["--upstream-password-file", "/nonexistent"],
        ["--upstream-username", "alice", "--upstream-password-file", "/nonexistent"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        Options().parseOptions(argv)


def test_password_comes_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    options = Options()
    options.parseOptions(
        ["--upstream-username", "alice", "--upstream-password-file", str(secret)]
    )
    assert options["credentials"] == Credentials("alice", "s3cret")


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, "s3cret")
    options = Options()
    options.parseOptions(["--upstream-username", "alice"])
    assert options["credentials"] == Credentials("alice", "s3cret")


def test_username_without_password_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    with pytest.raises(UsageError):
        Options().parseOptions(["--upstream-username", "alice"])


def test_no_credentials_by_default() -> None:
    options = Options()
    options.parseOptions([])
    assert options["credentials"] is None


def test_several_upstreams_first_is_default() -> None:
    options = Options()
    options.parseOptions(
        [
            "--upstream",
            "https://registry-1.docker.io/",
            "-u",
            "ghcr.io=https://ghcr.io",
            "--upstream=mirror.test=http://127.0.0.1:5100",
        ]
    )
    assert list(options["upstreams"].items()) == [
        ("docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io"),
        ("mirror.test", "http://127.0.0.1:5100"),
    ]


@pytest.mark.parametrize(
    "listen, backlog",
    [
        ("tcp:5555:interface=127.0.0.1", LISTEN_BACKLOG),
        # A backlog given is kept.
        ("tcp:5555:interface=127.0.0.1:backlog=64", 64),
    ],
)
def test_service_listens_where_told_and_serves_the_registry(
    tmp_path: Path, listen: str, backlog: int
) -> None:
    options = Options()
    options.parseOptions(["--listen", listen, "--storage", str(tmp_path)])
    reactor = ThreadedMemoryReactor()
    service = makeService(options, reactor)
    servers = [s for s in service if isinstance(s, StreamServerEndpointService)]
    assert len(servers) == 1

    service.startService()
    port, factory, queued, interface = reactor.tcpServers[0]
    assert (port, interface, queued) == (5555, "127.0.0.1", backlog)
    assert isinstance(factory, WrappingFactory)
    site = factory.wrappedFactory
    assert isinstance(site, Site)
    assert isinstance(resource_at(site, b"/v2/"), RegistryResource)
    assert isinstance(resource_at(site, b"/_blobserve/status"), StatusResource)
    assert isinstance(resource_at(site, b"/_blobserve/health"), HealthResource)
    assert (tmp_path / "blobs").is_dir()
    assert (tmp_path / "tmp").is_dir()
    service.stopService()


@pytest.mark.parametrize(
    "given, listened",
    [
        ("tcp:5000", f"tcp:5000:backlog={LISTEN_BACKLOG}"),
        (
            "TCP6:80:interface=\\:\\:1",
            f"TCP6:80:interface=\\:\\:1:backlog={LISTEN_BACKLOG}",
        ),
        ("unix:/run/b.sock", f"unix:/run/b.sock:backlog={LISTEN_BACKLOG}"),
        # A path that merely contains the word is no backlog given.
        (
            "unix:/run/a\\:backlog=3",
            f"unix:/run/a\\:backlog=3:backlog={LISTEN_BACKLOG}",
        ),
        ("tcp:5000:backlog=64", "tcp:5000:backlog=64"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_the_listen_backlog_is_raised_where_not_given(
    given: str, listened: str
) -> None:
    assert with_backlog(given) == listened


def sites_of(flags: list[str], tmp_path: Path) -> tuple[Site, dict[str, Any]]:
    """
    The main site of the service C{flags} make, and the factory of each of
    its listeners by endpoint, without starting it.
    """
    options = Options()
    options.parseOptions(["--storage", str(tmp_path), *flags])
    service = makeService(options, ThreadedMemoryReactor())
    listeners = {
        f"{s.endpoint._port}:{s.endpoint._interface}": s.factory
        for s in service
        if isinstance(s, StreamServerEndpointService)
    }
    main: Site = next(iter(listeners.values())).wrappedFactory
    return main, listeners


def test_metrics_and_the_access_log_are_on_by_default(tmp_path: Path) -> None:
    site, _ = sites_of([], tmp_path)
    assert isinstance(site, RegistrySite)
    assert [type(o) for o in site.observers] == [AccessLog, Metrics]
    assert isinstance(resource_at(site, b"/metrics"), MetricsPage)
    # The status page shows the metrics' cache counts.
    metrics = site.observers[1]
    assert isinstance(metrics, Metrics)
    assert resource_at(site, b"/_blobserve/status")._cache == metrics.cache_counts


def test_metrics_may_listen_apart(tmp_path: Path) -> None:
    site, servers = sites_of(
        ["--metrics-listen", "tcp:9102:interface=127.0.0.1"], tmp_path
    )
    assert not isinstance(resource_at(site, b"/metrics"), MetricsPage)
    metrics_site = servers["9102:127.0.0.1"].wrappedFactory
    assert isinstance(resource_at(metrics_site, b"/metrics"), MetricsPage)
    assert not isinstance(resource_at(metrics_site, b"/v2/"), RegistryResource)


def test_metrics_and_the_access_log_may_be_turned_off(tmp_path: Path) -> None:
    site, _ = sites_of(["--no-metrics", "--no-access-log"], tmp_path)
    assert isinstance(site, RegistrySite)
    assert site.observers == ()
    assert not isinstance(resource_at(site, b"/metrics"), MetricsPage)


def test_metrics_listen_without_metrics_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--no-metrics"):
        Options().parseOptions(["--no-metrics", "--metrics-listen", "tcp:9102"])


def test_the_service_stops_listening_then_ends_clients_and_downloads_then_the_rest(
    tmp_path: Path,
) -> None:
    options = Options()
    options.parseOptions(["--storage", str(tmp_path)])
    service = makeService(options, MemoryReactor())
    # Children stop one after another, the last first.
    assert isinstance(service, StopInOrder)
    kinds = [type(s).__name__ for s in service]
    assert kinds[:4] == [
        "_StoreIndexService",
        "_ConnectionPoolService",
        "GracefulStop",
        "StreamServerEndpointService",
    ]


@pytest_twisted.ensureDeferred
async def test_start_removes_unrecorded_downloads_once_the_index_has_loaded(
    tmp_path: Path,
) -> None:
    (tmp_path / "tmp").mkdir()
    stray = tmp_path / "tmp" / "sha256-abc.1234"
    stray.write_bytes(b"partial")
    options = Options()
    options.parseOptions(
        ["--storage", str(tmp_path), "--listen", "tcp:0:interface=127.0.0.1"]
    )
    service = makeService(options, reactor)
    # Until the index says which unfinished downloads to keep, none goes.
    assert stray.exists()
    service.startService()
    try:
        for _ in range(200):
            if not stray.exists():
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert not stray.exists()
    finally:
        await service.stopService()
        gc.unfreeze()


def test_a_store_in_use_is_refused_before_anything_in_it_changes(
    tmp_path: Path,
) -> None:
    # twistd exits non-zero when makeService raises. The store's other user
    # (blobserve-fsck, or a running blobserve) keeps its temporaries.
    (tmp_path / "tmp").mkdir()
    in_progress = tmp_path / "tmp" / "sha256-abc.1234"
    in_progress.write_bytes(b"a download of the blobserve that runs")
    options = Options()
    options.parseOptions(["--storage", str(tmp_path)])
    fsck = StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    try:
        with pytest.raises(StoreLocked, match="in use by blobserve-fsck"):
            makeService(options, MemoryReactor())
    finally:
        fsck.release()
    assert in_progress.exists()


@pytest_twisted.ensureDeferred
async def test_the_store_stays_locked_until_its_index_is_closed(
    tmp_path: Path,
) -> None:
    (tmp_path / "blobs").mkdir()
    database = ThreadedDatabase(index_path(str(tmp_path)), reactor)  # type: ignore[arg-type]
    index = StoreIndex(str(tmp_path), database, reactor)
    service = _StoreIndexService(
        database, index, StoreLock.acquire(str(tmp_path), "blobserve")
    )
    service.startService()
    stopping = service.stopService()
    # The index is still being written and closed on its thread.
    with pytest.raises(StoreLocked):
        StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    await stopping
    StoreLock.acquire(str(tmp_path), "blobserve-fsck").release()


def test_start_puts_the_startup_heap_out_of_the_collectors_sight(
    tmp_path: Path,
) -> None:
    options = Options()
    options.parseOptions(["--storage", str(tmp_path)])
    service = makeService(options, ThreadedMemoryReactor())
    gc.unfreeze()
    service.startService()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        service.stopService()
        gc.unfreeze()


def test_service_sends_with_sendfile_only_once_its_self_test_has_passed(
    tmp_path: Path,
) -> None:
    options = Options()
    options.parseOptions(["--storage", str(tmp_path)])
    reactor = ThreadedMemoryReactor()
    service = makeService(options, reactor)
    [zero_copy] = [s for s in service if isinstance(s, ZeroCopy)]
    [server] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    resource = resource_at(server.factory.wrappedFactory, b"/v2/")
    assert resource._sink_for == zero_copy.sink_for

    service.startService()
    try:
        # The self-test listens on loopback, and has not passed yet.
        _, _, _, interface = reactor.tcpServers[-1]
        assert interface == "127.0.0.1"
        assert not has_fired(zero_copy.checked())
    finally:
        service.stopService()
        gc.unfreeze()
    assert result_of(zero_copy.checked()) is False
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("flags", "said", "max_size", "min_free"),
    [
        ([], "--max-size none (no limit), --min-free none", None, None),
        (
            ["--max-size", "2M", "--min-free", "1K"],
            "--max-size 2097152 bytes, --min-free 1024 bytes",
            2 * 2**20,
            1024,
        ),
    ],
)
def test_the_store_limits_are_said_at_start_and_shown_in_the_status(
    tmp_path: Path,
    flags: list[str],
    said: str,
    max_size: int | None,
    min_free: int | None,
) -> None:
    options = Options()
    options.parseOptions(["--storage", str(tmp_path), *flags])
    with LoggedEvents() as logged:
        service = makeService(options, MemoryReactor())
    [start] = [m for m in logged.messages() if m.startswith("blobserve ")]
    assert f"; store limits: {said};" in start
    [server] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    site = server.factory.wrappedFactory
    store = resource_at(site, b"/_blobserve/status")._store_status()
    assert (store["max_size"], store["min_free"]) == (max_size, min_free)
    resource = resource_at(site, b"/v2/")
    # Downloads reserve room with the same evictor.
    assert resource._downloads._create.keywords["evictor"].max_size == max_size


def test_the_start_line_says_what_is_served_from_where_within_which_limits(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-Pa55\n")
    options = Options()
    options.parseOptions(
        [
            "--storage",
            str(tmp_path / "store"),
            "--listen",
            "tcp:5001",
            "--upstream",
            "docker.io=https://registry-1.docker.io",
            "--upstream",
            "http://mirror.test:5000/",
            "--upstream-username",
            "alice",
            "--upstream-password-file",
            str(secret),
            "--max-size",
            "2G",
            "--max-connections",
            "99",
            "--tag-ttl",
            "1.5",
            "--metrics-listen",
            "tcp:9102",
            "--node-name",
            "cache-1",
        ]
    )
    with LoggedEvents() as logged:
        makeService(options, MemoryReactor())
    [start] = [m for m in logged.messages() if m.startswith("blobserve ")]
    assert start == (
        f"blobserve {version('blobserve')} starting as node cache-1: listening on"
        " tcp:5001,"
        " metrics on tcp:9102;"
        " upstreams docker.io=https://registry-1.docker.io with credentials,"
        " mirror.test:5000=http://mirror.test:5000;"
        f" storage {tmp_path / 'store'};"
        f" store limits: --max-size {2 * 2**30} bytes, --min-free none;"
        f" --max-blob-size {64 * 2**30} bytes, --max-connections 99,"
        " --upstream-concurrency 16, --upstream-queue 256,"
        " --client-timeout 60s, --tag-ttl 1.5s"
    )
    said = "\n".join(logged.messages())
    for secret_word in ("s3cret-Pa55", "alice"):
        assert secret_word not in said


def test_an_upstream_url_with_a_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(UsageError, match="no user or password") as refused:
        Options().parseOptions(["--upstream", "https://bob:hunter2@registry.test"])
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("500M", 500 * 2**20),
        ("64G", 64 * 2**30),
        ("2T", 2 * 2**40),
        ("10k", 10 * 2**10),
        ("3GiB", 3 * 2**30),
        ("7 MB", 7 * 2**20),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@given(st.text(max_size=30))
def test_a_size_is_positive_or_refused(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert size >= 1


def served_site(
    tmp_path: Path, *flags: str
) -> tuple[IProtocolFactory, MemoryReactorClock, MultiService]:
    """
    The started service's site, listening on a reactor that is also a clock.
    """
    options = Options()
    options.parseOptions(["--storage", str(tmp_path), *flags])
    reactor = ThreadedMemoryReactor()
    service = makeService(options, reactor)
    service.startService()
    factory: IProtocolFactory = reactor.tcpServers[0][1]
    return factory, reactor, service


def connect(factory: IProtocolFactory, transport: StringTransport) -> IProtocol:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    assert protocol is not None
    protocol.makeConnection(transport)
    return protocol


def test_a_request_is_cut_off_at_the_client_timeout_on_the_reactors_clock(
    tmp_path: Path,
) -> None:
    factory, reactor, service = served_site(tmp_path, "--client-timeout", "5")
    try:
        transport = StringTransport()
        protocol = connect(factory, transport)
        for byte in b"GET /v2/ HTTP/1.1\r\nX-Slow: aaaaaaaaaa":
            if transport.disconnected:
                break
            protocol.dataReceived(bytes([byte]))
            reactor.advance(1)
        assert transport.disconnected
        assert reactor.seconds() == 5
    finally:
        service.stopService()


def test_connections_beyond_max_connections_are_answered_503(tmp_path: Path) -> None:
    factory, _, service = served_site(tmp_path, "--max-connections", "1")
    try:
        connect(factory, StringTransport())
        second = StringTransport()
        connect(factory, second)
        assert second.value().startswith(b"HTTP/1.1 503 ")
    finally:
        service.stopService()


class UnlistenableReactor(MemoryReactor):
    def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        raise CannotListenError("127.0.0.1", port, OSError(98, "Address in use"))


def test_a_port_that_cannot_be_listened_on_fails_the_start(tmp_path: Path) -> None:
    # twistd exits non-zero when starting the service raises.
    options = Options()
    options.parseOptions(["--storage", str(tmp_path)])
    service = makeService(options, UnlistenableReactor())
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


@pytest.mark.parametrize(
    ("soft", "hard", "raised_to", "warned"),
    [
        (1024, 524288, 524288, False),
        (1024, 1024, 1024, True),
        (4096, RLIM_INFINITY, 5000, False),
        (100_000, 200_000, 200_000, False),
    ],
)
def test_the_limit_of_open_files_is_raised_and_a_low_one_is_said(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    raised_to: int,
    warned: bool,
) -> None:
    limits = [(soft, hard)]
    monkeypatch.setattr("blobserve.tap.getrlimit", lambda _: limits[-1])
    monkeypatch.setattr(
        "blobserve.tap.setrlimit", lambda _, value: limits.append(value)
    )
    with LoggedEvents() as logged:
        assert raise_descriptor_limit(5000) == raised_to
    assert limits[-1] == (raised_to, hard)
    assert any("open files are allowed" in m for m in logged.messages()) == warned


def test_descriptors_needed_grow_with_the_limits() -> None:
    assert descriptors_needed(1024, 16) > 2 * 1024
    assert descriptors_needed(2048, 16) > descriptors_needed(1024, 16)


def test_progress_lines_come_every_ten_seconds_unless_turned_off(
    tmp_path: Path,
) -> None:
    def progress_lines(*arguments: str) -> list[ProgressLines]:
        options = Options()
        storage = tmp_path / str(len(arguments))
        options.parseOptions(["--storage", str(storage), *arguments])
        service = makeService(options, ThreadedMemoryReactor())
        return [s for s in service if isinstance(s, ProgressLines)]

    [lines] = progress_lines()
    assert lines._interval == 10.0
    [lines] = progress_lines("--progress-interval", "2.5")
    assert lines._interval == 2.5
    assert progress_lines("--progress-interval=0") == []


def test_upstream_credentials_for_each_registry(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.write_text("bob:one\n")
    second = tmp_path / "config.json"
    second.write_text(
        '{"auths": {"https://ghcr.io": {"username": "eve", "password": "two"}}}'
    )
    options = Options()
    options.parseOptions(
        [
            "--upstream=mirror.test=http://127.0.0.1:5100",
            "--upstream=https://ghcr.io",
            "--upstream=https://quay.io",
            f"--upstream-credentials=mirror.test={first}",
            f"--upstream-credentials=ghcr.io={second}",
        ]
    )
    assert options["registry-credentials"] == {
        "mirror.test": Credentials("bob", "one"),
        "ghcr.io": Credentials("eve", "two"),
    }


def test_upstream_username_stays_the_default_registrys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, "s3cret")
    other = tmp_path / "other"
    other.write_text("bob:one")
    options = Options()
    options.parseOptions(
        [
            "--upstream=https://ghcr.io",
            "--upstream-username=alice",
            "--upstream=https://quay.io",
            f"--upstream-credentials=quay.io={other}",
        ]
    )
    assert options["registry-credentials"] == {
        "ghcr.io": Credentials("alice", "s3cret"),
        "quay.io": Credentials("bob", "one"),
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--upstream-credentials=nowhere.test={file}"],
        ["--upstream-credentials={file}"],
        ["--upstream-credentials=docker.io=/nonexistent"],
        ["--upstream-credentials=docker.io={empty}"],
        [
            "--upstream-credentials=docker.io={file}",
            "--upstream-credentials=docker.io={file}",
        ],
        [
            "--upstream-username=alice",
            "--upstream-password-file={file}",
            "--upstream-credentials=docker.io={file}",
        ],
    ],
)
def test_unusable_upstream_credentials_are_usage_errors(
    tmp_path: Path, argv: list[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("bob:s3cret\n")
    empty = tmp_path / "empty"
    empty.write_text("s3cret\n")
    with pytest.raises(UsageError) as raised:
        Options().parseOptions([a.format(file=secret, empty=empty) for a in argv])
    assert "s3cret" not in str(raised.value)


def test_start_line_says_which_registries_have_credentials(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("bob:s3cret\n")
    options = Options()
    options.parseOptions(
        [
            "--upstream=https://ghcr.io",
            "--upstream=https://quay.io",
            "--upstream=https://gcr.io",
            f"--upstream-credentials=quay.io={secret}",
            f"--upstream-credentials=gcr.io={secret}",
        ]
    )
    with LoggedEvents() as logged:
        _log_start(options)
    [line] = logged.messages()
    assert "ghcr.io=https://ghcr.io," in line
    assert "quay.io=https://quay.io with credentials" in line
    assert "gcr.io=https://gcr.io with credentials" in line
    assert "s3cret" not in line


def test_htpasswd_puts_client_authentication_before_all_but_open_paths(
    tmp_path: Path,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:$2y${hashed[4:]}\n")
    options = Options()
    options.parseOptions(["--storage", str(tmp_path), f"--htpasswd={htpasswd}"])
    with LoggedEvents() as logged:
        service = makeService(options, MemoryReactorClock())
    [start] = [m for m in logged.messages() if m.startswith("blobserve ")]
    assert f"clients authenticate as one of 1 users of {htpasswd}" in start
    [server] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    site = server.factory.wrappedFactory
    assert isinstance(site.resource, ClientAuthGate)
    # Checks run in threads of their own, not in the reactor's pool.
    [threads] = [s for s in service if isinstance(s, _ThreadPoolService)]
    assert (threads._pool.name, threads._pool.max) == ("bcrypt", BCRYPT_THREADS)

    def request_for(path: bytes) -> DummyRequest:
        request = DummyRequest(path.split(b"/")[1:])
        request.path = path  # type: ignore[attr-defined]
        return request

    health = site.getResourceFor(request_for(b"/_blobserve/health"))
    assert isinstance(health, HealthResource)
    assert isinstance(site.getResourceFor(request_for(b"/metrics")), MetricsPage)
    for path in (b"/v2/", b"/_blobserve/status", b"/_blobserve/health/"):
        request = request_for(path)
        refusal = site.getResourceFor(request)
        assert not isinstance(refusal, RegistryResource | StatusResource), path
        refusal.render(request)
        assert request.responseCode == 401, path


@pytest.mark.parametrize("content", [None, "alice:$apr1$x$y\n", ""])
def test_unusable_htpasswd_is_a_usage_error(
    tmp_path: Path, content: str | None
) -> None:
    htpasswd = tmp_path / "htpasswd"
    if content is not None:
        htpasswd.write_text(content)
    with pytest.raises(UsageError, match="--htpasswd"):
        Options().parseOptions([f"--htpasswd={htpasswd}"])


def test_the_node_name_goes_to_the_site_the_status_and_the_metrics(
    tmp_path: Path,
) -> None:
    site, _ = sites_of(["--node-name", "cache-3"], tmp_path)
    assert isinstance(site, RegistrySite)
    assert site.node_header == b"cache-3"
    assert resource_at(site, b"/_blobserve/status")._node == "cache-3"
    [metrics] = [o for o in site.observers if isinstance(o, Metrics)]
    assert b'blobserve_node_info{node="cache-3"' in generate_latest(metrics.registry)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "caché", "a\r\nX: y"])
def test_a_node_name_a_header_cannot_carry_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="node name"):
        Options().parseOptions(["--node-name", name])


@pytest.mark.parametrize(
    ("flags", "segments", "segment_size"),
    [
        (["--upstream-segments", "3", "--segment-size", "2M"], 3, 2 * 1024 * 1024),
        # The defaults: four segments for a blob over 64 MiB.
        ([], 4, 64 * 1024 * 1024),
    ],
)
def test_segmented_fetch_flags_reach_the_downloads(
    tmp_path: Path, flags: list[str], segments: int, segment_size: int
) -> None:
    options = Options()
    options.parseOptions(["--storage", str(tmp_path), *flags])
    service = makeService(options, MemoryReactor())
    [server] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    site = server.factory.wrappedFactory
    made = resource_at(site, b"/v2/")._downloads._create.keywords
    assert (made["segments"], made["segment_size"]) == (segments, segment_size)
