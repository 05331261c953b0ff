"""Build the sshd test images with no image registry: mmdebstrap rootfs -> ``docker import``.

Five images: {amd64, arm64} x {full, bare} from Debian bookworm, and riscv64 bare from Debian
trixie (riscv64 became an official architecture there; only its main suite is used, as the
updates and security indexes for riscv64 have been seen mid-sync). Each is tagged with a hash of its recipe (this
file, the entrypoint, the sshd settings, the architecture and the variant), plus a moving tag
``cronium-sshd:<arch>-<variant>`` that :class:`cronium_nb.Fleet` starts. An image whose recipe
hash already exists is not rebuilt.

Usage: python sshd-fixtures/build_images.py [--arch amd64,arm64] [--variant full,bare] [--check]
``--check`` exits 1 when some image would be built, and builds nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cronium_nb.fleet import (
    ARCHES,
    FIXTURE_PASSWORD_USERS,
    FIXTURE_SUDO_PASSWORD,
    FIXTURE_SUDOERS,
    FIXTURE_USERS,
    IMAGE_REPOSITORY,
    IMAGES,
    VARIANTS,
    image_tag,
)
from cronium_nb.ssh.deploy import MACHINE_ARCH

HERE = Path(__file__).resolve().parent
RECIPE_FILES = ("entrypoint.sh", "sshd_config.conf")
SUITES = {"amd64": "bookworm", "arm64": "bookworm", "riscv64": "trixie"}
BASE_PACKAGES = ["openssh-server", "procps", "tini", "bash", "coreutils", "tar", "gzip"]
PACKAGES = {"bare": BASE_PACKAGES, "full": [*BASE_PACKAGES, "python3", "nodejs", "sudo"]}
# Debian ships a system group named "operator" (gid 37), so useradd cannot make that user a
# group of its own name: it gets the users group instead.
USERADD_OPTIONS = {"operator": "--no-user-group --gid users"}
ENTRYPOINT = "/usr/local/sbin/cronium-sshd-entrypoint"
IMAGE_SETTINGS = [f'ENTRYPOINT ["/usr/bin/tini", "--", "{ENTRYPOINT}"]']  # `docker import --change`


# Host program -> the Debian package that provides it. arch-test is only a recommended dependency
# of mmdebstrap, yet mmdebstrap needs it to build for a foreign architecture.
BUILD_PROGRAMS = {"docker": "docker.io", "mmdebstrap": "mmdebstrap"}
FOREIGN_BUILD_PROGRAMS = {"arch-test": "arch-test"}
HOST_ARCH = MACHINE_ARCH.get(platform.machine(), platform.machine())


def check_build_host(arches: set[str]) -> None:
    """Fail at once, naming the missing Debian packages, when a build could not finish."""
    needed = dict(BUILD_PROGRAMS)
    if arches - {HOST_ARCH}:
        needed.update(FOREIGN_BUILD_PROGRAMS)
    missing = sorted({package for program, package in needed.items() if shutil.which(program) is None})
    if missing:
        raise SystemExit(
            f"cannot build the sshd images: missing host packages {', '.join(missing)} "
            f"(apt-get install {' '.join(missing)}, or run sshd-fixtures/host-setup.sh as root)"
        )


def recipe_hash(arch: str, variant: str) -> str:
    """A hash of what defines an image: the mmdebstrap command (suite, packages, users, hooks),
    the image settings and the files installed, not this script's other code (editing it
    rebuilds nothing) nor where the checkout is."""
    command = [part.replace(str(HERE), "@FIXTURES@") for part in mmdebstrap_command(arch, variant, Path("rootfs"))]
    digest = hashlib.sha256(json.dumps([command, IMAGE_SETTINGS]).encode())
    for name in RECIPE_FILES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def image_exists(ref: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", ref], capture_output=True)
    return probe.returncode == 0


def mmdebstrap_command(arch: str, variant: str, output: Path) -> list[str]:
    hooks = [
        'rm -f "$1"/etc/ssh/ssh_host_*',
        f'install -m 0755 {HERE / "entrypoint.sh"} "$1"{ENTRYPOINT}',
        f'install -m 0644 {HERE / "sshd_config.conf"} "$1"/etc/ssh/sshd_config.d/cronium.conf',
        'chroot "$1" usermod -p "*" root',
        *(useradd_hook(user, uid) for user, uid in FIXTURE_USERS.items()),
        *(f'echo "{user}:{FIXTURE_SUDO_PASSWORD}" | chroot "$1" chpasswd' for user in FIXTURE_PASSWORD_USERS),
        *(sudoers_hooks() if "sudo" in PACKAGES[variant] else []),
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    return [
        "mmdebstrap",
        "--quiet",
        "--variant=apt",
        f"--architectures={arch}",
        f"--include={','.join(PACKAGES[variant])}",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        *(f"--customize-hook={hook}" for hook in hooks),
        SUITES[arch],
        str(output),
        *([f"deb {debian_mirror()} {SUITES[arch]} main"] if SUITES[arch] != "bookworm" else []),
    ]


def useradd_hook(user: str, uid: int) -> str:
    options = f"{USERADD_OPTIONS[user]} " if user in USERADD_OPTIONS else ""
    return f'chroot "$1" useradd -m -s /bin/bash -p "*" -u {uid} {options}{user}'


def sudoers_hooks() -> list[str]:
    """Write the fleet's sudo rules (cronium_nb.fleet.FIXTURE_SUDOERS) to /etc/sudoers.d and
    have visudo check them, so a typo fails the build instead of every sudo."""
    rules = FIXTURE_SUDOERS.replace("\n", "\\n")
    return [
        f'printf "{rules}" > "$1"/etc/sudoers.d/cronium-fleet',
        'chmod 0440 "$1"/etc/sudoers.d/cronium-fleet',
        'chroot "$1" visudo -c -q',
    ]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (for a suite other than its own: mmdebstrap
    takes the machine's sources for its own suite, and a sources line for another)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["deb"] and "security" not in line:
                    return next(word for word in words[1:] if "://" in word)
    raise SystemExit("cannot find a Debian mirror in /etc/apt: needed to build the riscv64 (trixie) image")


def build(arch: str, variant: str) -> str:
    tag = image_tag(arch, variant)
    hashed = f"{tag}-{recipe_hash(arch, variant)}"
    if image_exists(hashed):
        subprocess.run(["docker", "tag", hashed, tag], check=True)
        return f"{hashed}: up to date"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cronium-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        result = subprocess.run(mmdebstrap_command(arch, variant, rootfs), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed for {arch}/{variant}:\n{result.stderr[-4000:]}")
        changes = [
            *IMAGE_SETTINGS,
            f"LABEL cronium.sshd.arch={arch} cronium.sshd.variant={variant}"
            f" cronium.sshd.recipe={recipe_hash(arch, variant)}",
        ]
        change_args = [arg for change in changes for arg in ("--change", change)]
        subprocess.run(["docker", "import", *change_args, str(rootfs), hashed], check=True, capture_output=True)
    subprocess.run(["docker", "tag", hashed, tag], check=True)
    return f"{hashed}: built in {time.monotonic() - started:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHES))
    parser.add_argument("--variant", default=",".join(VARIANTS))
    parser.add_argument("--check", action="store_true", help="only report whether a build is needed")
    args = parser.parse_args(argv)
    wanted = [(a, v) for a in args.arch.split(",") for v in args.variant.split(",") if (a, v) in IMAGES]
    for arch in args.arch.split(","):
        if arch not in ARCHES:
            parser.error(f"unknown architecture {arch}; known: {', '.join(ARCHES)}")
    for variant in args.variant.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant}; known: {', '.join(VARIANTS)}")
    stale = [(a, v) for a, v in wanted if not image_exists(f"{image_tag(a, v)}-{recipe_hash(a, v)}")]
    if args.check:
        print("to build: " + ", ".join(f"{a}/{v}" for a, v in stale) if stale else "all images up to date")
        return 1 if stale else 0
    if stale:
        check_build_host({arch for arch, _ in stale})
    # Two builds at a time (two cores), the longest first: emulated arm64 full (~5 min), arm64
    # bare, riscv64, then the native ones (~1 min each), so that no long build starts last.
    longest_first = sorted(wanted, key=lambda av: (av[0] == HOST_ARCH, av[0] == "riscv64", av[1] == "bare"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for line in pool.map(lambda av: build(*av), longest_first):
            print(f"{IMAGE_REPOSITORY} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
