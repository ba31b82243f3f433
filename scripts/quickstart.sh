#!/usr/bin/env bash
# Install cairn into .venv and run its main job on a local repository:
# init, back up a sample directory, list snapshots, restore, compare.
# Usage: scripts/quickstart.sh [WORKDIR] [SOURCE_DIR]   (default source: a copy of cairn's sources)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    # Debian's own python3 ships venv separately.
    if ! python3 -c "import ensurepip, venv" 2>/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv
    fi
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e .

work="${1:-$(mktemp -d -t cairn-quickstart.XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
if [ -n "${2:-}" ]; then
    source_dir="$(cd "$2" && pwd)"
else
    # A sample that does not change while we run: cairn's sources and docs.
    source_dir="$work/sample"
    rm -rf "$source_dir" && mkdir -p "$source_dir"
    tar -cf - --exclude=__pycache__ cairn docs README.md | tar -xf - -C "$source_dir"
fi
export CAIRN_REPOSITORY="$work/repo"
export CAIRN_PASSWORD_FILE="$work/password"
[ -f "$CAIRN_PASSWORD_FILE" ] || head -c 24 /dev/urandom | base64 > "$CAIRN_PASSWORD_FILE"

cairn=.venv/bin/cairn
echo "== init $CAIRN_REPOSITORY"
[ -f "$CAIRN_REPOSITORY/config" ] || $cairn init
echo "== backup $source_dir"
$cairn backup "$source_dir"
echo "== snapshots"
$cairn snapshots
echo "== restore into $work/restore"
rm -rf "$work/restore"
$cairn restore latest --target "$work/restore"
echo "== compare"
diff -r --no-dereference "$source_dir" "$work/restore$source_dir" && echo "restored tree is identical to $source_dir"
echo "== check --read-data"
$cairn check --read-data


