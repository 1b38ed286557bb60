#!/usr/bin/env bash
# Builds SPDK v26.05's NVMe-oF target with the vfio-user transport (nvmf_tgt) from the upstream
# repository, for CI runners that have no ../shared/peers (hosted runners): the same release
# and configuration as ../shared/peers/build-spdk (its submodules at the commits v26.05 pins:
# SPDK's DPDK, isa-l, isa-l-crypto, libvfio-user). Prints the SPDK folder, for
# $VFIO_USER_SPDK. Installs the build dependencies with apt-get. Takes 10-15 minutes.
#
# usage: scripts/spdk-upstream.sh [OUT]   (default OUT: <tmpdir>/spdk-upstream)
set -euo pipefail
out=${1:-${TMPDIR:-/tmp}/spdk-upstream}
src="$out/spdk"
if [ -x "$src/build/bin/nvmf_tgt" ] && [ -f "$src/.built" ]; then
  echo "$src"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update >&2
$sudo apt-get install -y --no-install-recommends git ca-certificates gcc make nasm meson ninja-build pkg-config \
  autoconf automake libtool python3 python3-jinja2 python3-tabulate python3-pyelftools libaio-dev libnuma-dev \
  uuid-dev libssl-dev libncurses-dev libjson-c-dev libcmocka-dev >&2
rm -rf "$src"
mkdir -p "$out"
git clone --quiet --depth 1 --branch v26.05 --recurse-submodules --shallow-submodules \
  https://github.com/spdk/spdk.git "$src" >&2
cd "$src"
export PATH="/usr/bin:$PATH"
./configure --with-vfio-user --disable-tests --disable-unit-tests --disable-examples --without-fsdev \
  --without-crypto --without-xnvme --without-ocf --without-vhost --without-virtio --without-rdma \
  --without-iscsi-initiator --without-fio --without-nvme-cuse >&2
make -j"$(nproc)" >&2
touch "$src/.built"
echo "$src"
