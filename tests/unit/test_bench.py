"""
The benchmark's plan of steps for its flags, and how it judges a body: no
servers are started.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

import pytest

from bench import load, servers
from bench.__main__ import (
    CACHES,
    IMAGE_LAYERS_MIB,
    IN_FLIGHT_WHEN_CUT,
    SMOKE_IMAGE_LAYERS_KIB,
    MiB,
    _medians,
    _rounded,
    fetched_once,
    flags,
    plan,
    wrong_bodies,
)
from bench.servers import BLOB_PATH, family, trafficserver_records, varnish_vcl


def arguments(**overrides: Any) -> argparse.Namespace:
    """
    The flags of C{python -m bench} at their defaults, but for C{overrides}
    (only the image scenario unless told).
    """
    defaults = vars(flags().parse_args([]))
    return argparse.Namespace(**{**defaults, "scenarios": "image", **overrides})


def steps(**overrides: Any) -> list[tuple[str, dict[str, Any]]]:
    """
    The steps C{plan} yields for the flags: each one's method name and
    keyword arguments.
    """
    return [
        (step.func.__name__, step.keywords)  # type: ignore[attr-defined]
        for step in plan(arguments(**overrides))
    ]


def test_image_measures_the_floor_then_each_system_with_prefetch_beside_blobserve() -> (
    None
):
    layers = tuple(m * MiB for m in IMAGE_LAYERS_MIB)
    assert sum(layers) == 472 * MiB
    floor = {"name": "direct", "layer_sizes": layers, "clients": 1, "kind": "recv"}
    assert steps(systems="blobserve,nginx-cache") == [("image", floor)] + [
        ("image", {"name": name, "layer_sizes": layers, "clients": n, "kind": "recv"})
        for n in (2, 32)
        for name in ("blobserve", "nginx-cache", "blobserve-prefetch")
    ]


def test_image_without_blobserve_runs_no_prefetching_blobserve() -> None:
    names = [keywords["name"] for _, keywords in steps(systems="nginx-cache")]
    assert names == ["direct", "nginx-cache", "nginx-cache"]


def test_image_clients_hash_even_when_only_drain_clients_are_asked_for() -> None:
    kinds = {
        keywords["kind"]
        for _, keywords in steps(client_kinds="drain", systems="blobserve")
    }
    assert kinds == {"recv"}


def test_image_runs_once_for_each_kind_of_client_that_hashes() -> None:
    floors = [
        keywords["kind"]
        for _, keywords in steps(client_kinds="recv,read1,drain", systems="blobserve")
        if keywords["name"] == "direct"
    ]
    assert floors == ["recv", "read1"]


def test_smoke_pulls_a_tiny_image_with_two_clients_and_runs_drain_in_the_crowd() -> (
    None
):
    image = steps(smoke=True, systems="blobserve", scenarios="image")
    assert {keywords["layer_sizes"] for _, keywords in image} == {
        tuple(k * 1024 for k in SMOKE_IMAGE_LAYERS_KIB)
    }
    assert {keywords["clients"] for _, keywords in image} == {1, 2}
    crowd = steps(smoke=True, systems="blobserve", scenarios="crowd")
    assert [keywords["kind"] for _, keywords in crowd] == [
        "read1",
        "read1",
        "drain",
        "drain",
    ]


def test_cold_and_crowd_run_every_kind_of_client_asked_for() -> None:
    planned = steps(
        client_kinds="recv,read1,drain",
        systems="blobserve",
        scenarios="cold,crowd",
        sizes="64",
        clients="8",
    )
    assert [(name, keywords.get("kind")) for name, keywords in planned] == [
        ("cold", None),  # the direct fetch, the floor
        ("cold", "recv"),
        ("cold", "read1"),
        ("cold", "drain"),
        # Each kind against blobserve, then nginx serving the file.
        ("crowd", "recv"),
        ("crowd_nginx", "recv"),
        ("crowd", "read1"),
        ("crowd_nginx", "read1"),
        ("crowd", "drain"),
        ("crowd_nginx", "drain"),
    ]


def fetch(status: int = 200, size: int = 10, sha256: str = "ab") -> load.Fetch:
    return load.Fetch(status, size, 0.0, 1.0, sha256, 0.0)


def test_a_body_that_was_not_hashed_is_judged_by_its_status_and_size() -> None:
    drained = fetch(sha256="")
    short, refused = fetch(size=9, sha256=""), fetch(status=0, size=0, sha256="")
    assert wrong_bodies([drained, short, refused], 10, "ab") == [short, refused]


def test_a_hashed_body_must_match_the_digest() -> None:
    right, other = fetch(), fetch(sha256="cd")
    assert wrong_bodies([right, other], 10, "ab") == [other]


def test_drain_is_a_client_kind_that_does_not_hash() -> None:
    assert "drain" in load.CLIENTS
    assert "drain" not in load.HASHING
    assert set(load.CLIENTS) > load.HASHING


def test_clients_together_are_all_let_go_once_every_thread_has_started() -> None:
    seen: list[tuple[int, float, float]] = []

    def client(n: int, began: float) -> int:
        seen.append((n, began, time.monotonic()))
        return n * n

    assert load.together(64, client) == [n * n for n in range(64)]
    let_go = {began for _, began, _ in seen}
    assert len(let_go) == 1
    assert all(ran >= began > 0 for _, began, ran in seen)


def test_segmented_runs_the_direct_floor_then_one_and_four_segments() -> None:
    planned = steps(scenarios="segmented")
    assert [(name, keywords.get("segments")) for name, keywords in planned] == [
        ("segmented_floor", None),
        ("segmented", 1),
        ("segmented", 4),
    ]
    assert {keywords["size"] for _, keywords in planned} == {1024 * MiB}
    assert {keywords["segment_size"] for _, keywords in planned[1:]} == {64 * MiB}


def test_the_smoke_run_fetches_a_small_blob_in_small_segments() -> None:
    planned = steps(smoke=True, scenarios="segmented")
    assert {keywords["size"] for _, keywords in planned} == {4 * MiB}
    # Four segments of 1 MiB: CI runs segmented fetch end to end.
    assert {keywords["segment_size"] for _, keywords in planned[1:]} == {MiB}


def test_a_blob_is_fetched_once_in_one_get_or_one_per_segment() -> None:
    small, big = 64 * MiB, 64 * MiB + 1
    assert fetched_once(1, small, small)
    assert not fetched_once(2, small, small)
    # What was in flight when the first segment was cut comes twice.
    assert fetched_once(4, big + IN_FLIGHT_WHEN_CUT, big)
    assert not fetched_once(4, big + IN_FLIGHT_WHEN_CUT + 1, big)
    assert not fetched_once(5, big, big)
    assert not fetched_once(4, big - 1, big)
    # Without segments, a big blob too is one GET of its bytes.
    assert not fetched_once(2, big, big, segments=1)


def test_varnish_and_traffic_server_are_systems_to_compare() -> None:
    names = [
        keywords["name"]
        for _, keywords in steps(
            scenarios="cold", systems="varnish,trafficserver", sizes="64", clients="8"
        )
    ]
    assert names == ["direct", "varnish", "trafficserver"]
    assert {"varnish", "trafficserver"} <= set(CACHES)


def test_a_run_compares_varnish_but_not_traffic_server_unless_told() -> None:
    systems = arguments().systems.split(",")
    assert "varnish" in systems
    assert "trafficserver" not in systems


def test_blob_paths_are_the_urls_the_peers_keep_for_a_year() -> None:
    digest = "sha256:" + "ab" * 32
    assert re.search(BLOB_PATH, f"/v2/bench/blobs/blobs/{digest}")
    assert not re.search(BLOB_PATH, f"/v2/bench/blobs/manifests/{digest}")
    assert not re.search(BLOB_PATH, "/v2/bench/blobs/blobs/sha256:ab")


def test_varnish_caches_blob_200s_and_streams_them() -> None:
    vcl = varnish_vcl("http://127.0.0.1:8123")
    assert '.host = "127.0.0.1"; .port = "8123";' in vcl
    response = vcl[vcl.index("sub vcl_backend_response") :]
    condition = f'if (beresp.status == 200 && bereq.url ~ "{BLOB_PATH}")'
    assert condition in response
    kept = response[response.index(condition) :]
    for line in (
        "set beresp.ttl = 365d;",
        "set beresp.do_stream = true;",
        "return (deliver);",
    ):
        assert line in kept


def test_a_peer_needs_an_upstream_with_a_port() -> None:
    with pytest.raises(ValueError, match="no host and port"):
        varnish_vcl("http://127.0.0.1")


def test_traffic_server_collapses_misses_and_reads_while_writing() -> None:
    records = dict(
        line.split(" ")[1::2]
        for line in trafficserver_records(8124).splitlines()
        if line.startswith("CONFIG ")
    )
    assert records["proxy.config.http.server_ports"] == "8124:ip-in=127.0.0.1"
    assert records["proxy.config.cache.enable_read_while_writer"] == "1"
    assert records["proxy.config.http.cache.open_write_fail_action"] == "5"
    assert records["proxy.config.cache.max_doc_size"] == "0"
    assert records["proxy.config.http.background_fill_completed_threshold"] == "0.0"


def test_a_servers_family_is_it_and_its_descendants() -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert sorted(family(10, parents)) == [10, 11, 12, 13]
    assert family(21, parents) == [21]


def test_the_machines_cpu_time_counts_this_process_working() -> None:
    before = servers.machine_cpu_seconds()
    spent = time.process_time()
    while time.process_time() - spent < 0.1:
        pass
    # In whole clock ticks, and other processes only add to it.
    assert servers.machine_cpu_seconds() - before >= 0.08


WRK_REPORT = """Running 5s test @ http://127.0.0.1:8080/v2/small/blobs/sha256:ab
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.93ms    2.04ms  30.02ms   87.88%
    Req/Sec     1.01k    88.10     1.19k    73.00%
  Latency Distribution
     50%  {p50}
     75%    8.35ms
     90%    9.57ms
     99%  {p99}
  10102 requests in 5.01s, 41.62MB read
{errors}Requests/sec:   2016.51
Transfer/sec:      8.31MB
"""


@pytest.mark.parametrize(
    ("p99", "ms"),
    [
        ("15.39ms", 15.39),
        ("812.00us", 0.812),
        ("1.20s", 1200.0),
        ("1.50m", 90_000.0),
    ],
)
def test_wrk_figures_are_its_rate_and_99th_percentile_in_ms(
    p99: str, ms: float
) -> None:
    report = WRK_REPORT.format(p50="7.62ms", p99=p99, errors="")
    figures = load.wrk_figures(report)
    assert figures.requests_per_second == 2016.51
    assert figures.p99_ms == pytest.approx(ms)


@pytest.mark.parametrize(
    "errors",
    [
        "  Non-2xx or 3xx responses: 12\n",
        "  Socket errors: connect 0, read 3, write 0, timeout 0\n",
    ],
)
def test_a_wrk_run_with_errors_fails(errors: str) -> None:
    report = WRK_REPORT.format(p50="7.62ms", p99="15.39ms", errors=errors)
    with pytest.raises(RuntimeError, match="wrk saw failed requests"):
        load.wrk_figures(report)


def test_warm_rounds_alternate_blobserve_and_nginx_for_each_number_of_clients() -> None:
    planned = steps(scenarios="warm-rounds")
    assert [(name, kw["clients"], kw["rounds"]) for name, kw in planned] == [
        ("warm_rounds", 8, 4),
        ("warm_rounds", 32, 4),
    ]
    smoke = steps(scenarios="warm-rounds", smoke=True)
    assert [(name, kw["rounds"]) for name, kw in smoke] == [("warm_rounds", 2)]


def test_the_default_run_and_the_smoke_run_alternate_warm_rounds() -> None:
    assert "warm-rounds" in flags().parse_args([]).scenarios.split(",")


def test_figures_over_rounds_are_their_medians() -> None:
    rounds = [
        {"mib_per_s": 3000.0, "cpu_s_per_gib": 0.3},
        {"mib_per_s": 1000.0, "cpu_s_per_gib": 0.2},
        {"mib_per_s": 2000.0, "cpu_s_per_gib": 0.25},
    ]
    assert _medians(rounds) == {"mib_per_s": 2000.0, "cpu_s_per_gib": 0.25}
    assert _rounded({"mib_per_s": 2000.04, "cpu_s_per_gib": 0.256, "n": 3}) == {
        "mib_per_s": 2000.0,
        "cpu_s_per_gib": 0.26,
        "n": 3,
    }
