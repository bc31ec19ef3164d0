"""
Real servers for the integration tests: Debian's docker-registry and blobserve
under twistd, each started on loopback and stopped by its PID.
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
import urllib.request
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater

from blobserve.digest import Digest

#: How long a server may take to start or stop.
DEADLINE = 30.0


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(process: subprocess.Popen[bytes]) -> None:
    """
    Stop a server by its PID: SIGTERM, then SIGKILL if it lingers.
    """
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=DEADLINE)


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """
    Block until C{url} answers, failing with the server's log if it exits or
    takes longer than L{DEADLINE}.
    """
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not answer {url} in time:\n{log.read_text()}")


def _put(url: str, data: bytes, content_type: str) -> None:
    """
    Upload C{data} to a registry with C{PUT}, which must create it (201).
    """
    put = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(put) as response:
        assert response.status == 201


def log_text(written: bytes) -> str:
    """
    What the complete lines of a blobserve log say, one line an event: a
    text line as it is, a JSON line (C{--log-format json}) by its C{text}.
    """
    said = []
    for line in written.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # being written
        if line.startswith(b"{"):
            said.append(json.loads(line)["text"])
        else:
            said.append(line.decode("utf-8", "replace").rstrip("\n"))
    return "\n".join(said)


class RegistryProcess:
    """
    Debian's docker-registry (distribution 2.8) with a file-system store, on a
    loopback port, asking for credentials if configured to.
    """

    def __init__(self, directory: Path, auth: str = "") -> None:
        """
        @param auth: the C{auth:} section of the registry's configuration,
            indented, if it should ask for credentials.
        """
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed: run `make test`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {directory / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            f"{auth}"
        )
        self.log = directory / "registry.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_http(f"{self.url}/", self.process, self.log)

    def push_blob(self, name: str, data: bytes) -> Digest:
        """
        Upload C{data} as a blob of repository C{name}, monolithically.
        """
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        start = urllib.request.Request(
            f"{self.url}/v2/{name}/blobs/uploads/", method="POST"
        )
        with urllib.request.urlopen(start) as response:
            location = response.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        _put(f"{location}{separator}digest={digest}", data, "application/octet-stream")
        return digest

    def push_manifest(self, name: str, tag: str, content: bytes) -> None:
        """
        Put C{content}, an OCI image manifest, as tag C{tag} of repository
        C{name} (its config and layers must be there already).
        """
        _put(
            f"{self.url}/v2/{name}/manifests/{tag}",
            content,
            "application/vnd.oci.image.manifest.v1+json",
        )

    def stop(self) -> None:
        stop_pid(self.process)


class BlobserveProcess:
    """
    blobserve as a user runs it: C{twistd -n blobserve}, found as an installed
    plugin (it runs outside the source tree), listening on a loopback port.
    """

    def __init__(
        self,
        directory: Path,
        upstream: str,
        storage: Path,
        flags: list[str] | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        twistd_args: tuple[str, ...] = ("--nodaemon", "--pidfile="),
    ) -> None:
        """
        @param flags: blobserve's command line; by default it listens on a
            free loopback port and uses C{upstream} and C{storage}.
        @param extra: more flags after those.
        @param env: more environment variables for the process.
        @param twistd_args: twistd's own options, before C{blobserve}; they
            must keep it in the foreground.
        """
        self.directory = directory
        self.upstream = upstream
        self.storage = storage
        self.flags = flags
        self.extra = extra
        self.env = env or {}
        self.twistd_args = twistd_args
        self.log = directory / "blobserve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        offset = self.log.stat().st_size if self.log.exists() else 0
        flags = self.flags
        if flags is None:
            flags = [
                "--listen=tcp:0:interface=127.0.0.1",
                f"--upstream={self.upstream}",
                f"--storage={self.storage}",
            ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(twistd),
                    *self.twistd_args,
                    "blobserve",
                    *flags,
                    *self.extra,
                ],
                cwd=self.directory,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"blobserve exited:\n{self.log.read_text()}")
            written = log_text(self.log.read_bytes()[offset:])
            started = re.search(r"\) starting on (\d+)", written)
            # The sendfile self-test holds a file and a connection of its own
            # for its few milliseconds: tests that count them start after it.
            if started and re.search(r"sendfile is (on|off)", written):
                self.port = int(started.group(1))
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise RuntimeError(f"blobserve did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process)

    async def terminate(self) -> tuple[int, float]:
        """
        Send it SIGTERM, as a service manager stops it, and wait, up to the
        deadline, for it to exit, while this process's reactor runs on (the
        relay and the clients live in it).

        @return: its exit status, and how many seconds it took to exit.
        """
        assert self.process is not None
        sent = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)
        while self.process.poll() is None:
            if time.monotonic() - sent > DEADLINE:
                self.kill()
                raise RuntimeError(f"blobserve did not stop:\n{self.log.read_text()}")
            await deferLater(reactor, 0.02, lambda: None)
        return self.process.returncode, time.monotonic() - sent

    def kill(self) -> None:
        """
        Kill it by its PID with SIGKILL: a crash, with no chance to clean up.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=DEADLINE)

    def memory(self) -> dict[str, int]:
        """
        The process's resident memory now (C{VmRSS}) and at its peak
        (C{VmHWM}), in bytes.
        """
        figures = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) * 1024
        return figures


def open_descriptors(pid: int, except_remote_port: int | None = None) -> list[str]:
    """
    What process C{pid} has open, leaving out its sockets to
    C{except_remote_port} (the upstream's pooled connections, which come and
    go as the pool sees fit).
    """
    pooled: set[str] = set()
    if except_remote_port is not None:
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == except_remote_port:
                    pooled.add(f"socket:[{fields[9]}]")
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target not in pooled:
            targets.append(target)
    return sorted(targets)
