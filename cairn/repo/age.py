"""age recipients and identities, parsed and checked through ``pyrage``.

``pyrage`` binds the Rust implementation of age (rage). It supports X25519 recipients
and identities (``age1…``, ``AGE-SECRET-KEY-1…``), SSH ones (``ssh-ed25519``,
``ssh-rsa``; unencrypted private keys only) and age plugins (``age1NAME1…``,
``AGE-PLUGIN-NAME-1…``, run as ``age-plugin-NAME`` from ``PATH``). Used by
``cairn.repo.recovery`` for recovery key files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyrage

from cairn.repo.errors import RepoError

AGE_MAGIC = b"age-encryption.org/"
_AGE_ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
_SSH_PRIVATE = (b"-----BEGIN OPENSSH PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----")
_SSH_TYPES = ("ssh-ed25519", "ssh-rsa")


class BadRecipient(ValueError):
    """A recipient string (or a line of a recipients file) is not a recipient.

    The CLI reports it as a usage error naming the option; met later (an age plugin
    missing at encryption time) it is a one-line error, exit 1.
    """

    exit_code = 1


class BadIdentity(RepoError):
    """An identity file cannot be read as age identities (one line, exit 1)."""

    exit_code = 1


# --- recipients ----------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One recipient: its canonical text (what the file stores), type and fingerprint."""

    text: str
    type: str  # "x25519", "ssh-ed25519", "ssh-rsa", or "plugin" (an age plugin's)
    fingerprint: str

    def as_json(self) -> dict[str, str]:
        return {"type": self.type, "recipient": self.text, "fingerprint": self.fingerprint}


def ssh_fingerprint(blob_b64: str) -> str:
    """OpenSSH's fingerprint of a public key (``ssh-keygen -l``): SHA256 of the key blob."""
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_recipient(text: str) -> Recipient:
    """A recipient from its age text; ``BadRecipient`` naming it when it is none.

    SSH keys keep only ``type key`` (the comment, often ``user@host``, is not stored).
    X25519 and plugin recipients are their own fingerprint (age has no other).
    """
    text = text.strip()
    fields = text.split()
    if len(fields) >= 2 and fields[0] in _SSH_TYPES:
        canonical = f"{fields[0]} {fields[1]}"
        try:
            pyrage.ssh.Recipient.from_str(canonical)
            fingerprint = ssh_fingerprint(fields[1])
        except (pyrage.RecipientError, binascii.Error, ValueError):
            raise BadRecipient(f"not a valid {fields[0]} public key: {short(text)!r}") from None
        return Recipient(canonical, fields[0], fingerprint)
    if len(fields) == 1 and text.lower().startswith("age1"):
        try:
            return Recipient(str(pyrage.x25519.Recipient.from_str(text)), "x25519", text)
        except pyrage.RecipientError:
            pass
        try:
            plugin = pyrage.plugin.Recipient.from_str(text)
        except pyrage.RecipientError:
            pass
        else:
            return Recipient(str(plugin), "plugin", str(plugin))
    raise BadRecipient(
        f"not an age recipient (age1…) or SSH public key (ssh-ed25519, ssh-rsa): {short(text)!r}"
    )


def one_line(exc: Exception) -> str:
    """rage's message on one line, without the Unicode isolates it wraps names in."""
    text = str(exc).replace("\u2068", "").replace("\u2069", "")
    return " ".join(text.split())


def short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def parse_recipients_file(text: str, source: str) -> list[Recipient]:
    """Recipients in age's recipients-file format: one per line, ``#`` comments and
    blank lines ignored; a bad line is ``BadRecipient`` naming the file and line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(parse_recipient(line))
        except BadRecipient as exc:
            raise BadRecipient(f"{source}, line {number}: {exc}") from None
    if not out:
        raise BadRecipient(f"{source}: no recipient in the file")
    return out


def age_recipients(recipients: Sequence[Recipient], callbacks: Any) -> list[Any]:
    """The pyrage objects to encrypt to (plugin recipients grouped by plugin)."""
    out: list[Any] = []
    plugins: dict[str, list[Any]] = {}
    for r in recipients:
        if r.type == "x25519":
            out.append(pyrage.x25519.Recipient.from_str(r.text))
        elif r.type == "plugin":
            p = pyrage.plugin.Recipient.from_str(r.text)
            plugins.setdefault(p.plugin(), []).append(p)
        else:
            out.append(pyrage.ssh.Recipient.from_str(r.text))
    for name, members in plugins.items():
        try:
            out.append(pyrage.plugin.RecipientPluginV1(name, members, [], callbacks))
        except pyrage.EncryptError as exc:
            raise BadRecipient(f"age plugin {name!r}: {one_line(exc)}") from None
    return out


# --- identities ----------------------------------------------------------------------


class QuietCallbacks:
    """age plugin callbacks for a session without a terminal: messages go nowhere
    useful, and requests for input are declined."""

    def display_message(self, message: str) -> None:
        pass

    def confirm(self, message: str, yes_string: str, no_string: str | None) -> bool | None:
        return None

    def request_public_string(self, description: str) -> str | None:
        return None

    def request_passphrase(self, description: str) -> str | None:
        return None


def parse_identities(data: bytes, source: str, callbacks: Any = None) -> list[Any]:
    """The age identities in an identity file (``age-keygen`` output, an OpenSSH
    private key, or ``AGE-PLUGIN-…`` lines from ``age-plugin-yubikey``).

    ``BadIdentity`` (one line) when the file holds something else; passphrase-protected
    files are refused with a hint (decrypt them with ``age -d`` first).
    """
    stripped = data.lstrip()
    if stripped.startswith(AGE_MAGIC) or stripped.startswith(_AGE_ARMOR):
        raise BadIdentity(
            f"identity file {source} is itself encrypted with age; decrypt it first "
            f"(age -d {source} | cairn key recover --identity -)"
        )
    if stripped.startswith(_SSH_PRIVATE):
        try:
            return [pyrage.ssh.Identity.from_buffer(data)]
        except pyrage.IdentityError as exc:
            raise BadIdentity(
                f"identity file {source}: not a usable SSH private key: {one_line(exc)}"
            ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadIdentity(f"identity file {source}: not an age identity file (not text)") from None
    identities: list[Any] = []
    plugins: dict[str, list[Any]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("AGE-SECRET-KEY-1"):
                identities.append(pyrage.x25519.Identity.from_str(line))
                continue
            if line.startswith("AGE-PLUGIN-"):
                ident = pyrage.plugin.Identity.from_str(line)
                plugins.setdefault(ident.plugin(), []).append(ident)
                continue
        except pyrage.IdentityError as exc:
            raise BadIdentity(f"identity file {source}, line {number}: {one_line(exc)}") from None
        raise BadIdentity(
            f"identity file {source}, line {number}: not an age identity "
            "(AGE-SECRET-KEY-1…, AGE-PLUGIN-…) nor an OpenSSH private key"
        )
    for name, members in plugins.items():
        try:
            identities.append(
                pyrage.plugin.IdentityPluginV1(name, members, callbacks or QuietCallbacks())
            )
        except pyrage.DecryptError as exc:
            raise BadIdentity(
                f"identity file {source}: age plugin {name!r}: {one_line(exc)}"
            ) from None
    if not identities:
        raise BadIdentity(f"identity file {source}: no identity in it")
    return identities
