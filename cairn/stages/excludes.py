"""Which paths a backup leaves out: restic's exclude options.

Patterns follow restic: a pattern without a slash matches any path component
(``*.tmp``, ``node_modules``); one with a slash is matched against the whole
absolute path, and ``**`` matches any number of directories.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field


def _compile(pattern: str, ignore_case: bool) -> re.Pattern[bytes]:
    pat = pattern.rstrip("/")
    anchored = "/" in pat
    parts: list[str] = []
    for comp in pat.strip("/").split("/"):
        if comp == "**":
            parts.append("(?:.*/)?")
            continue
        parts.append(fnmatch.translate(comp).removeprefix("(?s:").removesuffix(")\\Z") + "/")
    body = "".join(parts).removesuffix("/")
    body = body.replace("(?:.*/)?/", "(?:.*/)?")
    if anchored:
        regex = ("/" if pat.startswith("/") else "(?:^|.*/)") + body + "(?:/.*)?$"
    else:
        regex = "(?:^|.*/)" + body + "(?:/.*)?$"
    flags = re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL
    return re.compile(os.fsencode(regex.replace("^/", "^/")), flags)


@dataclass
class ExcludeRules:
    """All exclusion rules of one backup run."""

    patterns: list[str] = field(default_factory=list)
    ipatterns: list[str] = field(default_factory=list)
    if_present: list[str] = field(default_factory=list)
    larger_than: int | None = None
    one_file_system: bool = False
    _compiled: list[re.Pattern[bytes]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [_compile(p, False) for p in self.patterns if p] + [
            _compile(p, True) for p in self.ipatterns if p
        ]

    @classmethod
    def from_files(cls, files: list[str], **kwargs: object) -> ExcludeRules:
        """Rules with the patterns of ``--exclude-file`` files added (# comments)."""
        patterns = list(kwargs.pop("patterns", []) or [])  # type: ignore[call-overload]
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        patterns.append(os.path.expandvars(line))
        return cls(patterns=patterns, **kwargs)  # type: ignore[arg-type]

    def excluded_path(self, path: bytes) -> bool:
        """Whether an absolute path matches an exclude pattern."""
        return any(rx.match(path) for rx in self._compiled)

    def excluded_dir_contents(self, path: bytes, names: set[bytes]) -> bool:
        """``--exclude-if-present``: the directory holds a marker file."""
        return any(os.fsencode(marker) in names for marker in self.if_present)

    def too_large(self, size: int) -> bool:
        return self.larger_than is not None and size > self.larger_than

    def as_list(self) -> list[str]:
        return [*self.patterns, *(f"i:{p}" for p in self.ipatterns)]


def parse_size(text: str) -> int:
    """``1024``, ``10K``, ``5M``, ``2G``, ``1T`` (binary multiples, as restic)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not match:
        raise ValueError(f"invalid size {text!r}")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match[2].lower()]
    return int(match[1]) * factor
