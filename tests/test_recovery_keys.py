"""Recovery keys (issue 16): the master key escrowed to age recipients, recovered
with the identity when every password is lost.

Identities come from Debian's real ``age-keygen`` and OpenSSH's ``ssh-keygen``
(``scripts/install-test-deps.sh`` installs both): a missing tool fails these tests.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.backends.local import LocalBackend
from cairn.repo.age import BadIdentity, parse_identities, parse_recipient
from cairn.repo.crypto import MasterKey
from cairn.repo.errors import CorruptedObject, UnsupportedVersion
from cairn.repo.recovery import (
    decode_recovery_keyfile,
    key_kind,
    make_recovery_keyfile,
    recovery_info,
    unwrap_recovery_keyfile,
)
from cairn.repo.repository import open_repository
from tests.age_plugin_toy import MESSAGE
from tests.cli_helpers import CAIRN, Cairn

PASSWORD = "correct horse battery staple"


def age_keygen(directory: Path, name: str) -> tuple[Path, str]:
    """A new age identity file made by the real ``age-keygen``, and its recipient."""
    path = directory / f"{name}.age"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    recipient = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert recipient.startswith("age1")
    return path, recipient


def ssh_keygen(directory: Path, name: str) -> tuple[Path, str]:
    """A new unencrypted OpenSSH ed25519 key pair: the private key file, the public line."""
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ann@example", "-f", str(path)],
        check=True,
    )
    return path, (directory / f"{name}.pub").read_text().strip()


def _files(repo: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()
    }


def _password_keys(c: Cairn) -> list[str]:
    keys = c.run("key", "list", "--json", check=True).json()
    return [k["id"] for k in keys if k["kind"] == "password"]


def _make_tree(src: Path) -> None:
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(700_000))
    (src / "sub" / "b.txt").write_text("hello recovery\n" * 100)
    (src / "empty").write_bytes(b"")


def _same_tree(a: Path, b: Path) -> None:
    left = {p.relative_to(a): p for p in a.rglob("*")}
    right = {p.relative_to(b): p for p in b.rglob("*")}
    assert left.keys() == right.keys()
    for rel, p in left.items():
        if p.is_file():
            assert p.read_bytes() == right[rel].read_bytes(), rel


def _init(tmp_path: Path, *args: str) -> Cairn:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password)
    c.run("init", *args, check=True)
    return c


def _drop_password_keys(c: Cairn) -> None:
    """Delete every password key file. `cairn key remove` cannot: it refuses the key
    in use, and a password key is what opens the repository to remove the others."""
    keys = _password_keys(c)
    assert keys
    refused = c.run("key", "remove", keys[0])
    assert refused.code == 1 and "in use" in refused.err
    for key_id in keys:
        (Path(c.repo) / "keys" / key_id).unlink()


# --- the flow of the issue, through the real CLI --------------------------------------


def test_recover_after_every_password_is_lost(tmp_path: Path) -> None:
    identity, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    src = tmp_path / "src"
    _make_tree(src)
    c.run("backup", str(src), check=True)
    _drop_password_keys(c)

    lost = c.run("snapshots")
    assert lost.code == 12
    assert "only recovery keys" in lost.err and "cairn key recover" in lost.err
    assert len(lost.err.strip().splitlines()) == 1

    before = _files(Path(c.repo))
    new_password = tmp_path / "new-password"
    new_password.write_text("a new password\n")
    result = c.run(
        "--json",
        "key",
        "recover",
        "--identity",
        str(identity),
        "--new-password-file",
        str(new_password),
        base=False,
        env={"CAIRN_REPOSITORY": str(c.repo)},
    )
    assert result.code == 0, result.err
    out = result.json()
    assert out["message_type"] == "key_recovered"
    # Nothing else changed: one new key file, the recovery key still in place.
    after = _files(Path(c.repo))
    added = set(after) - set(before)
    assert added == {f"keys/{out['id']}"}
    assert all(after[name] == data for name, data in before.items())
    assert f"keys/{out['recovery_key']}" in before

    n = Cairn(c.repo, new_password)
    (src / "later.txt").write_text("written after the recovery\n")
    n.run("backup", str(src), check=True)
    target = tmp_path / "restored"
    n.run("restore", "latest", "--target", str(target), check=True)
    _same_tree(src, target / str(src).lstrip("/"))
    assert n.run("check", "--read-data", check=True).code == 0


def test_two_recipients_either_recovers(tmp_path: Path) -> None:
    first, first_recipient = age_keygen(tmp_path, "first")
    second, second_recipient = age_keygen(tmp_path, "second")
    recipients_file = tmp_path / "recipients.txt"
    recipients_file.write_text(f"# the safe's key\n\n{second_recipient}\n")
    c = _init(tmp_path, "--recipient", first_recipient, "--recipients-file", str(recipients_file))
    keys = c.run("key", "list", "--json", check=True).json()
    recovery = [k for k in keys if k["kind"] == "recovery"]
    assert len(recovery) == 1  # one file, both recipients
    assert [r["recipient"] for r in recovery[0]["recipients"]] == [
        first_recipient,
        second_recipient,
    ]
    _drop_password_keys(c)
    for number, identity in enumerate((first, second)):
        new_password = tmp_path / f"password-{number}"
        new_password.write_text(f"password {number}\n")
        # The second identity comes on standard input.
        arg = str(identity) if number == 0 else "-"
        stdin = None if number == 0 else identity.read_bytes()
        c.run(
            "key", "recover", "--identity", arg, "--new-password-file", str(new_password),
            input=stdin, check=True,
        )  # fmt: skip
        assert Cairn(c.repo, new_password).run("snapshots", check=True).code == 0


def test_ssh_ed25519_recipient(tmp_path: Path) -> None:
    private, public = ssh_keygen(tmp_path, "id_ed25519")
    c = _init(tmp_path)
    added = c.run("--json", "key", "add", "--recipient", public, check=True).json()
    assert added["kind"] == "recovery" and added["existing"] is False
    keys = c.run("key", "list", "--json", check=True).json()
    [recovery] = [k for k in keys if k["kind"] == "recovery"]
    [r] = recovery["recipients"]
    # The comment (ann@example) is not stored; the fingerprint is OpenSSH's.
    assert r["type"] == "ssh-ed25519" and r["recipient"] == " ".join(public.split()[:2])
    expected = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{private}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    assert r["fingerprint"] == expected
    assert "ann@example" not in (Path(c.repo) / "keys" / recovery["id"]).read_text()
    assert expected in c.run("key", "list", check=True).out

    _drop_password_keys(c)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    # A passphrase-protected SSH key cannot be used as it is: one line says so.
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)],
                   check=True)  # fmt: skip
    result = c.run("key", "recover", "--identity", str(locked), "--new-password-file",
                   str(new_password))  # fmt: skip
    assert result.code == 1 and "decrypted first" in result.err
    assert len(result.err.strip().splitlines()) == 1
    c.run(
        "key", "recover", "--identity", str(private), "--new-password-file", str(new_password),
        check=True,
    )  # fmt: skip
    assert Cairn(c.repo, new_password).run("snapshots", check=True).code == 0


def _run_on_terminal(args: list[str], env: dict[str, str], answers: list[str]) -> tuple[int, str]:
    """Run cairn with a pseudo-terminal as its controlling terminal, answering each
    password prompt with the next answer; its exit code and what it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader whose terminal is the pty
        os.execve(CAIRN[0], [*CAIRN, *args], env)
    output, sent = b"", 0
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 120)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError(f"no progress on the terminal: {output!r}")
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if sent < len(answers) and output.count(b"password") > sent:
                os.write(fd, answers[sent].encode() + b"\n")
                sent += 1
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_recover_asks_the_new_password_twice_on_a_terminal(tmp_path: Path) -> None:
    identity, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    _drop_password_keys(c)
    args = ["-r", str(c.repo), "--insecure-kdf", "key", "recover", "--identity", str(identity)]
    code, out = _run_on_terminal(args, c.env, ["typed twice", "typed twice"])
    assert code == 0, out
    assert "enter new password again" in out and "saved new key as" in out
    typed = tmp_path / "typed"
    typed.write_text("typed twice\n")
    assert Cairn(c.repo, typed).run("snapshots", check=True).code == 0

    code, out = _run_on_terminal(args, c.env, ["one", "another"])
    assert code == 1 and "passwords do not match" in out


def test_key_list_text_and_json_and_remove(tmp_path: Path) -> None:
    _, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    keys = c.run("key", "list", "--json", check=True).json()
    assert sorted(k["kind"] for k in keys) == ["password", "recovery"]
    [password] = [k for k in keys if k["kind"] == "password"]
    [recovery] = [k for k in keys if k["kind"] == "recovery"]
    assert password["current"] is True and recovery["current"] is False
    assert recovery["verified"] is True and "kdf" not in recovery
    assert recovery["recipients"] == [
        {"type": "x25519", "recipient": recipient, "fingerprint": recipient}
    ]
    text = c.run("key", "list", check=True).out
    lines = text.splitlines()
    assert "Type" in lines[0]
    row = next(i for i, line in enumerate(lines) if line.startswith(" " + recovery["id"][:8]))
    assert "recovery" in lines[row]
    assert lines[row + 1].split() == ["recipient", recipient]
    assert any(line.startswith("*" + password["id"][:8]) and "password" in line for line in lines)

    # The same recipients again: --if-missing adds nothing, without it a second file.
    again = c.run("--json", "key", "add", "--if-missing", "--recipient", recipient, check=True)
    assert again.json() == {
        "message_type": "key_added", "id": recovery["id"], "kind": "recovery", "existing": True,
    }  # fmt: skip
    c.run("key", "add", "--recipient", recipient, check=True)
    assert len([k for k in c.run("key", "list", "--json").json() if k["kind"] == "recovery"]) == 2

    shown = c.run("--json", "cat", "key", recovery["id"][:10], check=True).json()
    assert shown["kind"] == "recovery" and shown["recipients"] == recovery["recipients"]
    both = c.run("key", "add", "--recipient", recipient, "--new-password-file", "x")
    assert both.code == 1 and "exclude each other" in both.err

    removed = c.run("key", "remove", recovery["id"][:10], check=True)
    assert recovery["id"][:8] in removed.out
    assert recovery["id"] not in {k["id"] for k in c.run("key", "list", "--json").json()}


def test_edited_recovery_key_file_is_flagged_unverified(tmp_path: Path) -> None:
    """The recipients shown are in clear: an edit by whoever holds the storage shows
    as unverified to anyone who opens the repository."""
    _, recipient = age_keygen(tmp_path, "escrow")
    _, intruder = age_keygen(tmp_path, "intruder")
    c = _init(tmp_path, "--recipient", recipient)
    [recovery] = [k for k in c.run("key", "list", "--json").json() if k["kind"] == "recovery"]
    path = Path(c.repo) / "keys" / recovery["id"]
    doc = json.loads(path.read_text())
    doc["recipients"] = [intruder]
    path.write_text(json.dumps(doc))
    [edited] = [k for k in c.run("key", "list", "--json").json() if k["kind"] == "recovery"]
    assert edited["verified"] is False
    assert "not written by a holder of the repository key" in c.run("key", "list").out
    # --if-missing does not trust it: it adds a genuine one.
    added = c.run("--json", "key", "add", "--if-missing", "--recipient", intruder, check=True)
    assert added.json()["existing"] is False


# --- bad input ------------------------------------------------------------------------


def test_wrong_identity_is_exit_12(tmp_path: Path) -> None:
    _, recipient = age_keygen(tmp_path, "escrow")
    other, _ = age_keygen(tmp_path, "other")
    c = _init(tmp_path, "--recipient", recipient)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    before = _files(Path(c.repo))
    result = c.run("key", "recover", "--identity", str(other), "--new-password-file",
                   str(new_password))  # fmt: skip
    assert result.code == 12
    assert result.err.strip() == (
        "cairn: this identity does not match any recovery key of the repository"
    )
    assert _files(Path(c.repo)) == before


def test_repository_without_recovery_key(tmp_path: Path) -> None:
    identity, _ = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    result = c.run("key", "recover", "--identity", str(identity), "--new-password-file",
                   str(new_password))  # fmt: skip
    assert result.code == 12
    assert "has no recovery key" in result.err and "key add --recipient" in result.err
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"not a key at all\n", "line 1: not an age identity"),
        (b"# only a comment\n", "no identity in it"),
        (b"AGE-SECRET-KEY-1QQQQ\n", "line 1: "),
        (b"\xff\xfe\x00", "not text"),
        (b"age-encryption.org/v1\n-> scrypt xyz 18\n", "encrypted with age"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n", "not a usable SSH private key"),
    ],
)
def test_malformed_identity_file_is_one_line(tmp_path: Path, content: bytes, phrase: str) -> None:
    _, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    bad = tmp_path / "identity"
    bad.write_bytes(content)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    result = c.run("key", "recover", "--identity", str(bad), "--new-password-file",
                   str(new_password))  # fmt: skip
    assert result.code == 1
    assert phrase in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


@pytest.mark.parametrize("bad", ["age1bogus", "ssh-ed25519 AAAAnotakey", "AGE-SECRET-KEY-1XYZ"])
def test_malformed_recipient_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password)
    result = c.run("init", "--recipient", bad)
    # cairn's usage errors all exit 1 (restic's code; cli/errors.py maps click's 2).
    usage = c.run("init", "--no-such-option")
    assert result.code == usage.code == 1
    assert "Invalid value for '--recipient'" in result.err and repr(bad)[:30] in result.err
    assert not (tmp_path / "repo").exists()  # refused before anything was created

    lines = tmp_path / "recipients.txt"
    lines.write_text(f"# ok so far\n{bad}\n")
    result = c.run("init", "--recipients-file", str(lines))
    assert result.code == 1
    assert f"recipients file {lines}, line 2" in result.err


def test_password_open_skips_recovery_keys(tmp_path: Path) -> None:
    """A password never goes near age: a recovery key file whose age payload is
    garbage costs nothing and is not reported as damaged."""
    _, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    [recovery] = [k for k in c.run("key", "list", "--json").json() if k["kind"] == "recovery"]
    path = Path(c.repo) / "keys" / recovery["id"]
    doc = json.loads(path.read_text())
    doc["age"] = base64.b64encode(b"age-encryption.org/v1\n-> garbage\n").decode()
    path.write_text(json.dumps(doc))
    assert c.run("snapshots", check=True).code == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong\n")
    result = Cairn(c.repo, wrong).run("snapshots")
    assert result.code == 12 and "damaged" not in result.err

    async def open_it() -> None:
        repo = await open_repository(LocalBackend(Path(c.repo)), PASSWORD)
        assert repo.key_id != recovery["id"]

    anyio.run(open_it)


def test_reference_age_tool_reads_the_payload(tmp_path: Path) -> None:
    """The payload is a standard age file: Debian's `age -d` decrypts it to the
    32-byte master key (recovery does not depend on cairn's own code)."""
    identity, recipient = age_keygen(tmp_path, "escrow")
    c = _init(tmp_path, "--recipient", recipient)
    [recovery] = [k for k in c.run("key", "list", "--json").json() if k["kind"] == "recovery"]
    doc = json.loads((Path(c.repo) / "keys" / recovery["id"]).read_text())
    payload = tmp_path / "payload.age"
    payload.write_bytes(base64.b64decode(doc["age"]))
    master = subprocess.run(
        ["age", "-d", "-i", str(identity), str(payload)], check=True, capture_output=True
    ).stdout
    assert len(master) == 32
    data = (Path(c.repo) / "keys" / recovery["id"]).read_bytes()
    opened = unwrap_recovery_keyfile(data, parse_identities(identity.read_bytes(), "id"))
    assert opened == (MasterKey(master), True)


# --- age plugins (pyrage's plugin support, with a toy plugin speaking the protocol) ----


def toy_plugin(tmp_path: Path) -> tuple[dict[str, str], Path, str]:
    """``age-plugin-cairntest`` on a PATH: that PATH, an identity file and its recipient."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "age-plugin-cairntest"
    toy = Path(__file__).with_name("age_plugin_toy.py")
    script.write_text(
        f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(toy)!r}, run_name='__main__')\n"
    )
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    identity, recipient = subprocess.run(
        [str(script), "--generate"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert identity.startswith("AGE-PLUGIN-CAIRNTEST-1") and recipient.startswith("age1cairntest1")
    path = tmp_path / "plugin-identity.txt"
    path.write_text(f"# a plugin identity\n{identity}\n")
    return env, path, recipient


def test_plugin_recipient_and_identity(tmp_path: Path) -> None:
    env, identity, recipient = toy_plugin(tmp_path)
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password)
    init = c.run("init", "--recipient", recipient, env=env, check=True)
    assert MESSAGE in init.err  # the plugin's message reached the user
    keys = c.run("key", "list", "--json", check=True).json()
    [recovery] = [k for k in keys if k["kind"] == "recovery"]
    assert recovery["recipients"] == [
        {"type": "plugin", "recipient": recipient, "fingerprint": recipient}
    ]
    _drop_password_keys(c)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    args = ("key", "recover", "--identity", str(identity), "--new-password-file", str(new_password))
    missing = c.run(*args, env={"PATH": "/usr/bin:/bin"})
    assert missing.code == 1 and "age-plugin-cairntest" in missing.err
    assert len(missing.err.strip().splitlines()) == 1
    c.run(*args, env=env, check=True)
    assert Cairn(c.repo, new_password).run("snapshots", check=True).code == 0


# --- profiles and `cairn run` ---------------------------------------------------------


def _config(tmp_path: Path, c: Cairn, src: Path, recipients: list[str], **extra: str) -> Path:
    lines = [
        "[profiles.nightly]",
        f'repository = "{c.repo}"',
        f'password_file = "{c.password_file}"',
        f'paths = ["{src}"]',
        "check = false",
        "recovery_recipients = [" + ", ".join(json.dumps(r) for r in recipients) + "]",
        *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
    ]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_profile_escrows_on_init_and_run(tmp_path: Path) -> None:
    identity, recipient = age_keygen(tmp_path, "fleet")
    _, extra = age_keygen(tmp_path, "safe")
    extra_file = tmp_path / "more.txt"
    extra_file.write_text(extra + "\n")
    src = tmp_path / "src"
    _make_tree(src)
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")

    # `cairn init --profile` escrows to the profile's recipients.
    first = Cairn(tmp_path / "first", password)
    config = _config(tmp_path, first, src, [recipient])
    first.run("--insecure-kdf", "--config", str(config), "--profile", "nightly", "init",
              base=False, check=True)  # fmt: skip
    keys = first.run("key", "list", "--json", check=True).json()
    assert [r["recipient"] for k in keys for r in k.get("recipients", [])] == [recipient]

    # A repository made without escrow gets it on the next `cairn run`, once.
    second = Cairn(tmp_path / "second", password)
    second.run("init", check=True)
    config = _config(
        tmp_path, second, src, [recipient], recovery_recipients_file=str(extra_file)
    )
    for _ in range(2):
        result = second.run("--insecure-kdf", "--json", "run", "nightly", "--config",
                            str(config), base=False)  # fmt: skip
        assert result.code == 0, result.err
        summary = result.json_lines()[-1]
        assert [s["step"] for s in summary["steps"]][:2] == ["recovery-key", "backup"]
        assert summary["steps"][0]["status"] == "ok"
    keys = second.run("key", "list", "--json", check=True).json()
    [recovery] = [k for k in keys if k["kind"] == "recovery"]
    assert {r["recipient"] for r in recovery["recipients"]} == {recipient, extra}
    _drop_password_keys(second)
    new_password = tmp_path / "new"
    new_password.write_text("new\n")
    second.run("key", "recover", "--identity", str(identity), "--new-password-file",
               str(new_password), check=True)  # fmt: skip
    assert len(Cairn(second.repo, new_password).run("--json", "snapshots").json()) == 2


def test_profile_with_a_malformed_recipient_fails_before_running(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password)
    config = _config(tmp_path, c, tmp_path, ["age1bogus"])
    result = c.run("run", "nightly", "--config", str(config), base=False)
    assert result.code == 1
    assert "line 6" in result.err and "recovery_recipients" in result.err
    assert "age1bogus" in result.err and len(result.err.strip().splitlines()) == 1


# --- the decoder, fuzzed ----------------------------------------------------------------

_MASTER = MasterKey(bytes(range(32)))


@functools.cache
def _sample(directory: str) -> tuple[bytes, list[Any]]:
    identity, recipient = age_keygen(Path(directory), "fuzz")
    data = make_recovery_keyfile(
        _MASTER, [parse_recipient(recipient)], hostname="host", username="ann"
    )
    return data, parse_identities(identity.read_bytes(), "fuzz")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[Any]]:
    return _sample(str(tmp_path_factory.mktemp("fuzz")))


def test_round_trip_and_kind(sample: tuple[bytes, list[Any]]) -> None:
    data, identities = sample
    assert key_kind(data) == "recovery"
    assert unwrap_recovery_keyfile(data, identities) == (_MASTER, True)
    info = recovery_info(data, "x", _MASTER)
    assert info["verified"] is True and info["kind"] == "recovery"
    assert recovery_info(data, "x", MasterKey(bytes(32)))["verified"] is False
    doc = json.loads(data)
    doc["kind"] = "quantum"
    with pytest.raises(UnsupportedVersion):
        key_kind(json.dumps(doc).encode())
    doc["kind"], doc["version"] = "recovery", 2
    with pytest.raises(UnsupportedVersion):
        decode_recovery_keyfile(json.dumps(doc).encode())
    with pytest.raises(BadIdentity):
        parse_identities(b"", "empty")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_damaged_recovery_key_file_never_yields_a_wrong_key(
    sample: tuple[bytes, list[Any]], data: st.DataObject
) -> None:
    original, identities = sample
    how = data.draw(st.sampled_from(["flip", "truncate", "garbage", "json"]))
    if how == "flip":
        bit = data.draw(st.integers(0, len(original) * 8 - 1))
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        damaged = bytearray(original[: data.draw(st.integers(0, len(original) - 1))])
    elif how == "garbage":
        damaged = bytearray(data.draw(st.binary(max_size=400)))
    else:  # well-formed JSON, wrong shapes
        doc = json.loads(original)
        key = data.draw(st.sampled_from(sorted(doc)))
        doc[key] = data.draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.text()))
        )
        damaged = bytearray(json.dumps(doc).encode())
    try:
        key_kind(bytes(damaged))
        info = recovery_info(bytes(damaged), "x", _MASTER)
        opened = unwrap_recovery_keyfile(bytes(damaged), identities, "x")
    except (CorruptedObject, UnsupportedVersion):
        return
    if opened is not None:
        # Harmless flips (JSON whitespace, base64 padding bits) keep the right key.
        master, verified = opened
        assert master == _MASTER
        assert verified == info["verified"]
