"""
The configuration file: every option has a key, flags win over the file in
either order, bad values are refused with the file and the key named, and
blobserve-config-check prints the effective settings without a password.
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactor
from twisted.python.usage import UsageError

import blobserve
from blobserve.config import ConfigError, check_endpoint, known_keys
from blobserve.config_check import INVALID, VALID, main
from blobserve.tap import Options, makeService

from fakes import LoggedEvents

#: Where the options are documented.
OPERATIONS = Path(__file__).parents[2] / "docs" / "operations.rst"

PASSWORD = "s3cret-Pa55"


def parsed(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """
    The files a configuration names: a password, credentials, an htpasswd.
    """
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode()
    return {
        "password": write(tmp_path / "password", PASSWORD + "\n"),
        "credentials": write(tmp_path / "ghcr.cred", f"bob:{PASSWORD}\n"),
        "htpasswd": write(tmp_path / "htpasswd", f"alice:$2y${hashed[4:]}\n"),
    }


def every_key(
    tmp_path: Path, files: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """
    A value (as TOML) for every key, and the flags that say the same.
    """
    keys = {
        "listen": '["tcp:5001:interface=127.0.0.1", "unix:/run/blobserve.sock"]',
        "upstreams": "",
        "storage": f'"{tmp_path / "store"}"',
        "metrics_listen": '"tcp:9102:interface=127.0.0.1"',
        "upstream_username": '"alice"',
        "upstream_password_file": f'"{files["password"]}"',
        "htpasswd": f'"{files["htpasswd"]}"',
        "upstream_retries": "2",
        "upstream_retry_delay": "0.25",
        "upstream_concurrency": "3",
        "upstream_queue": "7",
        "upstream_segments": "2",
        "segment_size": '"8M"',
        "max_blob_size": '"1500M"',
        "max_size": '"200G"',
        "min_free": "1048576",
        "client_timeout": "7.5",
        "max_connections": "99",
        "tag_ttl": "5",
        "upstream_timeout": "12",
        "upstream_idle_timeout": "9",
        "shutdown_grace": "0",
        "progress_interval": "3",
        "node_name": '"cache-2"',
        "partial_max_age": "3600",
        "log_format": '"json"',
        "no_metrics": "false",
        "no_access_log": "true",
        "prefetch_layers": "true",
    }
    flags = [
        "--listen=tcp:5001:interface=127.0.0.1",
        "--listen=unix:/run/blobserve.sock",
        "--upstream=docker.io=https://registry-1.docker.io",
        "--upstream=ghcr.io=https://ghcr.io",
        f"--upstream-credentials=ghcr.io={files['credentials']}",
        f"--storage={tmp_path / 'store'}",
        "--metrics-listen=tcp:9102:interface=127.0.0.1",
        "--upstream-username=alice",
        f"--upstream-password-file={files['password']}",
        f"--htpasswd={files['htpasswd']}",
        "--upstream-retries=2",
        "--upstream-retry-delay=0.25",
        "--upstream-concurrency=3",
        "--upstream-queue=7",
        "--upstream-segments=2",
        "--segment-size=8M",
        "--max-blob-size=1500M",
        "--max-size=200G",
        "--min-free=1048576",
        "--client-timeout=7.5",
        "--max-connections=99",
        "--tag-ttl=5",
        "--upstream-timeout=12",
        "--upstream-idle-timeout=9",
        "--shutdown-grace=0",
        "--progress-interval=3",
        "--node-name=cache-2",
        "--partial-max-age=3600",
        "--log-format=json",
        "--no-access-log",
        "--prefetch-layers",
    ]
    return keys, flags


def config_text(keys: dict[str, str], files: dict[str, str]) -> str:
    plain = "\n".join(f"{k} = {v}" for k, v in keys.items() if k != "upstreams")
    return (
        plain
        + '\n[upstreams."docker.io"]\nurl = "https://registry-1.docker.io/"\n'
        + '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n'
        + f'credentials_file = "{files["credentials"]}"\n'
    )


def settings(options: Options) -> dict[str, Any]:
    """
    What an Options holds, but the name of its file.
    """
    return {k: v for k, v in options.items() if k != "config"}


def test_every_key_gives_what_its_flag_gives(
    tmp_path: Path, files: dict[str, str]
) -> None:
    keys, flags = every_key(tmp_path, files)
    assert sorted(keys) == sorted(known_keys(Options()))
    path = write(tmp_path / "blobserve.toml", config_text(keys, files))
    from_file = parsed("--config", path)
    from_flags = parsed(*flags)
    assert settings(from_file) == settings(from_flags)
    # Not only the defaults: each key moved its option.
    defaults = settings(parsed())
    same = {k for k, v in settings(from_file).items() if defaults.get(k) == v}
    assert same == {"no-metrics"}
    assert from_file["registry-credentials"]["ghcr.io"].password == PASSWORD


def test_a_flag_key_set_true_sets_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path / "b.toml", "no_metrics = true\nno_access_log = false\n")
    options = parsed("--config", path)
    assert (options["no-metrics"], options["no-access-log"]) == (True, False)


@pytest.mark.parametrize("flag_first", [True, False])
def test_flags_win_over_the_file_in_either_order(
    tmp_path: Path, flag_first: bool
) -> None:
    path = write(
        tmp_path / "b.toml",
        'tag_ttl = 30\nlisten = ["tcp:5001"]\nmax_size = "1G"\nstorage = "/srv/x"\n',
    )
    flags = ["--tag-ttl", "5", "-l", "tcp:5002", "--max-size=2G"]
    argv = [*flags, "--config", path] if flag_first else ["-c", path, *flags]
    options = parsed(*argv)
    assert options["tag-ttl"] == 5.0
    assert options["listen"] == ["tcp:5002"]
    assert options["max-size"] == 2 * 2**30
    # What no flag gives comes from the file.
    assert options["storage"] == "/srv/x"


def test_upstream_flags_replace_the_files_upstreams_and_their_credentials(
    tmp_path: Path, files: dict[str, str]
) -> None:
    path = write(
        tmp_path / "b.toml",
        '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n'
        f'credentials_file = "{files["credentials"]}"\n',
    )
    options = parsed("--upstream", "quay.io=https://quay.io", "--config", path)
    assert options["upstreams"] == {"quay.io": "https://quay.io"}
    assert options["registry-credentials"] == {}


def test_upstream_credentials_flags_add_to_the_files_and_win(
    tmp_path: Path, files: dict[str, str]
) -> None:
    other = write(tmp_path / "other.cred", "carol:other\n")
    path = write(
        tmp_path / "b.toml",
        '[upstreams."docker.io"]\nurl = "https://registry-1.docker.io"\n'
        f'credentials_file = "{files["credentials"]}"\n'
        '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n'
        f'credentials_file = "{files["credentials"]}"\n',
    )
    options = parsed(f"--upstream-credentials=ghcr.io={other}", "--config", path)
    assert list(options["upstreams"]) == ["docker.io", "ghcr.io"]
    credentials = options["registry-credentials"]
    assert credentials["docker.io"].username == "bob"
    assert credentials["ghcr.io"].username == "carol"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("bogus_key = 1", None, "unknown key 'bogus_key'"),
        ('tag_ttl = "soon"', "tag_ttl", "must be a whole number or a number"),
        ("upstream_retries = 2.5", "upstream_retries", "must be a whole number"),
        ("tag_ttl = true", "tag_ttl", "must be a whole number or a number"),
        ('no_metrics = "yes"', "no_metrics", "must be true or false"),
        ("storage = 5", "storage", "must be a string"),
        ("tag_ttl = 0", "tag_ttl", "must be a positive number"),
        ('max_size = "lots"', "max_size", "not a size: 'lots'"),
        ("max_size = -5", "max_size", "not a size"),
        ('log_format = "xml"', "log_format", "must be one of text, json"),
        ('listen = "tcp:5000"', "listen", "must be a list"),
        ('listen = ["tcp:x"]', "listen", "not a server endpoint: 'tcp:x'"),
        ('metrics_listen = "bogus:1"', "metrics_listen", "not a server endpoint"),
        (
            '[upstreams."a"]\nurl = "ftp://a"',
            'upstreams."a".url',
            "needs an http(s) URL",
        ),
        (
            '[upstreams."a"]\nurl = "https://u:hunter2@a"',
            'upstreams."a".url',
            "no user or password",
        ),
        ('[upstreams."a"]\nport = 1', 'upstreams."a"', "unknown key 'port'"),
        (
            '[upstreams."a"]\nurl = "https://a"\ncredentials_file = "/nonexistent"',
            'upstreams."a".credentials_file',
            "/nonexistent cannot be read",
        ),
        (
            'upstream_password_file = "/nonexistent"',
            "upstream_password_file",
            "/nonexistent cannot be read",
        ),
        ('htpasswd = "/nonexistent"', "htpasswd", "/nonexistent"),
        ("listen = [", None, "is not TOML"),
    ],
)
def test_a_bad_value_is_refused_with_the_file_and_key_named(
    tmp_path: Path, text: str, key: str | None, problem: str
) -> None:
    path = write(tmp_path / "blobserve.toml", text + "\n")
    with pytest.raises(ConfigError) as refused:
        parsed("--config", path)
    # twistd exits non-zero, with the message, on a UsageError.
    assert isinstance(refused.value, UsageError)
    named = f"{path}: " if key is None else f"{path}: {key}: "
    assert str(refused.value).startswith(named)
    assert problem in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_missing_file_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"/nope\.toml: cannot be read"):
        parsed("--config", str(tmp_path / "nope.toml"))


def test_a_bad_listen_flag_is_refused() -> None:
    with pytest.raises(UsageError, match="--listen not a server endpoint"):
        parsed("--listen", "tcp:5000:interface=::1")


def test_an_endpoint_whose_parser_needs_the_reactor_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def listening_parser(reactor: Any, description: str) -> None:
        reactor.listenTCP(5000, None)

    monkeypatch.setattr("blobserve.config.serverFromString", listening_parser)
    with pytest.raises(ValueError, match=r"not a server endpoint.*listenTCP"):
        check_endpoint("tcp:5000")


def test_checking_endpoints_loads_no_test_doubles() -> None:
    # A fresh interpreter: this one has loaded them for the tests. What is
    # loaded stays for the life of the server (2.4 MiB of RSS for these).
    probe = (
        "import sys\n"
        "from blobserve.tap import Options\n"
        "Options().parseOptions(['--listen', 'tcp:5000', '--metrics-listen',"
        " 'tcp:5001'])\n"
        "print(sorted(m for m in sys.modules"
        " if m.startswith(('twisted.internet.testing', 'twisted.trial'))))\n"
    )
    root = Path(blobserve.__file__).parent.parent
    found = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert found.stdout.strip() == "[]"


def test_each_listen_endpoint_gets_a_listener_of_the_same_site(tmp_path: Path) -> None:
    path = write(
        tmp_path / "b.toml",
        f'listen = ["tcp:5001", "unix:{tmp_path}/s.sock"]\nstorage = "{tmp_path}"\n',
    )
    options = parsed("--config", path)
    with LoggedEvents() as logged:
        service = makeService(options, MemoryReactor())
    servers = [s for s in service if isinstance(s, StreamServerEndpointService)]
    assert [s.factory for s in servers] == [servers[0].factory] * 2
    assert len(servers) == 2
    [start] = [m for m in logged.messages() if m.startswith("blobserve ")]
    assert f"listening on tcp:5001, unix:{tmp_path}/s.sock;" in start


def test_config_check_prints_the_effective_settings_without_passwords(
    tmp_path: Path, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    keys, _ = every_key(tmp_path, files)
    path = write(tmp_path / "blobserve.toml", config_text(keys, files))
    assert main([path]) == VALID
    out = capsys.readouterr().out
    assert PASSWORD not in out
    assert "alice" not in out
    assert "max_size = 214748364800\n" in out
    assert 'log_format = "json"\n' in out
    assert "no_access_log = true\n" in out
    assert f'credentials_file = "{files["credentials"]}"' in out
    assert "# with credentials (user and password hidden)" in out
    assert "# upstream_username is set (hidden)" in out


def test_config_check_refuses_a_bad_file_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "blobserve.toml", "bogus_key = 1\n")
    assert main([path]) == INVALID
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}: unknown key 'bogus_key'" in captured.err


def _options_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("\nOptions\n=======\n")
    end = text.index("\nSizing\n======\n", start)
    return text[start:end]


def test_every_option_has_help() -> None:
    options = Options()
    for name in {*options.synonyms.values()} - {"help", "version"}:
        assert (options.docs.get(name) or "").strip(), name


def test_the_operations_guide_names_every_flag_and_key() -> None:
    section = _options_section()
    options = Options()
    for name in {*options.synonyms.values()} - {"help", "version"}:
        assert re.search(rf"``--{name}[ `=]", section), name
    for key in known_keys(options):
        assert f"``{key}``" in section, key


def test_upstream_username_wins_over_the_files_credentials_for_the_default(
    tmp_path: Path, files: dict[str, str]
) -> None:
    path = write(
        tmp_path / "blobserve.toml",
        '[upstreams."docker.io"]\nurl = "https://registry-1.docker.io"\n'
        f'credentials_file = "{files["credentials"]}"\n'
        '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n'
        f'credentials_file = "{files["credentials"]}"\n',
    )
    options = Options()
    options.parseOptions(
        [
            "--config",
            path,
            "--upstream-username",
            "carol",
            f"--upstream-password-file={files['password']}",
        ]
    )
    credentials = options["registry-credentials"]
    assert credentials["docker.io"].username == "carol"
    # The other registries keep the file's.
    assert credentials["ghcr.io"].username == "bob"


@pytest.mark.parametrize("scheme", ["ftp", "htps", "https"])
def test_a_url_with_a_password_is_never_echoed(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}://user:s3cret@registry.test"
    path = write(tmp_path / "blobserve.toml", f'[upstreams."r"]\nurl = "{url}"\n')
    for argv in (["--config", path], ["--upstream", url]):
        with pytest.raises(UsageError) as refused:
            Options().parseOptions(argv)
        assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_an_endless_time_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "blobserve.toml", f"client_timeout = {value}\n")
    with pytest.raises(UsageError, match="client_timeout"):
        Options().parseOptions(["--config", path])


def test_the_readmes_example_is_a_configuration_blobserve_takes(
    tmp_path: Path, files: dict[str, str]
) -> None:
    readme = (Path(__file__).parents[2] / "README.rst").read_text()
    start = readme.index("listen = [", readme.index("\nConfiguration file\n"))
    end = readme.index("\n``listen`` is a list", start)
    example = textwrap.dedent("    " + readme[start:end])
    example = example.replace(
        "/etc/blobserve/dockerhub.cred", files["credentials"]
    ).replace("/etc/blobserve/htpasswd", files["htpasswd"])
    options = Options()
    options.parseOptions(["--config", write(tmp_path / "blobserve.toml", example)])
    assert options["listen"][1] == "unix:/run/blobserve/blobserve.sock"
    assert options["max-size"] == 200 * 2**30
    assert (options["log-format"], options["no-access-log"]) == ("json", True)
    assert list(options["upstreams"]) == ["docker.io", "ghcr.io"]
    assert list(options["registry-credentials"]) == ["docker.io"]
