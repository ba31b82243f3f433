#!/usr/bin/env bash
# Install everything the tests need (system packages, servers, Python deps) and run
# the whole suite: ruff, mypy, then pytest. This is the README's test command and
# what CI runs (.ci/run). Works from nothing on Debian 12 as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && [ -f scripts/install-test-deps.sh ]; then
    bash scripts/install-test-deps.sh
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check cairn tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
