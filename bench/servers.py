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
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
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


def family(root: int, parents: dict[int, int]) -> list[int]:
    """
    C{root} and its descendants, given each process's parent.
    """
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The parent's PID is the second field after the name.
            parents[int(stat.parent.name)] = int(
                stat.read_text().rsplit(")", 1)[1].split()[1]
            )
        except OSError:
            continue  # it has exited
    return parents


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

    def processes(self) -> list[int]:
        """
        The PIDs of the process and of its descendants alive now: Varnish's
        manager forks the child that does the caching.
        """
        return family(self.pid, _parents())

    def _proc(self, name: str) -> Iterator[str]:
        """
        The file C{/proc/<pid>/<name>} of each process of L{processes} still
        alive.
        """
        for pid in self.processes():
            try:
                yield Path(f"/proc/{pid}/{name}").read_text()
            except OSError:
                continue  # it has exited

    def peak_rss(self) -> int:
        """
        The peak resident memory so far, in bytes, summed over the process
        and its descendants (each one's own peak, so an upper bound when they
        peak at different times).
        """
        return sum(
            int(line.split()[1]) * 1024
            for status in self._proc("status")
            for line in status.splitlines()
            if line.startswith("VmHWM:")
        )

    def cpu_seconds(self) -> float:
        """
        User and system CPU time the process and its descendants have used
        so far.
        """
        ticks = 0
        for stat in self._proc("stat"):
            fields = stat.rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=DEADLINE)


def machine_cpu_seconds() -> float:
    """
    CPU time every process of the machine, and the kernel's own work for
    them, has used so far (all of C{/proc/stat}'s time but idle and I/O
    wait): what serving costs whichever process the kernel charges its
    network work to.
    """
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


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


#: Blob URLs: content-addressed, so a 200 for one never goes stale.
BLOB_PATH = "/blobs/sha256:[0-9a-f]{64}$"


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url} has no host and port")
    return parts.hostname, parts.port


def varnish_vcl(upstream: str) -> str:
    """
    The VCL making Varnish a pull-through cache of C{upstream}: blob 200s
    kept for a year whatever the upstream's headers say, and streamed to
    the waiting clients while they arrive. Concurrent misses wait for the
    one fetch (the waiting list) without any setting.
    """
    host, port = _host_port(upstream)
    return (
        "vcl 4.1;\n"
        f'backend throttle {{ .host = "{host}"; .port = "{port}";\n'
        "  .first_byte_timeout = 1h; .between_bytes_timeout = 1h; }\n"
        "sub vcl_backend_response {\n"
        f'  if (beresp.status == 200 && bereq.url ~ "{BLOB_PATH}") {{\n'
        "    set beresp.ttl = 365d;\n"
        "    set beresp.do_stream = true;\n"
        # Skips the built-in rules that would not cache a response with
        # Set-Cookie, no-store or Vary: *.
        "    return (deliver);\n"
        "  }\n"
        "}\n"
    )


def varnish(directory: Path, upstream: str) -> tuple[Server, str]:
    """
    Varnish in the foreground as a pull-through cache of C{upstream}, its
    working directory and its 3 GiB file storage in C{directory}: a file
    mapping rather than C{malloc}, so that the cache is not counted as the
    process's own memory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    vcl = directory / "blobs.vcl"
    vcl.write_text(varnish_vcl(upstream))
    server = Server(
        "varnish",
        [
            _binary("varnishd"),
            "-F",
            "-j",
            "none",  # run as we are, with no jail's user to switch to
            "-n",
            str(directory / "work"),
            "-a",
            f"127.0.0.1:{port}",
            "-f",
            str(vcl),
            "-s",
            f"file,{directory / 'cache.bin'},3G",
        ],
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for(f"{url}/")
    return server, url


def trafficserver_records(port: int) -> str:
    """
    Traffic Server's records.config for a reverse proxy on C{port}: it runs
    as the user it is started by, logs no requests, and collapses
    concurrent misses: the one that takes the cache's write lock fetches,
    the others retry the cache read (open_write_fail_action 5, every 10 ms
    for up to 10 s) and then read while it writes.
    """
    return "".join(
        f"CONFIG proxy.config.{name} {kind} {value}\n"
        for name, kind, value in (
            ("http.server_ports", "STRING", f"{port}:ip-in=127.0.0.1"),
            ("admin.user_id", "STRING", "#-1"),
            ("reverse_proxy.enabled", "INT", 1),
            ("url_remap.remap_required", "INT", 1),
            ("http.cache.http", "INT", 1),
            ("http.cache.required_headers", "INT", 0),
            ("cache.max_doc_size", "INT", 0),
            ("cache.enable_read_while_writer", "INT", 1),
            ("http.cache.open_write_fail_action", "INT", 5),
            ("http.cache.max_open_read_retries", "INT", 1000),
            ("http.cache.open_read_retry_time", "INT", 10),
            ("http.background_fill_active_timeout", "INT", 0),
            ("http.background_fill_completed_threshold", "FLOAT", 0.0),
            ("log.logging_enabled", "INT", 1),  # errors only
        )
    )


def trafficserver(directory: Path, upstream: str) -> tuple[Server, str]:
    """
    Apache Traffic Server as a pull-through cache of C{upstream}, from a
    runroot in C{directory}: its configuration, logs, runtime files and 3 GiB
    cache file there, the programs and plugins where Debian installs them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    folders = {name: directory / name for name in ("etc", "log", "run", "cache")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    runroot = {
        "prefix": directory,
        "exec_prefix": "/usr",
        "bindir": "/usr/bin",
        "sbindir": "/usr/sbin",
        "includedir": "/usr/include",
        "libdir": "/usr/lib/trafficserver",
        "libexecdir": "/usr/lib/trafficserver/modules",
        "sysconfdir": folders["etc"],
        "datadir": folders["cache"],
        "localstatedir": directory,
        "runtimedir": folders["run"],
        "logdir": folders["log"],
        "cachedir": folders["cache"],
    }
    (directory / "runroot.yaml").write_text(
        "".join(f"{key}: {value}\n" for key, value in runroot.items())
    )
    etc = folders["etc"]
    (etc / "records.config").write_text(trafficserver_records(port))
    (etc / "remap.config").write_text(f"map / {upstream}/\n")
    (etc / "cache.config").write_text(f"url_regex={BLOB_PATH} ttl-in-cache=365d\n")
    # A folder and a size: Traffic Server makes its cache file in it.
    (etc / "storage.config").write_text(f"{folders['cache']} 3G\n")
    (etc / "ip_allow.yaml").write_text(
        "ip_allow:\n  - apply: in\n    ip_addrs: 127.0.0.1\n    action: allow\n"
    )
    for empty in ("plugin.config", "hosting.config", "volume.config"):
        (etc / empty).touch()
    server = Server(
        "trafficserver",
        [_binary("traffic_server"), f"--run-root={directory / 'runroot.yaml'}"],
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for(f"{url}/")
    return server, url


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
