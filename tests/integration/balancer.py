"""
HAProxy for the integration tests: Debian's haproxy with the configuration
blobserve-haproxy-config renders, on a loopback port, started, reloaded and
stopped by its PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater

from blobserve.cluster import haproxy_config

from processes import DEADLINE, free_port, stop_pid


def haproxy_binary() -> str | None:
    """
    Where HAProxy is installed (Debian puts it in /usr/sbin), or L{None}.
    """
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


class HAProxyProcess:
    """
    HAProxy in the foreground, in front of blobserve nodes, listening on a
    free loopback port. Its log (a line per request, and the nodes going
    down and up) is in C{log}.
    """

    def __init__(self, directory: Path) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed: run `make test`")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.log = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._configs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self, nodes: list[str]) -> Path:
        self._configs += 1
        config = self.directory / f"haproxy-{self._configs}.cfg"
        config.write_text(haproxy_config(nodes, f"127.0.0.1:{self.port}"))
        return config

    def _run(self, config: Path, *more: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [self.binary, "-f", str(config), *more],
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start(self, nodes: list[str]) -> None:
        """
        Start it for C{nodes} (C{host:port} each), and wait, up to the
        deadline, until it listens.
        """
        self.process = self._run(self._write(nodes))
        self._wait_listening(self.process)

    async def reload(self, nodes: list[str]) -> None:
        """
        Reload it for C{nodes}, as an operator does: a new process with the
        new configuration tells the old one (C{-sf PID}) to stop listening
        and end once its connections are done. Returns once the old one has
        exited, within the deadline.
        """
        assert self.process is not None
        old = self.process
        self.process = self._run(self._write(nodes), "-sf", str(old.pid))
        deadline = time.monotonic() + DEADLINE
        while old.poll() is None:
            assert time.monotonic() < deadline, "the old haproxy did not exit"
            await deferLater(reactor, 0.05, lambda: None)
        self._wait_listening(self.process)

    def _wait_listening(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise RuntimeError(f"haproxy did not listen:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process)
