"""Sizes as users write them on the command line and in profiles."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1024``, ``10K``, ``1.5M``, ``2GiB``, ``1T`` → bytes (binary multiples, as
    restic); ``ValueError`` otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: use e.g. 500M or 2G")
    return int(float(match[1]) * _UNITS[match[2].lower()])
