"""A toy age plugin for the recovery key tests — NOT secure, it only speaks the protocol.

Installed by the tests as ``age-plugin-cairntest`` on ``PATH``, it implements the
``recipient-v1`` and ``identity-v1`` state machines of the age plugin specification
(c2sp.org/age-plugin) so that pyrage's plugin support is exercised for real: the
identity and the recipient share one random cookie, and a file key is "wrapped" by
XOR with a hash of it. ``--generate`` prints a new identity and its recipient.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from typing import TextIO

NAME = "cairntest"
STANZA = "cairntest"
MESSAGE = "toy plugin: pretend to touch the token"
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
    gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(x) >> 5 for x in hrp] + [0] + [ord(x) & 31 for x in hrp]


def _convert(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc, bits, out, maxv = 0, 0, [], (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    return out


def bech32_encode(hrp: str, payload: bytes) -> str:
    data = _convert(payload, 8, 5, True)
    checksum_in = _hrp_expand(hrp) + data + [0] * 6
    polymod = _polymod(checksum_in) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in data + checksum)


def bech32_payload(text: str) -> bytes:
    text = text.lower()
    data = [_CHARSET.index(c) for c in text[text.rindex("1") + 1 :]][:-6]
    return bytes(_convert(data, 5, 8, False))


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def read_stanza(stream: TextIO) -> tuple[list[str], bytes]:
    line = stream.readline()
    if not line.startswith("-> "):
        raise SystemExit(f"toy plugin: unexpected input {line!r}")
    args = line[3:].rstrip("\n").split(" ")
    body = ""
    while True:
        chunk = stream.readline().rstrip("\n")
        body += chunk
        if len(chunk) < 64:
            return args, _b64d(body)


def write_stanza(args: list[str], body: bytes = b"") -> None:
    text = _b64e(body)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    if not lines or len(lines[-1]) == 64:
        lines.append("")
    sys.stdout.write("-> " + " ".join(args) + "\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def _tag(cookie: bytes) -> str:
    return _b64e(hashlib.sha256(b"tag" + cookie).digest()[:4])


def _pad(cookie: bytes) -> bytes:
    return hashlib.sha256(b"wrap" + cookie).digest()[:16]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _phase_one() -> list[tuple[list[str], bytes]]:
    commands = []
    while True:
        args, body = read_stanza(sys.stdin)
        if args[0] == "done":
            return commands
        commands.append((args, body))


def recipient_v1() -> None:
    recipients, file_keys = [], []
    for args, body in _phase_one():
        if args[0] == "add-recipient":
            recipients.append(bech32_payload(args[1]))
        elif args[0] == "wrap-file-key":
            file_keys.append(body)
    write_stanza(["msg"], MESSAGE.encode())
    read_stanza(sys.stdin)  # ok or fail: either way go on
    for index, key in enumerate(file_keys):
        for cookie in recipients:
            wrapped = _xor(key, _pad(cookie))
            write_stanza(["recipient-stanza", str(index), STANZA, _tag(cookie)], wrapped)
            read_stanza(sys.stdin)
    write_stanza(["done"])


def identity_v1() -> None:
    identities, stanzas = [], []
    for args, body in _phase_one():
        if args[0] == "add-identity":
            identities.append(bech32_payload(args[1]))
        elif args[0] == "recipient-stanza":
            stanzas.append((args[1:], body))
    write_stanza(["msg"], MESSAGE.encode())
    read_stanza(sys.stdin)
    done: set[str] = set()
    for args, body in stanzas:
        index, kind, *rest = args
        if kind != STANZA or index in done:
            continue
        for cookie in identities:
            if rest == [_tag(cookie)]:
                write_stanza(["file-key", index], _xor(body, _pad(cookie)))
                read_stanza(sys.stdin)
                done.add(index)
                break
    write_stanza(["done"])


def main() -> None:
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    if arg == "--generate":
        cookie = os.urandom(32)
        print(bech32_encode(f"AGE-PLUGIN-{NAME.upper()}-".lower(), cookie).upper())
        print(bech32_encode(f"age1{NAME}", cookie))
    elif arg == "--age-plugin=recipient-v1":
        recipient_v1()
    elif arg == "--age-plugin=identity-v1":
        identity_v1()
    else:
        raise SystemExit(f"toy plugin: unknown argument {arg!r}")


if __name__ == "__main__":
    main()
