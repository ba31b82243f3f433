"""TOML profiles: inheritance, precedence, and one-line errors naming file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cairn.config.profiles import ConfigError, ConfigFile
from cairn.config.settings import Settings
from tests.cli_helpers import Cairn

CONFIG = """\
default_profile = "home"

[profiles.base]
repository = "/srv/base-repo"
password_file = "/etc/cairn/pw"
connections = 8
backend_options = { "s3.region" = "eu-west-1" }

[profiles.home]
inherit = "base"
paths = ["/home"]
excludes = ["*.cache"]
keep_daily = 7
backend_options = { "s3.storage-class" = "STANDARD_IA" }
limit_upload_schedule = ["08:00-19:00=512", "*=0"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_inheritance_and_sources(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG)
    s = Settings.from_flags({}, config=str(path))
    assert s.profile == "home"  # default_profile
    assert s.repo == "/srv/base-repo" and s.sources["repo"] == "profile:base"
    assert s.connections == 8 and s.sources["connections"] == "profile:base"
    assert s.backend_options == {"s3.region": "eu-west-1", "s3.storage-class": "STANDARD_IA"}
    assert s.limit_upload_schedule == ("08:00-19:00=512", "*=0")
    assert s.job is not None and s.job.get("paths") == ["/home"]
    assert s.job.origin["keep_daily"] == "home"
    assert s.sources["pack_size"] == "default"


def test_precedence_flags_env_profile_default(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG)
    env = {"CAIRN_CONFIG": str(path), "CAIRN_REPOSITORY": "/env/repo"}
    s = Settings.from_flags(env, connections=2)
    assert (s.repo, s.sources["repo"]) == ("/env/repo", "env")
    assert (s.connections, s.sources["connections"]) == (2, "flag")
    assert s.sources["config"] == "env"
    s = Settings.from_flags(env, repo="/flag/repo")
    assert (s.repo, s.sources["repo"]) == ("/flag/repo", "flag")
    # The password source is chosen as a whole: the environment's beats the profile's.
    s = Settings.from_flags(env | {"CAIRN_PASSWORD_COMMAND": "pass show x"})
    assert s.password_command == "pass show x" and s.password_file is None
    s = Settings.from_flags(env | {"CAIRN_PASSWORD": "secret"})
    assert s.password_file is None and s.password_command is None
    s = Settings.from_flags(env, backend_options={"s3.region": "us-east-1"})
    assert s.backend_options == {"s3.region": "us-east-1", "s3.storage-class": "STANDARD_IA"}
    s = Settings.from_flags(env, password_command="echo hi")
    assert s.password_file is None and s.sources["password_command"] == "flag"


def test_no_config_file_is_fine_unless_asked_for(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert Settings.from_flags(env).profile is None
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.from_flags(env, config=str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="profile 'x' given but there is no config file"):
        Settings.from_flags(env, profile="x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[profiles.a]\nrepository = '/r'\nconections = 4\n",
            r"config.toml, line 3: profile 'a': unknown key 'conections'",
        ),
        (
            "[profiles.a]\nrepository = '/r'\nconnections = 'four'\n",
            r"line 3: profile 'a': key 'connections' must be an integer",
        ),
        ("[profiles.a]\nrepository = /r\n", r"config.toml, line 2: Invalid value"),
        (
            "[nightly]\nrepository = '/r'\n",
            r"line 1: unknown key 'nightly' \(profiles go in \[profiles.NAME\] tables\)",
        ),
        ("[profiles.a]\nlog_format = 'yaml'\n", r"line 2: .*one of console, json, logfmt"),
        (
            "[profiles.a]\n\nlimit_upload_schedule = ['8-19=5']\n",
            r"line 3: .*bad schedule entry '8-19=5'",
        ),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        ConfigFile.load(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_inheritance_errors(tmp_path: Path) -> None:
    cfg = ConfigFile.load(
        str(
            _write(
                tmp_path,
                "[profiles.a]\ninherit = 'b'\n"
                "[profiles.b]\ninherit = 'a'\n"
                "[profiles.c]\ninherit = 'zz'\n",
            )
        )
    )
    with pytest.raises(ConfigError, match=r"line 2: inheritance cycle: a -> b -> a"):
        cfg.profile("a")
    with pytest.raises(ConfigError, match=r"line 6: profile 'c' inherits unknown profile 'zz'"):
        cfg.profile("c")
    with pytest.raises(ConfigError, match=r"no profile 'q' \(profiles: a, b, c\)"):
        cfg.profile("q")


def test_config_show_and_malformed_file_via_cli(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG)
    c = Cairn(tmp_path / "repo", tmp_path / "pw")
    result = c.run(
        "config", "show", "--config", str(path), "--connections", "3", "--json", base=False
    )
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert shown["profile"] == "home"
    assert shown["settings"]["repo"] == {"value": "/srv/base-repo", "source": "profile:base"}
    assert shown["settings"]["connections"] == {"value": 3, "source": "flag"}
    assert shown["settings"]["compression"]["source"] == "default"
    assert shown["job"]["keep_daily"] == {"value": 7, "source": "profile:home"}
    text = c.run("config", "show", "--config", str(path), base=False).out
    assert any(
        line.split()[:1] == ["repo"] and line.endswith("profile:base") for line in text.splitlines()
    )
    bad = _write(tmp_path, CONFIG + "\n[profiles.x]\nbogus = 1\n")
    result = c.run("snapshots", "--config", str(bad), base=False)
    assert result.code == 1
    assert result.err.strip() == (
        f"cairn: config file {bad}, line 18: profile 'x': unknown key 'bogus'"
    )


def test_profile_schedule_drives_the_running_throttle(tmp_path: Path) -> None:
    """The schedule reaches the token bucket inside the backend's wrapper stack: the
    rate in force is logged when the command starts (a window covering every minute)."""
    c = Cairn(tmp_path / "repo", tmp_path / "pw")
    (tmp_path / "pw").write_text("pw\n")
    assert c.run("init", "--insecure-kdf").code == 0
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x" * 1000)
    path = _write(
        tmp_path,
        f'[profiles.p]\nrepository = "{tmp_path / "repo"}"\n'
        f'password_file = "{tmp_path / "pw"}"\n'
        'limit_upload_schedule = ["00:00-23:59=777", "*=778"]\n',
    )
    args = ("--config", str(path), "--profile", "p", "--log-format", "json", "--log-level", "info")
    result = c.run("backup", str(tmp_path / "src"), *args, base=False)
    assert result.code == 0, result.err
    events = [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]
    changes = [e for e in events if e.get("event") == "throttle.rate_changed"]
    assert changes and changes[0]["direction"] == "upload"
    assert changes[0]["kib_per_second"] in (777, 778)
    # A --limit-upload flag beats the profile's schedule: no schedule runs.
    result = c.run("backup", str(tmp_path / "src"), *args, "--limit-upload", "5000", base=False)
    assert result.code == 0, result.err
    assert "throttle.rate_changed" not in result.err
