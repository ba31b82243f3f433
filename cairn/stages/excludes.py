"""Which paths a backup leaves out: restic's exclude options.

Patterns follow restic: a pattern without a slash matches any path component
(``*.tmp``, ``node_modules``); one with slashes matches consecutive components
anywhere in the path, or from the root if it starts with ``/``; ``*``, ``?`` and
``[...]`` stay within one component, and ``**`` matches any number of them. A
matched directory is excluded with everything in it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


def _component(comp: str) -> str:
    """One path component's glob as a regex: ``*``, ``?`` and ``[...]`` never match
    ``/`` (Go's ``filepath.Match``, which restic uses); ``\\`` escapes."""
    out: list[str] = []
    i, n = 0, len(comp)
    while i < n:
        c = comp[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i < n:
            out.append(re.escape(comp[i]))
            i += 1
        elif c == "[":
            j = i + (1 if comp[i : i + 1] in ("!", "^") else 0)
            j += 1 if comp[j : j + 1] == "]" else 0
            j = comp.find("]", j)
            if j < 0:
                out.append(re.escape(c))
                continue
            body, i = comp[i:j], j + 1
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\").replace("[", "\\[")
            out.append(("[^/" if negate else "[") + body + "]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _compile_text(pattern: str) -> str | None:
    """restic's matching as a regex over an absolute path with ``/`` appended: the
    pattern's components match a run of consecutive path components (at the start
    for a pattern starting with ``/``, anywhere otherwise), and ``**`` matches any
    number of components. What follows the run is the matched entry's contents."""
    pat = pattern.rstrip("/")
    if not pat:
        return None
    body = "".join(
        "(?:[^/]*/)*" if comp == "**" else _component(comp) + "/"
        for comp in pat.strip("/").split("/")
    )
    start = "/" if pat.startswith("/") else "/(?:[^/]*/)*"
    return start + body + ".*"


def _compile(pattern: str) -> re.Pattern[bytes] | None:
    text = _compile_text(pattern)
    if text is None:
        return None
    return re.compile(os.fsencode(text), re.DOTALL)


def _compile_icase(pattern: str) -> re.Pattern[str] | None:
    # Case folding on text (surrogate-escaped bytes stay as they are), so that
    # non-ASCII letters fold too, as with restic's strings.ToLower.
    text = _compile_text(pattern)
    if text is None:
        return None
    return re.compile(text, re.DOTALL | re.IGNORECASE)


#: ``--exclude-caches``: a directory tagged as a cache (https://bford.info/cachedir/).
CACHEDIR_TAG = "CACHEDIR.TAG:Signature: 8a477f597d28d172789f06886806bc55"


def _starts_with(dir_fd: int, name: bytes, header: bytes) -> bool:
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return False  # not readable (or a symlink): it excludes nothing
    try:
        return os.pread(fd, len(header), 0) == header
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class ExcludeRules:
    """All exclusion rules of one backup run."""

    patterns: list[str] = field(default_factory=list)
    ipatterns: list[str] = field(default_factory=list)
    if_present: list[str] = field(default_factory=list)
    larger_than: int | None = None
    one_file_system: bool = False
    _compiled: list[re.Pattern[bytes]] = field(default_factory=list, init=False, repr=False)
    _icompiled: list[re.Pattern[str]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [rx for p in self.patterns if (rx := _compile(p)) is not None]
        self._icompiled = [ix for p in self.ipatterns if (ix := _compile_icase(p)) is not None]

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
        if any(rx.match(path + b"/") for rx in self._compiled):
            return True
        if not self._icompiled:
            return False
        text = os.fsdecode(path) + "/"
        return any(rx.match(text) for rx in self._icompiled)

    def exclusion_tags(self, dir_fd: int, names: set[bytes]) -> list[bytes]:
        """``--exclude-if-present NAME[:HEADER]`` (and ``--exclude-caches``): the tag
        files in the directory open as ``dir_fd`` that exclude its contents; empty if
        none does. As restic's: with a HEADER, the file must begin with it; the tag
        files themselves are kept."""
        found = []
        for marker in self.if_present:
            name, sep, header = marker.partition(":")
            tag = os.fsencode(name)
            if tag in names and (not sep or _starts_with(dir_fd, tag, os.fsencode(header))):
                found.append(tag)
        return found

    def too_large(self, size: int) -> bool:
        return self.larger_than is not None and size > self.larger_than

    def as_list(self) -> list[str]:
        return [*self.patterns, *(f"i:{p}" for p in self.ipatterns)]
