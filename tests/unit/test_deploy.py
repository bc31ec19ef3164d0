"""
The deployment files in deploy/: the systemd unit runs blobserve as the
README says and as systemd accepts, the example configuration agrees with
the unit, and every client snippet points at the same mirror.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from blobserve.tap import Options, descriptors_needed

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEPLOY = Path(__file__).parents[2] / "deploy"
UNIT = DEPLOY / "blobserve.service"


def unit() -> ConfigParser:
    """
    The systemd unit, read as the INI file it is (keys keep their case).
    """
    parser = ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def mirror_addresses() -> dict[str, str]:
    """
    The mirror's host:port as each client snippet names it.
    """
    daemon = json.loads((DEPLOY / "docker" / "daemon.json").read_text())
    (docker_mirror,) = daemon["registry-mirrors"]
    (insecure,) = daemon["insecure-registries"]
    (containerd_host,) = toml(DEPLOY / "containerd" / "hosts.toml")["host"]
    (registry,) = toml(DEPLOY / "podman" / "registries.conf")["registry"]
    (podman_mirror,) = registry["mirror"]
    return {
        "daemon.json registry-mirrors": urlsplit(docker_mirror).netloc,
        "daemon.json insecure-registries": insecure,
        "hosts.toml": urlsplit(containerd_host).netloc,
        "registries.conf": podman_mirror["location"],
    }


def test_every_client_snippet_points_at_the_same_mirror() -> None:
    addresses = mirror_addresses()
    assert len(set(addresses.values())) == 1, addresses
    # ...on the port the example configuration listens on.
    (listen,) = toml(DEPLOY / "blobserve.toml")["listen"]
    port = listen.split(":")[1]
    assert {address.rsplit(":", 1)[1] for address in addresses.values()} == {port}


def test_client_snippets_mirror_docker_hub_over_plain_http() -> None:
    """
    blobserve speaks plain http unless told otherwise, so every client is
    told the mirror is insecure; containerd's mirror URL carries no ?ns=, as
    containerd adds it itself.
    """
    daemon = json.loads((DEPLOY / "docker" / "daemon.json").read_text())
    assert urlsplit(daemon["registry-mirrors"][0]).scheme == "http"
    hosts = toml(DEPLOY / "containerd" / "hosts.toml")
    ((url, host),) = hosts["host"].items()
    assert urlsplit(url).scheme == "http"
    assert not urlsplit(url).query
    assert set(host["capabilities"]) == {"pull", "resolve"}
    assert urlsplit(hosts["server"]).netloc == "registry-1.docker.io"
    (registry,) = toml(DEPLOY / "podman" / "registries.conf")["registry"]
    assert registry["prefix"] == registry["location"] == "docker.io"
    assert registry["mirror"][0]["insecure"] is True


def test_example_configuration_stores_where_the_unit_lets_it_write() -> None:
    """
    Under ProtectSystem=strict only the unit's own directories are
    writable: the store must be its cache directory.
    """
    config = toml(DEPLOY / "blobserve.toml")
    service = unit()["Service"]
    assert service["ProtectSystem"] == "strict"
    assert config["storage"] == "/var/cache/" + service["CacheDirectory"]
    assert next(iter(config["upstreams"])) == "docker.io"


def test_unit_runs_twistd_in_the_foreground_without_a_pid_file() -> None:
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/blobserve/bin/twistd"
    twistd, blobserve = (
        argv[1 : argv.index("blobserve")],
        argv[argv.index("blobserve") :],
    )
    assert set(twistd) == {"--nodaemon", "--pidfile="}
    assert blobserve == ["blobserve", "--config", "/etc/blobserve/blobserve.toml"]
    assert service["User"] != "root"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"


def test_unit_waits_for_the_shutdown_grace_before_killing() -> None:
    """
    systemd sends SIGKILL after TimeoutStopSec: that must leave blobserve
    its --shutdown-grace to end responses and commit finished downloads.
    """
    service = unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    grace = Options()["shutdown-grace"]
    assert float(service["TimeoutStopSec"]) > grace + 5


def test_unit_allows_the_descriptors_the_defaults_need() -> None:
    defaults = Options()
    needed = descriptors_needed(
        defaults["max-connections"], defaults["upstream-concurrency"]
    )
    assert int(unit()["Service"]["LimitNOFILE"]) >= needed


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian's systemd package)",
)
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """
    systemd accepts every line of the unit. verify also wants ExecStart's
    program to exist: a copy runs the twistd of this environment instead of
    /opt/blobserve's.
    """
    twistd = Path(sys.executable).with_name("twistd")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/blobserve/bin/twistd", str(twistd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on lines it ignores, but names them.
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stdout + result.stderr, result.stderr


def test_blobserve_reads_the_example_configuration_as_shipped(tmp_path: Path) -> None:
    """
    The example is a configuration blobserve starts with as it is (the
    service installed from it starts), and with its credentials file once
    that exists and its key is uncommented.
    """
    example = DEPLOY / "blobserve.toml"
    options = Options()
    options.parseOptions(["--config", str(example)])
    assert options["listen"] == ["tcp:5000:interface=0.0.0.0"]
    assert options["storage"] == "/var/cache/blobserve"
    assert options["max-size"] == 200 * 2**30
    assert list(options["upstreams"]) == ["docker.io", "ghcr.io"]
    assert options["registry-credentials"] == {}

    credentials = tmp_path / "dockerhub.cred"
    credentials.write_text("alice:s3cret\n")
    text = example.read_text()
    key = '# credentials_file = "/etc/blobserve/dockerhub.cred"'
    assert key in text
    with_credentials = tmp_path / "blobserve.toml"
    with_credentials.write_text(
        text.replace(key, f'credentials_file = "{credentials}"')
    )
    options = Options()
    options.parseOptions(["--config", str(with_credentials)])
    assert list(options["registry-credentials"]) == ["docker.io"]
    assert options["registry-credentials"]["docker.io"].password == "s3cret"
