"""Backend settings seen by users: --retry-max-time (flag and profile) and locations
shown without their secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn.backends.location import parse_location, redact_location
from cairn.config.profiles import ConfigError, parse_duration
from cairn.config.settings import Settings
from tests import servers
from tests.cli_helpers import Cairn

pytest_plugins = ["tests.servers"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("90", 90), (45, 45), ("0", 0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 m", "m5", "-3s", "5m-", "1.5.3s", "inf"])
def test_parse_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_retry_max_time_from_profile_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[profiles.nas]\nretry_max_time = "5m"\n[profiles.n]\nretry_max_time = 90\n')
    s = Settings.from_flags({}, config=str(config), profile="nas")
    assert s.retry_max_time == 300 and s.sources["retry_max_time"] == "profile:nas"
    assert Settings.from_flags({}, config=str(config), profile="n").retry_max_time == 90
    flag = Settings.from_flags({}, config=str(config), profile="nas", retry_max_time=30.0)
    assert flag.retry_max_time == 30 and flag.sources["retry_max_time"] == "flag"
    assert Settings.from_flags({}).retry_max_time is None


def test_bad_retry_max_time_in_profile_names_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[profiles.nas]\nrepository = "/r"\nretry_max_time = "later"\n')
    with pytest.raises(ConfigError, match=r"config.toml, line 3: .*'retry_max_time' must be a"):
        Settings.from_flags({}, config=str(config), profile="nas")


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("rest:http://cairn:s3cr3t@host:8000/repo", "rest:http://cairn:***@host:8000/repo"),
        ("rest:https://:token@host/", "rest:https://:***@host/"),
        ("rest:http://host:8000/repo", "rest:http://host:8000/repo"),
        ("s3:https://AKIA:secretkey@minio:9000/bucket", "s3:https://AKIA:***@minio:9000/bucket"),
        ("sftp://user:pw@host:2222/srv/repo", "sftp://user:***@host:2222/srv/repo"),
        ("sftp:user@host:/srv/repo", "sftp:user@host:/srv/repo"),
        ("/srv/a:b@c/repo", "/srv/a:b@c/repo"),
    ],
)
def test_redact_location(location: str, shown: str) -> None:
    assert redact_location(location) == shown


def test_s3_location_never_shows_endpoint_credentials() -> None:
    backend = parse_location("s3:https://AKIA:secretkey@minio:9000/bucket/prefix")
    assert "secretkey" not in backend.location and "AKIA" not in backend.location


def test_config_show_redacts_the_location_password(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pw\n")
    repo = "rest:http://cairn:hunter2@127.0.0.1:8000/repo"
    cli = Cairn(repo, password)
    (tmp_path / "empty.toml").write_text("")
    args = ("config", "show", "--config", str(tmp_path / "empty.toml"), "-r", repo)
    text = cli.run(*args, "--retry-max-time", "2m", base=False, check=True).out
    assert "hunter2" not in text
    assert "rest:http://cairn:***@127.0.0.1:8000/repo" in text
    assert any(line.split()[:2] == ["retry_max_time", "120.0"] for line in text.splitlines())
    shown = cli.run(*args, "--json", base=False, check=True)
    assert "hunter2" not in shown.out
    assert shown.json()["settings"]["repo"]["value"] == "rest:http://cairn:***@127.0.0.1:8000/repo"


def test_init_does_not_print_the_location_password(
    tmp_path: Path, rest_server: servers.RestServer
) -> None:
    password = tmp_path / "pw"
    password.write_text("pw\n")
    repo = f"rest:{rest_server.url}init-redacted"
    secret = rest_server.url.split(":")[2].split("@")[0]
    cli = Cairn(repo, password)
    for extra in ((), ("--json",)):
        out = cli.run(*extra, "init", check=True).out
        assert "created" in out or "initialized" in out
        assert secret not in out and ":***@" in out
        repo = f"{repo}-json"
        cli = Cairn(repo, password)
