"""Fixtures for tests that run the real ``cairn`` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import Cairn


@pytest.fixture
def cairn(tmp_path: Path) -> Cairn:
    """A cairn command bound to an initialised local repository."""
    password = tmp_path / "password"
    password.write_text("correct horse battery staple\n")
    c = Cairn(tmp_path / "repo", password)
    c.run("init", check=True)
    return c
