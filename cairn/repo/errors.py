"""Repository errors users can act on.

Every class carries the process ``exit_code`` the CLI maps it to (restic's codes where
restic has one) and a message written for the user, on one line. ``cli/`` prints
``str(exc)`` and exits with ``exc.exit_code``.
"""

from __future__ import annotations

from typing import Any

from cairn.backends.base import rebuild_error


class RepoError(Exception):
    """A repository operation failed; the message is written for the user.

    Errors cross process boundaries (a worker decodes a corrupt blob): every subclass
    pickles with its class, message and attributes, whatever its ``__init__`` takes.
    """

    exit_code = 1

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_error, (type(self), self.args, self.__dict__))


class RepositoryNotFound(RepoError):
    """There is no repository (no ``config`` object) at the given location."""

    exit_code = 10

    def __init__(self, location: str) -> None:
        super().__init__(f"{location}: no repository found (is the path right? run `cairn init`)")
        self.location = location


class RepositoryExists(RepoError):
    """``init`` found a repository already in place; nothing was changed."""

    exit_code = 1

    def __init__(self, location: str) -> None:
        super().__init__(f"{location}: a repository already exists here, refusing to overwrite")
        self.location = location


class WrongPassword(RepoError):
    """No key file of the repository opens with the given password."""

    exit_code = 12

    def __init__(self, detail: str = "no key of the repository opens with this password") -> None:
        super().__init__(f"wrong password: {detail}")


class CorruptedObject(RepoError):
    """A stored object fails authentication, its hash, or its schema.

    ``kind`` says what the object is (``"data blob"``, ``"index"``, ``"pack"``, ...),
    ``name`` identifies it (an ID or backend name; may be empty when unknown at the
    point of failure) and ``problem`` says what is wrong.
    """

    exit_code = 1

    def __init__(self, kind: str, name: str, problem: str) -> None:
        what = f"{kind} {name}" if name else kind
        super().__init__(f"{what} is corrupted: {problem}")
        self.kind = kind
        self.name = name
        self.problem = problem

    def naming(self, kind: str, name: str) -> CorruptedObject:
        """The same failure, re-labelled with a more specific object kind and name."""
        return type(self)(kind, name, self.problem)


class UnsupportedVersion(CorruptedObject):
    """An object declares a format version this cairn cannot read.

    A subclass of ``CorruptedObject`` on purpose: to a reader that does not know the
    version, the object is unreadable either way (and a flipped version byte looks
    exactly like this), so ``check`` reports both the same way.
    """

    def __init__(self, kind: str, name: str, problem: str) -> None:
        super().__init__(kind, name, problem)
        what = f"{kind} {name}" if name else kind
        self.args = (f"{what}: {problem} (written by a newer cairn? upgrade cairn)",)


class LockFailed(RepoError):
    """The repository is locked by someone else."""

    exit_code = 11

    def __init__(self, holder: str, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"repository is already locked by {holder}{extra}; "
            "if that process is gone, run `cairn unlock`"
        )
        self.holder = holder


class ObjectNotFound(RepoError):
    """No object matches an ID or ID prefix the user gave."""

    exit_code = 1


class AmbiguousId(RepoError):
    """An ID prefix matches more than one object."""

    exit_code = 1


class KeyRefused(RepoError):
    """A key-management request would lock the user out (last key, key in use)."""

    exit_code = 1
