"""
blobserve-haproxy-config: the HAProxy configuration for a cluster, the file
shipped in deploy/haproxy/, and the addresses it accepts. What HAProxy does
with it runs in tests/integration/test_cluster.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from blobserve import cluster
from blobserve.cluster import (
    BALANCE_BY_SHARD,
    PRINTED,
    WRONG_USAGE,
    AddressError,
    haproxy_config,
    main,
)

SHIPPED = Path(__file__).parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
#: The nodes deploy/haproxy/haproxy.cfg is written for.
THREE = ["10.0.0.1:5000", "10.0.0.2:5000", "10.0.0.3:5000"]
DIGEST = "sha256:" + "ab" * 32

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
    reason="HAProxy is not installed (`make test` installs Debian's haproxy)",
)


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return subprocess.run(
        [binary, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_shipped_file_is_what_the_command_prints_for_three_nodes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(THREE) == PRINTED
    assert SHIPPED.read_text() == capsys.readouterr().out


@needs_haproxy
def test_haproxy_accepts_the_shipped_file() -> None:
    checked = haproxy_check(SHIPPED)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_haproxy
def test_haproxy_accepts_a_config_for_other_nodes_and_addresses(
    tmp_path: Path,
) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        haproxy_config(["127.0.0.1:5001", "[::1]:5002", "localhost:5003"], ":8080")
    )
    checked = haproxy_check(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_nodes_are_servers_in_order_with_their_place_on_the_ring() -> None:
    config = haproxy_config(THREE)
    servers = re.findall(r"^\s+server (\S+) (\S+) id (\d+)$", config, re.M)
    assert servers == [
        ("node1", THREE[0], "1"),
        ("node2", THREE[1], "2"),
        ("node3", THREE[2], "3"),
    ]


def test_a_node_added_at_the_end_leaves_the_others_where_they_were() -> None:
    def servers(config: str) -> list[str]:
        return [line for line in config.splitlines() if "server node" in line]

    before = servers(haproxy_config(THREE))
    after = servers(haproxy_config([*THREE, "10.0.0.4:5000"]))
    assert after[:3] == before
    assert len(after) == 4


def test_digests_are_hashed_consistently_and_nodes_health_checked() -> None:
    lines = [line.strip() for line in haproxy_config(THREE).splitlines()]
    assert BALANCE_BY_SHARD in lines
    assert "hash-type consistent" in lines
    assert "option httpchk GET /_blobserve/health" in lines
    assert "http-check expect status 200" in lines
    assert "http-request set-var(txn.shard) path,field(-1,/) if by_digest" in lines
    # Requests are streamed, never held until complete.
    assert not any(line.startswith("option http-buffer-request") for line in lines)


def test_retries_go_to_another_node_for_get_and_head_only() -> None:
    lines = [line.strip() for line in haproxy_config(THREE).splitlines()]
    assert "option redispatch 1" in lines
    assert "retry-on conn-failure empty-response" in lines
    # METH_GET is HAProxy's ACL for GET and HEAD.
    assert "http-request disable-l7-retry unless METH_GET" in lines


def test_timeouts_let_a_long_transfer_stream() -> None:
    config = haproxy_config(THREE)
    timeouts = dict(re.findall(r"^\s+timeout (\S+) (\d+)m$", config, re.M))
    assert int(timeouts["server"]) >= 10
    assert int(timeouts["client"]) >= 10


@pytest.mark.parametrize(
    "path",
    [
        f"/v2/library/alpine/blobs/{DIGEST}",
        f"/v2/a/b/c/manifests/{DIGEST}",
        "/v2/x/blobs/sha512:" + "0f" * 64,
        "/v2/x/blobs/multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
    ],
)
def test_a_path_by_digest_is_keyed_by_its_digest(path: str) -> None:
    # The ACL's pattern, as HAProxy's regex engine reads it (PCRE, which
    # agrees with Python's re on this pattern).
    assert re.search(cluster._BY_DIGEST, path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/",
        "/v2/library/alpine/manifests/latest",
        "/v2/library/alpine/tags/list",
        f"/v2/library/alpine/referrers/{DIGEST}",
        "/v2/library/alpine/blobs/uploads/",
        f"/v2/library/alpine/blobs/{DIGEST}/extra",
    ],
)
def test_any_other_path_is_keyed_by_the_whole_path(path: str) -> None:
    assert not re.search(cluster._BY_DIGEST, path)


@pytest.mark.parametrize(
    "nodes",
    [
        ["10.0.0.1"],
        ["10.0.0.1:0"],
        ["10.0.0.1:65536"],
        ["::1:5000"],
        ["host name:5000"],
        ["10.0.0.1:5000\n    server evil 10.0.0.9:80"],
        ["10.0.0.1:5000", "10.0.0.1:5000"],
        [],
    ],
)
def test_addresses_that_are_not_host_port_are_refused(nodes: list[str]) -> None:
    with pytest.raises(AddressError):
        haproxy_config(nodes)


@pytest.mark.parametrize(
    "listen", ["5000", "0.0.0.0", "*:", ":0", "a b:5000", "**:5000"]
)
def test_listen_addresses_that_are_not_addr_port_are_refused(listen: str) -> None:
    with pytest.raises(AddressError):
        haproxy_config(THREE, listen)


def test_the_listen_address_is_where_haproxy_binds() -> None:
    lines = [line.strip() for line in haproxy_config(THREE, ":8080").splitlines()]
    assert "bind :8080" in lines
    lines = [line.strip() for line in haproxy_config(THREE, "*:80").splitlines()]
    assert "bind *:80" in lines
    lines = [line.strip() for line in haproxy_config(THREE).splitlines()]
    assert "bind 0.0.0.0:5000" in lines


def test_a_wrong_node_is_a_usage_error_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["10.0.0.1:5000", "nonsense"]) == WRONG_USAGE
    said = capsys.readouterr()
    assert said.out == ""
    assert "'nonsense' is not HOST:PORT" in said.err
