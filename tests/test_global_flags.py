"""Global flags of restic 0.19 (issue 19): ``--repository-file``, ``--key-hint``,
``--compression better``, their ``CAIRN_*`` environment variables, and the exit
codes of usage and internal errors — all through the real command line."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest

from cairn.cli.errors import EXIT_FATAL, EXIT_INTERNAL, run_cli
from cairn.repo.codec import compression_level
from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cairn: ")]
    assert len(lines) == 1 and "Traceback" not in err and "Usage:" not in err, err
    return lines[0]


def _settings(
    c: Cairn, *args: str, env: dict[str, str] | None = None
) -> dict[str, dict[str, object]]:
    r = c.run(*args, "config", "show", "--json", env=env)
    assert r.code == 0, r.err
    settings: dict[str, dict[str, object]] = r.json_lines()[0]["settings"]
    return settings


# -- --repository-file ------------------------------------------------------------


def test_repository_file_flag_and_env(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    where = tmp_path / "repo-location"
    where.write_text(f"  {cairn.repo}\n")  # surrounding space is stripped, as restic does
    pw = ("--password-file", str(cairn.password_file), "--insecure-kdf")
    by_flag = cairn.run(*pw, "--repository-file", str(where), "snapshots", "--json", base=False)
    assert by_flag.code == 0 and by_flag.json() == [], by_flag.err
    by_env = cairn.run(
        *pw, "snapshots", "--json", base=False, env={"CAIRN_REPOSITORY_FILE": str(where)}
    )
    assert by_env.code == 0 and by_env.json() == [], by_env.err
    # Also after the command name, as every global flag.
    after = cairn.run(*pw, "snapshots", "--repository-file", str(where), base=False)
    assert after.code == 0, after.err
    # init, too, creates the repository the file names, and says where.
    fresh = tmp_path / "fresh-location"
    fresh.write_text(str(tmp_path / "fresh"))
    made = cairn.run(*pw, "--repository-file", str(fresh), "init", "--json", base=False)
    assert made.code == 0 and made.json()["repository"] == str(tmp_path / "fresh"), made.err
    assert (tmp_path / "fresh" / "config").is_file()


def test_repository_file_problems_are_one_line(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    pw = ("--password-file", str(cairn.password_file))
    missing = tmp_path / "nowhere"
    r = cairn.run(*pw, "--repository-file", str(missing), "snapshots", base=False)
    assert r.code == 1 and f"repository file {missing} does not exist" in _one_error_line(r.err)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = cairn.run(*pw, "--repository-file", str(empty), "snapshots", base=False)
    assert r.code == 1 and "is empty" in _one_error_line(r.err)
    # Both on one layer: refused, as restic's "-r and --repository-file are mutually exclusive".
    where = tmp_path / "where"
    where.write_text(str(cairn.repo))
    r = cairn.run("--repository-file", str(where), "snapshots")
    assert r.code == 1 and "mutually exclusive" in _one_error_line(r.err)
    both = {"CAIRN_REPOSITORY": str(cairn.repo), "CAIRN_REPOSITORY_FILE": str(where)}
    r = cairn.run(*pw, "snapshots", base=False, env=both)
    assert r.code == 1 and "CAIRN_REPOSITORY and CAIRN_REPOSITORY_FILE" in _one_error_line(r.err)
    # A flag replaces the environment's choice as a whole (no conflict across layers).
    r = cairn.run("snapshots", env={"CAIRN_REPOSITORY_FILE": str(missing)})
    assert r.code == 0, r.err
    # A missing file costs only the commands that open the repository.
    assert cairn.run("version", base=False, env={"CAIRN_REPOSITORY_FILE": str(missing)}).code == 0


# -- --key-hint ----------------------------------------------------------------------


def _current_key(c: Cairn, *args: str, env: dict[str, str] | None = None) -> str:
    r = c.run(*args, "key", "list", "--json", env=env)
    assert r.code == 0, r.err
    return next(k["id"] for k in r.json() if k["current"])


def test_key_hint_opens_with_the_hinted_key_first(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    # Two keys with the same password: whichever is tried first opens the repository,
    # and `key list` marks that one as current.
    cairn.run("key", "add", "--new-password-file", str(cairn.password_file), check=True)
    ids = sorted(k["id"] for k in cairn.run("key", "list", "--json", check=True).json())
    assert len(ids) == 2
    first, second = ids
    assert _current_key(cairn) == first  # without a hint: in ID order
    assert _current_key(cairn, "--key-hint", second[:8]) == second
    assert _current_key(cairn, env={"CAIRN_KEY_HINT": second}) == second
    assert _current_key(cairn, "--key-hint", second, env={"CAIRN_KEY_HINT": first}) == second
    # A hint that matches no key changes nothing (restic ignores it too).
    assert _current_key(cairn, "--key-hint", "ffffffff" if first[0] != "f" else "0000") == first


def test_key_hint_with_a_wrong_password_is_still_exit_12(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    key_id = cairn.run("key", "list", "--json", check=True).json()[0]["id"]
    r = Cairn(cairn.repo, wrong).run("--key-hint", key_id, "snapshots")
    assert r.code == 12, r.err


# -- compression and the other environment variables -----------------------------------


def test_compression_better_is_between_auto_and_max() -> None:
    assert compression_level("auto") < compression_level("better") < compression_level("max")
    assert compression_level("better") == 7


def _packed(c: Cairn, src: Path, *args: str, env: dict[str, str] | None = None) -> int:
    r = c.run(*args, "backup", "--force", str(src), "--json", env=env)
    assert r.code == 0, r.err
    packed: int = r.json_lines()[-1]["data_added_packed"]
    return packed


def test_compression_from_flag_and_env(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    words = [f"word{i:05d} " for i in range(3000)]
    rng = __import__("random").Random(7)
    text = "".join(rng.choice(words) for _ in range(200_000)).encode()
    (src / "text").write_bytes(text)
    sizes = {}
    for n, (args, env) in enumerate(
        [
            (("--compression", "better"), None),
            ((), {"CAIRN_COMPRESSION": "off"}),
            (("--compression", "fastest"), {"CAIRN_COMPRESSION": "off"}),  # the flag wins
        ]
    ):
        # A new repository each time: a second backup of the same bytes adds nothing.
        c = Cairn(tmp_path / f"repo{n}", cairn.password_file)
        c.run("init", check=True)
        sizes[n] = _packed(c, src, *args, env=env)
    assert sizes[1] >= len(text)  # off: stored as is
    assert sizes[0] < sizes[2] < sizes[1]  # better < fastest < off


def test_environment_variables_fill_settings(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    env = {
        "CAIRN_PACK_SIZE": "32",
        "CAIRN_READ_CONCURRENCY": "3",
        "CAIRN_COMPRESSION": "better",
        "CAIRN_CACHE_DIR": str(tmp_path / "cache"),
        "CAIRN_KEY_HINT": "abcd",
    }
    settings = _settings(cairn, env=env)
    for name, value in [
        ("pack_size", 32),
        ("read_concurrency", 3),
        ("compression", "better"),
        ("cache_dir", str(tmp_path / "cache")),
        ("key_hint", "abcd"),
    ]:
        assert settings[name] == {"value": value, "source": "env"}, name
    # A flag beats the environment.
    settings = _settings(cairn, "--pack-size", "8", env=env)
    assert settings["pack_size"] == {"value": 8, "source": "flag"}
    # An empty variable is unset, as in restic.
    assert _settings(cairn, env={"CAIRN_PACK_SIZE": ""})["pack_size"]["source"] == "default"


def test_cache_dir_from_the_environment_is_used(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    cache = tmp_path / "env-cache"
    cairn.run("backup", str(src), env={"CAIRN_CACHE_DIR": str(cache)}, check=True)
    assert any(p.is_file() for p in cache.rglob("*")), "nothing cached in CAIRN_CACHE_DIR"


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("CAIRN_PACK_SIZE", "3", "must be in 4..128"),
        ("CAIRN_PACK_SIZE", "big", "not an integer"),
        ("CAIRN_READ_CONCURRENCY", "0", "must be in 1..256"),
        ("CAIRN_COMPRESSION", "tiny", "unknown compression"),
    ],
)
def test_bad_environment_values_are_one_line_exit_1(
    cairn: Cairn,  # noqa: F811
    var: str,
    value: str,
    says: str,
) -> None:
    r = cairn.run("snapshots", env={var: value})
    line = _one_error_line(r.err)
    assert r.code == 1 and var in line and says in line, r.err


# -- exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("prune", "--max-unused", "lots"),
        ("prune", "--max-repack-size", "1Q"),
        ("--compression", "tiny", "snapshots"),
        ("--no-such-flag", "snapshots"),
        ("no-such-command",),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(cairn: Cairn, args: tuple[str, ...]) -> None:  # noqa: F811
    r = cairn.run(*args)
    assert r.code == EXIT_FATAL, r.err
    assert "--help" in _one_error_line(r.err)
    j = cairn.run("--json", *args)
    assert j.code == EXIT_FATAL and '"exit_error"' in j.err.splitlines()[0], j.err


def test_an_internal_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """restic exits 2 on a Go runtime error (a bug); cairn on an exception nobody
    anticipated, so a script can tell a broken cairn from a failed job."""

    @click.group()
    def group() -> None:
        pass

    @group.command("boom")
    def boom() -> None:
        raise ZeroDivisionError("division by zero")

    assert run_cli(group, ["boom"]) == EXIT_INTERNAL == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "cairn: internal error: ZeroDivisionError: division by zero"
    assert "--debug" in err and "Traceback" not in err


def test_profile_repository_file_and_key_hint(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    where = tmp_path / "where"
    where.write_text(str(cairn.repo))
    config = tmp_path / "config.toml"
    config.write_text(
        f'[profiles.p]\nrepository_file = "{where}"\nkey_hint = "0123"\n'
        f'password_file = "{cairn.password_file}"\n'
    )
    args = ("--config", str(config), "--profile", "p", "--insecure-kdf")
    r = cairn.run(*args, "snapshots", "--json", base=False)
    assert r.code == 0 and r.json() == [], r.err
    shown = cairn.run(*args, "config", "show", "--json", base=False).json()["settings"]
    assert shown["repository_file"] == {"value": str(where), "source": "profile:p"}
    assert shown["key_hint"] == {"value": "0123", "source": "profile:p"}
    # The environment's location replaces the profile's as a whole.
    env = {"CAIRN_REPOSITORY": str(cairn.repo)}
    shown = cairn.run(*args, "config", "show", "--json", base=False, env=env).json()["settings"]
    assert shown["repo"]["source"] == "env" and shown["repository_file"]["value"] is None
    config.write_text(f'[profiles.p]\nrepository_file = "{where}"\nrepository = "/x"\n')
    r = cairn.run(*args, "snapshots", base=False)
    assert r.code == 1 and "mutually exclusive" in _one_error_line(r.err)
