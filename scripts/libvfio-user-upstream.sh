#!/usr/bin/env bash
# Builds libvfio-user and its samples from the upstream repository, for CI runners that have no
# ../shared/peers (hosted runners): the same commit as the tarball there (efd091b, June 2026),
# with the same fix for its samples (upstream's #872, vendored beside this script: without it
# `server` refuses to start). Prints the folder of the sample binaries, for
# $VFIO_USER_LIBVFIO_SAMPLES. Installs the build dependencies with apt-get or apk.
#
# usage: scripts/libvfio-user-upstream.sh [OUT]   (default OUT: <tmpdir>/libvfio-user-upstream)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${TMPDIR:-/tmp}/libvfio-user-upstream}
commit=efd091b
src="$out/libvfio-user"
if [ -x "$src/build/samples/server" ]; then
  echo "$src/build/samples"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if command -v apk >/dev/null; then
  $sudo apk add --no-cache git gcc musl-dev meson ninja pkgconf json-c-dev cmocka-dev patch linux-headers >&2
elif command -v apt-get >/dev/null; then
  $sudo apt-get update >&2
  $sudo apt-get install -y --no-install-recommends git ca-certificates meson ninja-build gcc patch pkg-config \
    libjson-c-dev libcmocka-dev >&2
fi
rm -rf "$src"
mkdir -p "$out"
git clone --quiet https://github.com/nutanix/libvfio-user.git "$src" >&2
git -C "$src" checkout --quiet "$commit" >&2
patch -s -d "$src" -p1 < "$here/libvfio-user-samples-872.patch"
meson setup "$src/build" "$src" -Dbuildtype=release >&2
ninja -C "$src/build" >&2
echo "$src/build/samples"
