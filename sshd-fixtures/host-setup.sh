#!/usr/bin/env bash
# Make this machine able to run the sshd test fleet: a Docker daemon that answers,
# arm64 and riscv64 emulation through qemu-user binfmt, mmdebstrap for the image builds, and Chromium for
# the browser test.
# Idempotent: every step checks first and does nothing when already done.
set -euo pipefail

say() { printf 'host-setup: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

apt_install() {
    can_install || die "missing $*; install it (Debian/Ubuntu: apt-get install $*) or run as root"
    say "installing $*"
    if [ ! -f /var/lib/apt/periodic/cronium-updated ]; then
        apt-get update -q >&2
        mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/cronium-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

ensure_docker() {
    if docker info >/dev/null 2>&1; then return; fi
    command -v dockerd >/dev/null || apt_install docker.io containerd runc tini
    command -v docker >/dev/null || apt_install docker.io
    [ "$(id -u)" = 0 ] || die "no Docker daemon answers and we are not root: start dockerd or add your user to the docker group"
    if ! pgrep -x dockerd >/dev/null; then
        say "starting dockerd (log: /var/log/dockerd.log)"
        nohup dockerd >/var/log/dockerd.log 2>&1 &
    fi
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    tail -20 /var/log/dockerd.log >&2 || true
    die "dockerd did not answer within 60 s"
}

# Emulation of a foreign architecture through qemu-user and binfmt_misc (flag F: the interpreter
# is opened at registration, so it works inside containers too; flag C: an emulated set-user-ID
# program gets its owner's rights, as natively, so that sudo works in the arm64 containers).
ensure_binfmt() {
    local qemu=$1 entry=/proc/sys/fs/binfmt_misc/$1
    if [ -e "$entry" ] && grep -q enabled "$entry" && grep -q '^flags: .*C' "$entry"; then return; fi
    [ -f "/usr/lib/binfmt.d/$qemu.conf" ] || apt_install qemu-user-static
    [ "$(id -u)" = 0 ] || die "$qemu emulation is not registered with flags F and C; as root: mount binfmt_misc and register $qemu"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    # Registered without C (Debian's file says OPF): register again with it (one write after the
    # other, so an exec of an emulated program in between is all that could miss it).
    local line
    line="$(sed 's/:\([A-Z]*\)$/:\1C/' "/usr/lib/binfmt.d/$qemu.conf")"
    if [ -e "$entry" ]; then
        echo -1 >"$entry"
    fi
    echo "$line" >/proc/sys/fs/binfmt_misc/register
    grep -q enabled "$entry" || die "$qemu binfmt entry is not enabled"
    say "$qemu emulation registered (flags $(sed -n 's/^flags: //p' "$entry"))"
}

# arch-test is only a *recommended* dependency of mmdebstrap, and --no-install-recommends leaves it
# out, yet mmdebstrap needs it for every foreign-architecture (arm64) build.
ensure_mmdebstrap() {
    command -v mmdebstrap >/dev/null || apt_install mmdebstrap
    command -v arch-test >/dev/null || apt_install arch-test
}

# The browser test drives Debian's Chromium with Playwright (browser downloads are impossible here).
ensure_chromium() {
    command -v chromium >/dev/null || apt_install chromium
}

# Every host program the builds and tests need, with the Debian package that provides it. Checked
# after the steps above, so a missing one stops here, by name, before any long build starts.
REQUIRED_PROGRAMS=(
    "docker:docker.io"
    "mmdebstrap:mmdebstrap"
    "arch-test:arch-test"
    "chromium:chromium"
)

verify_host() {
    local entry missing=()
    for entry in "${REQUIRED_PROGRAMS[@]}"; do
        command -v "${entry%%:*}" >/dev/null || missing+=("${entry#*:} (for ${entry%%:*})")
    done
    [ ${#missing[@]} = 0 ] || die "missing host packages: ${missing[*]}"
    local arch
    for arch in arm64 riscv64; do
        arch-test "$arch" >/dev/null 2>&1 || die "$arch binaries do not run on this host (arch-test $arch failed): check its qemu binfmt registration"
    done
}

ensure_docker
ensure_binfmt qemu-aarch64
ensure_binfmt qemu-riscv64
ensure_mmdebstrap
ensure_chromium
verify_host
