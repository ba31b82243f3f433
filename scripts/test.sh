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
    # Debian's own python3 ships venv separately.
    if ! python3 -c "import ensurepip, venv" 2>/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv
    fi
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check cairn tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
