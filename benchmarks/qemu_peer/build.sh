#!/bin/bash
# Build QEMU's vfio-user *server* (x-remote machine + x-vfio-user-server object)
# from Debian bookworm's qemu 7.2 source package, which still bundles
# libvfio-user under subprojects/.  Debian's binary packages are built without it.
#
# Result: benchmarks/.cache/qemu-peer/qemu-system-x86_64 (git-ignored).
# Idempotent: re-running with the binary present does nothing.
# CPU-heavy (15-25 min on 2 cores): run it niced in the background, e.g.
#   nohup nice -n 19 benchmarks/qemu_peer/build.sh > benchmarks/.cache/qemu-build.log 2>&1 &
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${QEMU_PEER_CACHE:-$HERE/../.cache/qemu-peer}"
JOBS="${JOBS:-2}"
OUT="$CACHE/qemu-system-x86_64"

if [ -x "$OUT" ] && [ -e "$CACHE/lib/libvfio-user.so.0" ]; then
    echo "already built: $OUT"
    exit 0
fi
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"

# apt-get source needs deb-src lines; add them for bookworm if missing.
if ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/vnvmed-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq

# A minimal set of build deps (build-dep qemu pulls in ~1 GB of optional libs).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    dpkg-dev build-essential ninja-build meson pkg-config python3 python3-venv \
    libglib2.0-dev libpixman-1-dev zlib1g-dev libjson-c-dev libcmocka-dev \
    libfdt-dev flex bison

cd "$CACHE"
if [ ! -d src ]; then
    rm -rf qemu-* qemu_*
    apt-get source -qq qemu
    mv "$(find . -maxdepth 1 -type d -name 'qemu-*' | head -n1)" src
fi
ls src/subprojects/libvfio-user/meson.build >/dev/null  # bundled library must be there

mkdir -p build
cd build
if [ ! -f build.ninja ]; then
    ../src/configure \
        --target-list=x86_64-softmmu \
        --enable-vfio-user-server --enable-multiprocess \
        --disable-werror --disable-docs --disable-user --disable-tools \
        --disable-gtk --disable-sdl --disable-vnc --disable-spice --disable-opengl \
        --disable-curses --disable-xen --disable-capstone --disable-slirp \
        --disable-guest-agent --disable-libusb --disable-usb-redir \
        --disable-virglrenderer --disable-gnutls --disable-nettle --disable-gcrypt \
        --disable-linux-io-uring --disable-libssh --disable-curl --disable-rbd \
        --disable-glusterfs --disable-libiscsi --disable-libnfs --disable-seccomp \
        --disable-tpm --disable-debug-info
fi
nice -n 19 ninja -j"$JOBS" qemu-system-x86_64
cp qemu-system-x86_64 "$OUT"
# libvfio-user is built as a shared subproject: keep it beside the binary
# (compare.py runs the peer with LD_LIBRARY_PATH=<dir of the binary>/lib).
mkdir -p "$CACHE/lib"
cp -L subprojects/libvfio-user/lib/libvfio-user.so.0 "$CACHE/lib/"
echo "built: $OUT"
