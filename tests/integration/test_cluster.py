"""
A cluster on loopback: three (then four) blobserve nodes, each with its own
store, behind HAProxy configured by blobserve-haproxy-config, in front of
the real docker-registry behind the throttling relay. Each blob is fetched
from the upstream once across the cluster; a node that dies loses only its
own clients' transfers; a node that joins takes about its share of digests.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from blobserve.digest import Digest

from balancer import HAProxyProcess, haproxy_binary
from checks import assert_correct, until
from clients import Client, Fetch
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None,
    reason="HAProxy is not installed: `make test` installs Debian's haproxy",
)

NODE_HEADER = "x-blobserve-node"


class Cluster:
    """
    blobserve nodes named C{node1}, C{node2}... behind one HAProxy, all
    fetching from C{upstream}.
    """

    def __init__(self, directory: Path, upstream: str) -> None:
        self.directory = directory
        self.upstream = upstream
        self.nodes: list[BlobserveProcess] = []
        self.haproxy = HAProxyProcess(directory)

    async def add_node(self) -> BlobserveProcess:
        name = f"node{len(self.nodes) + 1}"
        here = self.directory / name
        here.mkdir()
        node = BlobserveProcess(
            here, self.upstream, here / "storage", extra=(f"--node-name={name}",)
        )
        self.nodes.append(node)
        await node.start()
        return node

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def url(self, name: str, digest: Digest | str, query: str = "") -> str:
        return f"{self.haproxy.url}/v2/{name}/blobs/{digest}{query}"

    def stop(self) -> None:
        self.haproxy.stop()
        for node in self.nodes:
            node.stop()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path, relay: Relay) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, f"http://127.0.0.1:{relay.port}")
    try:
        for _ in range(3):
            await cluster.add_node()
        cluster.haproxy.start(cluster.addresses)
        yield cluster
    finally:
        cluster.stop()


def fresh_blobs(
    registry: RegistryProcess, name: str, count: int, size: int
) -> Iterator[tuple[Digest, bytes]]:
    for _ in range(count):
        data = os.urandom(size)
        yield registry.push_blob(name, data), data


async def nodes_of(
    client: Client, cluster: Cluster, digests: list[str]
) -> dict[str, str]:
    """
    Which node answers a C{HEAD} for each digest through HAProxy: the digests
    need not exist (a 404 carries the node's name too). At most 16 at once.
    """
    limit = DeferredSemaphore(16)

    async def head(digest: str) -> tuple[str, Fetch]:
        fetch = await limit.run(
            lambda: client.get(
                cluster.url("test/blobs", digest), method="HEAD"
            ).finished()
        )
        return digest, fetch

    answers = await gatherResults([Deferred.fromCoroutine(head(d)) for d in digests])
    nodes = {}
    for digest, fetch in answers:
        assert fetch.status in (200, 404), (digest, fetch.status)
        nodes[digest] = fetch.headers[NODE_HEADER]
    return nodes


@pytest_twisted.ensureDeferred
async def test_each_blob_is_fetched_from_the_upstream_once_across_the_cluster(
    registry: RegistryProcess, relay: Relay, cluster: Cluster, client: Client
) -> None:
    blobs = list(fresh_blobs(registry, "test/blobs", 10, 1024 * 1024))
    downloads = [
        (blobs[n % len(blobs)], client.get(cluster.url("test/blobs", blobs[n % 10][0])))
        for n in range(32)
    ]
    served_by: dict[Digest, set[str]] = {}
    for (digest, data), download in downloads:
        fetch = await download.finished()
        assert_correct(fetch, data)
        served_by.setdefault(digest, set()).add(fetch.headers[NODE_HEADER])
    for digest, _ in blobs:
        assert relay.count("GET", f"/blobs/{digest}") == 1, digest
        # Every client of a digest was served by the one node holding it.
        assert len(served_by[digest]) == 1, served_by[digest]
    # The digests are spread over the nodes (all ten on one node: 3 in 3**10).
    assert len(set().union(*served_by.values())) > 1


@pytest_twisted.ensureDeferred
async def test_a_digest_is_served_by_one_node_under_any_repository_name(
    registry: RegistryProcess, relay: Relay, cluster: Cluster, client: Client
) -> None:
    suffix = os.urandom(4).hex()
    first, second = f"cluster/first-{suffix}", f"cluster/second-{suffix}"
    data = os.urandom(256 * 1024)
    digest = registry.push_blob(first, data)
    # Repository scope: the node serves it under the second name once the
    # upstream holds it there too, which it confirms with one HEAD.
    registry.push_blob(second, data)

    one = await client.get(cluster.url(first, digest)).finished()
    assert_correct(one, data)
    other = await client.get(cluster.url(second, digest)).finished()
    assert_correct(other, data)
    assert one.headers[NODE_HEADER] == other.headers[NODE_HEADER]
    assert relay.count("GET", f"/blobs/{digest}") == 1
    assert relay.count("HEAD", f"/{second}/blobs/{digest}") == 1
    # ?ns= is not part of the key either: the same node answers, whatever it
    # makes of the name.
    named = await client.get(
        cluster.url(first, digest, "?ns=registry.invalid"), method="HEAD"
    ).finished()
    assert named.headers[NODE_HEADER] == one.headers[NODE_HEADER]


@pytest_twisted.ensureDeferred
async def test_a_dead_node_loses_only_its_own_transfers_and_its_digests_move(
    registry: RegistryProcess, relay: Relay, cluster: Cluster, client: Client
) -> None:
    # 8 MiB at the relay's 4 MiB/s: each transfer lasts about two seconds.
    size = 8 * 1024 * 1024
    blobs = dict(fresh_blobs(registry, "test/blobs", 9, size))
    placed = await nodes_of(client, cluster, [str(d) for d in blobs])
    by_node = Counter(placed.values())
    assert len(by_node) > 1, "every digest on one node: run again"
    victim_name = by_node.most_common(1)[0][0]
    (victim,) = [n for n in cluster.nodes if f"--node-name={victim_name}" in n.extra]

    downloads = [
        (digest, client.get(cluster.url("test/blobs", digest)))
        for digest in blobs
        for _ in range(2)
    ]
    # Every transfer under way, none near its end.
    for _, download in downloads:
        await download.when_received(64 * 1024)
    victim.kill()
    fetches = [(digest, await download.finished()) for digest, download in downloads]

    truncated = 0
    for digest, fetch in fetches:
        if placed[str(digest)] != victim_name or fetch.complete:
            assert_correct(fetch, blobs[digest])
        else:
            truncated += 1
            assert fetch.length < size
    assert truncated > 0

    # HAProxy's checks notice, within a few seconds.
    await until(
        lambda: f"nodes/{victim_name} is DOWN" in cluster.haproxy.log.read_text(),
        "HAProxy to take the dead node out",
    )
    moved = {d: data for d, data in blobs.items() if placed[str(d)] == victim_name}
    for digest, data in moved.items():
        retry = await client.get(cluster.url("test/blobs", digest)).finished()
        assert_correct(retry, data)
        assert retry.headers[NODE_HEADER] != victim_name
    # The others' digests stay where they were.
    after = await nodes_of(client, cluster, [str(d) for d in blobs])
    for name, node in placed.items():
        if node != victim_name:
            assert after[name] == node

    # Back on its port, with its store: its share returns to it, and only its.
    revived = BlobserveProcess(
        victim.directory,
        victim.upstream,
        victim.storage,
        flags=[
            f"--listen=tcp:{victim.port}:interface=127.0.0.1",
            f"--upstream={victim.upstream}",
            f"--storage={victim.storage}",
            f"--node-name={victim_name}",
        ],
    )
    cluster.nodes.append(revived)  # stopped with the others
    await revived.start()
    await until(
        lambda: f"nodes/{victim_name} is UP" in cluster.haproxy.log.read_text(),
        "HAProxy to take the node back",
    )
    assert await nodes_of(client, cluster, [str(d) for d in blobs]) == placed


@pytest_twisted.ensureDeferred
async def test_a_node_that_joins_takes_about_its_share_of_digests(
    relay: Relay, cluster: Cluster, client: Client
) -> None:
    # The same digests every run: where each lands is then the same too.
    digests = [f"sha256:{hashlib.sha256(b'%d' % i).hexdigest()}" for i in range(600)]
    before = await nodes_of(client, cluster, digests)
    shares = Counter(before.values())
    assert set(shares) == {"node1", "node2", "node3"}
    # Each node a third: with few points on HAProxy's ring (weight 1) one
    # node took 214 of these 600, and 40 % of 20,000 random ones.
    assert max(shares.values()) / len(digests) < 0.345, shares

    await cluster.add_node()
    await cluster.haproxy.reload(cluster.addresses)
    after = await nodes_of(client, cluster, digests)

    moved = [d for d in digests if after[d] != before[d]]
    # Consistent hashing: a digest moves only to the new node, and about a
    # quarter of them do (a third would be too many).
    assert {after[d] for d in moved} == {"node4"}
    assert 0.1 <= len(moved) / len(digests) <= 0.4, len(moved)
