"""
The servers a benchmark run starts, each on a free loopback port and stopped
by its PID: the upstream registry, nginx as the throttle in front of it (its
access log counts what the upstream sent), and the systems compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from blobserve.cluster import BALANCE_BY_SHARD, haproxy_config

DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make bench`")
    return path


class Server:
    """
    A process of ours: its PID, its log, its memory and CPU time.
    """

    def __init__(self, name: str, argv: list[str], directory: Path) -> None:
        self.name = name
        self.log = directory / f"{name}.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=directory
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, url: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {url}:\n{self.log.read_text()}")

    def peak_rss(self) -> int:
        """
        The process's peak resident memory so far, in bytes.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def cpu_seconds(self) -> float:
        """
        User and system CPU time the process has used so far.
        """
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=DEADLINE)


def registry(directory: Path, proxy_of: str | None = None) -> tuple[Server, str]:
    """
    Debian's docker-registry with a file-system store; with C{proxy_of}, in
    pull-through proxy mode in front of that URL.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proxy = f"proxy:\n  remoteurl: {proxy_of}\n" if proxy_of else ""
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'data'}\n"
        f"  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{proxy}"
    )
    server = Server(
        "registry-proxy" if proxy_of else "registry",
        [_binary("docker-registry"), "serve", str(config)],
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for(f"{url}/v2/")
    return server, url


def push_blob(registry_url: str, name: str, data: bytes) -> str:
    """
    Upload C{data} as a blob of C{name}; return its digest.
    """
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(
        f"{registry_url}/v2/{name}/blobs/uploads/", method="POST"
    )
    with urllib.request.urlopen(start) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = registry_url + location
    separator = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{separator}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put):
        return digest


def push_manifest(registry_url: str, name: str, tag: str, layer: bytes) -> str:
    """
    Push a one-layer OCI image manifest as C{name:tag}; return its digest.
    """
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    return push_image_manifest(
        registry_url,
        name,
        tag,
        (push_blob(registry_url, name, config), len(config)),
        [(push_blob(registry_url, name, layer), len(layer))],
    )


def push_image_manifest(
    registry_url: str,
    name: str,
    tag: str,
    config: tuple[str, int],
    layers: Sequence[tuple[str, int]],
) -> str:
    """
    Push an OCI image manifest as C{name:tag} naming C{config} and C{layers}
    (each a digest and size, already pushed); return its digest.
    """
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config[0],
                "size": config[1],
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest,
                    "size": size,
                }
                for digest, size in layers
            ],
        }
    ).encode()
    put = urllib.request.Request(
        f"{registry_url}/v2/{name}/manifests/{tag}",
        data=manifest,
        method="PUT",
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(put):
        return "sha256:" + hashlib.sha256(manifest).hexdigest()


def nginx(directory: Path, location: str, http: str = "") -> tuple[Server, str]:
    """
    nginx in one process on a free port, serving C{/} with the C{location}
    directives (and C{http} ones at the top), logging each request's method,
    path, status and body bytes to C{directory/access.log}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "nginx.conf").write_text(
        "daemon off; master_process off; worker_processes 1;\n"
        f"pid {directory / 'nginx.pid'}; error_log {directory / 'error.log'};\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "  log_format bench '$request_method $uri $status $body_bytes_sent';\n"
        f"  access_log {directory / 'access.log'} bench;\n"
        f"  client_body_temp_path {directory}; proxy_temp_path {directory};\n"
        f"  keepalive_requests 100000; {http}\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ {location} }} }}\n"
        "}\n"
    )
    server = Server(
        "nginx",
        [_binary("nginx"), "-p", str(directory), "-c", str(directory / "nginx.conf")],
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for(f"{url}/")
    return server, url


_PROXY = 'proxy_pass {}; proxy_http_version 1.1; proxy_set_header Connection "";'


def throttle(directory: Path, upstream: str, rate: int) -> tuple[Server, str]:
    """
    A proxy to C{upstream} that sends each response at C{rate} bytes per
    second. nginx's C{limit_rate} lets the first second's worth through at
    once, then holds to the rate; it applies only to buffered proxying, and
    buffering in memory alone keeps nginx reading the upstream at the
    client's pace.
    """
    return nginx(
        directory,
        _PROXY.format(upstream)
        + f" proxy_buffering on; proxy_max_temp_file_size 0; limit_rate {rate};",
    )


def static(directory: Path, root: Path) -> tuple[Server, str]:
    """
    nginx serving the files under C{root} with C{sendfile}.
    """
    return nginx(directory, f"root {root}; sendfile on; tcp_nopush on;")


def caching_proxy(directory: Path, upstream: str) -> tuple[Server, str]:
    """
    nginx as a pull-through cache of C{upstream}: C{proxy_cache} with
    C{proxy_cache_lock}, so concurrent misses wait for one fetch.
    """
    cache = directory / "cache"
    return nginx(
        directory,
        _PROXY.format(upstream)
        + " proxy_cache blobs; proxy_cache_valid 200 1h; proxy_cache_lock on;"
        " proxy_cache_lock_timeout 1h; proxy_cache_lock_age 1h;"
        " proxy_read_timeout 1h;",
        http=f"proxy_cache_path {cache} keys_zone=blobs:1m max_size=8g;",
    )


def upstream_traffic(nginx_directory: Path, digest: str) -> tuple[int, int]:
    """
    How many GETs for the blob C{digest} the throttle relayed, and how many
    body bytes.
    """
    gets = sent = 0
    log = nginx_directory / "access.log"
    if not log.exists():
        return 0, 0
    for line in log.read_text().splitlines():
        method, uri, _, size = line.split()
        if method == "GET" and uri.endswith(f"/blobs/{digest}"):
            gets += 1
            sent += int(size)
    return gets, sent


def haproxy(
    directory: Path, nodes: list[str], round_robin: bool = False
) -> tuple[Server, str]:
    """
    HAProxy on a free port in front of C{nodes} (C{host:port} each), with
    the configuration blobserve-haproxy-config prints: each digest on one
    node, or, with C{round_robin}, every request to the next node instead.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = haproxy_config(nodes, f"127.0.0.1:{port}")
    if round_robin:
        assert BALANCE_BY_SHARD in config
        config = config.replace(BALANCE_BY_SHARD, "balance roundrobin")
    (directory / "haproxy.cfg").write_text(config)
    server = Server(
        "haproxy",
        [_binary("haproxy"), "-f", str(directory / "haproxy.cfg")],
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for(f"{url}/v2/")
    return server, url


def blobserve(directory: Path, upstream: str, *flags: str) -> tuple[Server, str]:
    """
    blobserve under twistd, as a user runs it, with an empty store and more
    C{flags}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    twistd = Path(sys.executable).with_name("twistd")
    server = Server(
        "blobserve",
        [
            str(twistd),
            "--nodaemon",
            "--pidfile=",
            "--logfile=blobserve.log",
            "blobserve",
            "--listen=tcp:0:interface=127.0.0.1",
            f"--upstream={upstream}",
            f"--storage={directory / 'storage'}",
            *flags,
        ],
        directory,
    )
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        started = re.search(r"\) starting on (\d+)", server.log.read_text())
        if started:
            url = f"http://127.0.0.1:{started.group(1)}"
            server.wait_for(f"{url}/v2/")
            return server, url
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"blobserve did not start:\n{server.log.read_text()}")
