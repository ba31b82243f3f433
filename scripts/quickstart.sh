#!/usr/bin/env bash
# Install cairn into .venv and run its main job on a local repository:
# init, back up a sample directory, list snapshots, restore, compare.
# Usage: scripts/quickstart.sh [WORKDIR] [SOURCE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e .

work="${1:-$(mktemp -d -t cairn-quickstart.XXXXXX)}"
source_dir="${2:-$PWD/cairn}"
mkdir -p "$work"
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
diff -r "$source_dir" "$work/restore$source_dir" && echo "restored tree is identical to $source_dir"


