"""Recovery key files: the master key escrowed to ``age`` recipients (issue 16).

A recovery key file sits in ``keys/`` beside the password key files. It holds the
master key encrypted with age (https://age-encryption.org/v1, through ``pyrage``, the
binding of the Rust implementation) to one or more *public* recipients — X25519
(``age1…``), SSH (``ssh-ed25519``/``ssh-rsa``) or an age plugin's (``age1yubikey1…``)
— so whoever holds a matching private identity can recover the repository without
any password, and the hosts that back up hold nothing that could.

The recipients' public keys are stored in clear (``key list`` shows them without
decrypting), and a MAC keyed by the master key binds them, the header and the age
ciphertext together: anyone who opened the repository can tell that the file was
written by a holder of the master key and was not edited since (``verified`` in
``key list``). ``docs/format.md`` has the schema and the threat model.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3
import pyrage

from cairn.repo.age import (
    AGE_MAGIC,
    BadRecipient,
    QuietCallbacks,
    Recipient,
    age_recipients,
    one_line,
    parse_recipient,
    short,
)
from cairn.repo.crypto import MASTER_KEY_SIZE, MasterKey, derive_subkey
from cairn.repo.errors import CorruptedObject, RepoError, UnsupportedVersion
from cairn.repo.schema import Reader

KIND_PASSWORD = "password"
KIND_RECOVERY = "recovery"
RECOVERY_VERSION = 1
# BLAKE3 derive_key context of the MAC key; fixed for format version 1.
CONTEXT_RECOVERY_MAC = "cairn 2026-12 recovery key file mac v1"
_AD_PREFIX = b"cairn recovery key v1"
_U32 = struct.Struct("<I")
MAC_SIZE = 32

# Bounds accepted when reading, so a hostile file cannot make `key list` or `recover`
# chew on megabytes: a real one with a dozen recipients is a few KiB.
MAX_RECIPIENTS = 64
MAX_AGE_BYTES = 256 * 1024
_MAX_RECIPIENT_CHARS = 2048  # an ssh-rsa 4096 public key is ~730 characters


class IdentityMismatch(RepoError):
    """No recovery key of the repository opens with the given identities."""

    exit_code = 12

    def __init__(self, detail: str = "") -> None:
        super().__init__("this identity does not match any recovery key of the repository" + detail)


class NoRecoveryKey(RepoError):
    """``key recover`` on a repository without recovery key files."""

    exit_code = 12

    def __init__(self, location: str) -> None:
        super().__init__(
            f"{location}: the repository has no recovery key, so no identity can open it "
            "(add one with `cairn key add --recipient`)"
        )


def _mac_input(header: dict[str, Any], recipients: Sequence[str], age_bytes: bytes) -> bytes:
    fields = [
        str(header["version"]).encode(),
        KIND_RECOVERY.encode(),
        header["created"].encode("utf-8"),
        header["hostname"].encode("utf-8"),
        header["username"].encode("utf-8"),
        str(len(recipients)).encode(),
        *(r.encode("utf-8") for r in recipients),
        age_bytes,
    ]
    return _AD_PREFIX + b"".join(_U32.pack(len(f)) + f for f in fields)


def _mac(master: MasterKey, data: bytes) -> bytes:
    key = derive_subkey(master.raw, CONTEXT_RECOVERY_MAC)
    return blake3.blake3(data, key=key).digest()


def make_recovery_keyfile(
    master: MasterKey,
    recipients: Sequence[Recipient],
    *,
    hostname: str,
    username: str,
    created: datetime | None = None,
    callbacks: Any = None,
) -> bytes:
    """A recovery key file (JSON bytes): ``master`` encrypted with age to ``recipients``."""
    if not recipients:
        raise ValueError("a recovery key needs at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise BadRecipient(f"at most {MAX_RECIPIENTS} recipients per recovery key")
    texts = list(dict.fromkeys(r.text for r in recipients))  # in order, without repeats
    unique = [next(r for r in recipients if r.text == t) for t in texts]
    try:
        age_bytes = pyrage.encrypt(
            master.raw, age_recipients(unique, callbacks or QuietCallbacks())
        )
    except pyrage.EncryptError as exc:  # a plugin failed to wrap
        raise BadRecipient(f"age: {one_line(exc)}") from None
    when = (created or datetime.now(UTC)).astimezone(UTC)
    header: dict[str, Any] = {
        "version": RECOVERY_VERSION,
        "kind": KIND_RECOVERY,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": hostname,
        "username": username,
    }
    doc = {
        **header,
        "recipients": texts,
        "age": base64.b64encode(age_bytes).decode("ascii"),
        "mac": base64.b64encode(_mac(master, _mac_input(header, texts, age_bytes))).decode(),
    }
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def key_kind(data: bytes, name: str = "") -> str:
    """``"password"`` or ``"recovery"``: what a key file is, read without any secret.

    A key file without ``kind`` is a password key file (they were written without one
    before recovery keys existed). Malformed JSON is ``CorruptedObject``; a kind this
    cairn does not know is ``UnsupportedVersion``.
    """
    doc = _load_json(data, name)
    kind = doc.get("kind", KIND_PASSWORD) if isinstance(doc, dict) else KIND_PASSWORD
    if not isinstance(kind, str):
        raise CorruptedObject("key file", name, "field 'kind' is not a string")
    if kind not in (KIND_PASSWORD, KIND_RECOVERY):
        raise UnsupportedVersion("key file", name, f"key file kind {kind!r} is not supported")
    return kind


def _load_json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptedObject("key file", name, "not valid UTF-8 JSON") from None


@dataclass(frozen=True)
class RecoveryKeyFile:
    """A decoded (not yet verified) recovery key file."""

    header: dict[str, Any]
    recipients: list[Recipient]
    age: bytes
    mac: bytes

    def verify(self, master: MasterKey) -> bool:
        """Whether the file was written by a holder of ``master`` and is unedited."""
        texts = [r.text for r in self.recipients]
        return _mac(master, _mac_input(self.header, texts, self.age)) == self.mac


def decode_recovery_keyfile(data: bytes, name: str = "") -> RecoveryKeyFile:
    """Parse a recovery key file; ``CorruptedObject`` for anything the spec forbids."""
    r = Reader(_load_json(data, name), "recovery key file", name)
    version = r.get_int("version")
    if version != RECOVERY_VERSION:
        raise UnsupportedVersion(
            "recovery key file", name, f"recovery key file version {version} is not supported"
        )
    if r.get_str("kind") != KIND_RECOVERY:
        r.fail("field 'kind' is not 'recovery'")
    header: dict[str, Any] = {"version": version, "kind": KIND_RECOVERY}
    for key in ("created", "hostname", "username"):
        value = r.get_str(key)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            r.fail(f"field {key!r} is not valid Unicode")
        header[key] = value
    texts = r.get_str_list("recipients")
    if not 1 <= len(texts) <= MAX_RECIPIENTS:
        r.fail(f"field 'recipients' must hold 1 to {MAX_RECIPIENTS} recipients")
    recipients = []
    for text in texts:
        if len(text) > _MAX_RECIPIENT_CHARS:
            r.fail("a recipient is too long")
        try:
            recipient = parse_recipient(text)
        except BadRecipient as exc:
            r.fail(f"bad recipient: {exc}")
        if recipient.text != text:
            r.fail(f"recipient {short(text)!r} is not in canonical form")
        recipients.append(recipient)
    if len({x.text for x in recipients}) != len(recipients):
        r.fail("a recipient is listed twice")
    age_bytes = _b64(r, "age", MAX_AGE_BYTES)
    if not age_bytes.startswith(AGE_MAGIC):
        r.fail("field 'age' is not an age file")
    mac = _b64(r, "mac", MAC_SIZE)
    if len(mac) != MAC_SIZE:
        r.fail(f"field 'mac' is not {MAC_SIZE} bytes")
    return RecoveryKeyFile(header, recipients, age_bytes, mac)


def _b64(r: Reader, key: str, limit: int) -> bytes:
    text = r.get_str(key)
    if len(text) > limit * 4 // 3 + 4:
        r.fail(f"field {key!r} is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        r.fail(f"field {key!r} is not base64")


def unwrap_recovery_keyfile(
    data: bytes, identities: Sequence[Any], name: str = ""
) -> tuple[MasterKey, bool] | None:
    """The master key and whether the file's MAC verifies under it, if one of
    ``identities`` opens the file; None if none matches.

    ``CorruptedObject`` when the file is malformed or its age payload is damaged (the
    identity matched a recipient but the decryption failed, or the plaintext is not a
    master key). A failed MAC does not refuse the key: the caller checks that it opens
    the repository's config (which is authenticated), and recovery is the last resort.
    """
    parsed = decode_recovery_keyfile(data, name)
    try:
        raw = pyrage.decrypt(parsed.age, list(identities))
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            return None
        raise CorruptedObject("recovery key file", name, f"age: {one_line(exc)}") from None
    if len(raw) != MASTER_KEY_SIZE:
        raise CorruptedObject("recovery key file", name, "its age payload is not a master key")
    master = MasterKey(raw)
    return master, parsed.verify(master)


def recovery_info(data: bytes, name: str = "", master: MasterKey | None = None) -> dict[str, Any]:
    """Metadata for ``key list``; ``verified`` only when the master key is known."""
    parsed = decode_recovery_keyfile(data, name)
    info: dict[str, Any] = {
        **parsed.header,
        "recipients": [r.as_json() for r in parsed.recipients],
    }
    if master is not None:
        info["verified"] = parsed.verify(master)
    return info


def recipient_set(recipients: Iterable[Recipient]) -> frozenset[str]:
    """What ``key add --if-missing`` compares: the canonical recipient texts."""
    return frozenset(r.text for r in recipients)
