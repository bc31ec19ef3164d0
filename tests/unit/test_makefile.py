"""
`make test` installs only the Debian packages that are missing, says which,
and never upgrades one that is installed. The recipe runs with SUDO=echo, so
that its apt-get commands are printed, not run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("dpkg-query") is None,
    reason="needs make and dpkg-query (a Debian system, as CI runs)",
)


def debian_packages(*packages: str) -> list[str]:
    """
    What `make debian-packages` prints for C{packages}, with the commands it
    would run printed instead of run.
    """
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "debian-packages",
            f"DEBIAN_PACKAGES={' '.join(packages)}",
            "SUDO=echo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_only_missing_packages_are_installed_without_upgrading_any() -> None:
    # dpkg is installed on every Debian system; the other package exists
    # nowhere.
    said = debian_packages("dpkg", "blobserve-no-such-package")
    assert (
        "Debian packages: installing the missing ones: blobserve-no-such-package"
        in said
    )
    (install,) = [line for line in said if " apt-get install " in line]
    assert install.split()[-1] == "blobserve-no-such-package"
    assert "dpkg" not in install.split()
    assert "--no-upgrade" in install.split()


def test_nothing_is_installed_when_every_package_is() -> None:
    said = debian_packages("dpkg")
    assert said == ["Debian packages: all installed (dpkg)"]
