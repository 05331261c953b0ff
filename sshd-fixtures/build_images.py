"""Build the sshd test images with no image registry: mmdebstrap rootfs -> ``docker import``.

Five images: {amd64, arm64} x {full, bare} from Debian bookworm, and riscv64 bare from Debian
trixie (riscv64 became an official architecture there; only its main suite is used, as the
updates and security indexes for riscv64 have been seen mid-sync). One mmdebstrap run per
architecture makes all of its images: the bare image's tree is saved first, then the full
image's packages are added to it, so the emulated package set-up that both share runs once.
Each image is tagged with a hash of its recipe (the architecture's mmdebstrap command, the
entrypoint, the sshd settings and the variant), plus a moving tag ``cronium-sshd:<arch>-<variant>``
that :class:`cronium_nb.Fleet` starts. An architecture whose images all exist under their recipe
hashes is not rebuilt.

Usage: python sshd-fixtures/build_images.py [--arch amd64,arm64] [--variant full,bare] [--check]
``--check`` exits 1 when some image would be built, and builds nothing. A build makes every image
of each architecture that has a wanted image missing (``--variant bare`` builds the full one too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
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
    HOST_ARCH,
    IMAGE_REPOSITORY,
    IMAGES,
    VARIANTS,
    image_tag,
)

HERE = Path(__file__).resolve().parent
RECIPE_FILES = ("entrypoint.sh", "sshd_config.conf")
SUITES = {"amd64": "bookworm", "arm64": "bookworm", "riscv64": "trixie"}
BASE_PACKAGES = ["openssh-server", "procps", "tini", "bash", "coreutils", "tar", "gzip"]
# What a suite needs beyond that, chosen for what it costs under emulation (every package's
# set-up runs through qemu for a foreign architecture):
SUITE_OPTIONS = {
    # merged /usr made by mmdebstrap's hook, not by the usrmerge package, whose conversion and
    # perl dependencies took about 15 s of an arm64 build
    "bookworm": ["--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"],
    # openssh-server wants systemd or a sysusers program: the standalone one, not all of systemd
    "trixie": ["--include=systemd-standalone-sysusers"],
}
FULL_PACKAGES = ["python3", "nodejs", "sudo"]  # added to the bare tree to make the full image
# The bare tree is saved from inside mmdebstrap's run, before its clean-up: these options leave
# out what that clean-up would remove, and put back the start-stop-daemon it set aside.
BARE_TAR_OPTIONS = [
    *(f"--exclude='{pattern}'" for pattern in [
        "./var/lib/apt/lists/*_*", "./var/cache/apt/*", "./etc/apt/apt.conf.d/00mmdebstrap", "./var/log/dpkg.log",
        "./var/log/apt/*", "./var/log/alternatives.log", "./var/cache/ldconfig/aux-cache", "./tmp/*",
        "./run/adduser", "./run/runit", "./usr/sbin/policy-rc.d", "./usr/sbin/start-stop-daemon",
    ]),
    r"--transform='s,^\./usr/sbin/start-stop-daemon\.REAL$,./usr/sbin/start-stop-daemon,'",
]  # fmt: skip
# apt as mmdebstrap's own hooks run it: this machine's apt with the tree's configuration,
# dpkg chrooted into the tree (tests/unit/test_tools.py holds every install hook to this form).
HOST_APT_IN_TREE = 'APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get -oDPkg::Chroot-Directory="$1"'
BARE_TAR = "@BARE_TAR@"  # in a recipe, where the bare tree's tar goes
# Debian ships a system group named "operator" (gid 37), so useradd cannot make that user a
# group of its own name: it gets the users group instead.
USERADD_OPTIONS = {"operator": "--no-user-group --gid users"}
ENTRYPOINT = "/usr/local/sbin/cronium-sshd-entrypoint"
BESIDE_THE_LONGEST_NICENESS = 10  # `nice` of the builds beside the longest one
IMAGE_SETTINGS = [f'ENTRYPOINT ["/usr/bin/tini", "--", "{ENTRYPOINT}"]']  # `docker import --change`


# Host program -> the Debian package that provides it. arch-test is only a recommended dependency
# of mmdebstrap, yet mmdebstrap needs it to build for a foreign architecture.
BUILD_PROGRAMS = {"docker": "docker.io", "mmdebstrap": "mmdebstrap"}
FOREIGN_BUILD_PROGRAMS = {"arch-test": "arch-test"}


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


def arch_variants(arch: str) -> list[str]:
    """The variants built for an architecture, bare first (the full image grows from it)."""
    return sorted((v for a, v in IMAGES if a == arch), key=lambda variant: variant != "bare")


def recipe_hash(arch: str, variant: str) -> str:
    """A hash of what defines an image: its architecture's mmdebstrap command (suite, packages,
    users, hooks), the variant, the image settings and the files installed, not this script's
    other code (editing it rebuilds nothing) nor where the checkout is."""
    command = [part.replace(str(HERE), "@FIXTURES@") for part in mmdebstrap_command(arch, Path("rootfs"), BARE_TAR)]
    digest = hashlib.sha256(json.dumps([command, variant, IMAGE_SETTINGS]).encode())
    for name in RECIPE_FILES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def hashed_tag(arch: str, variant: str, recipe: str | None = None) -> str:
    """The image's tag under its recipe hash (``recipe``: that hash, when already worked out)."""
    return f"{image_tag(arch, variant)}-{recipe or recipe_hash(arch, variant)}"


def image_exists(ref: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", ref], capture_output=True)
    return probe.returncode == 0


def mmdebstrap_command(arch: str, output: Path, bare_tar: str) -> list[str]:
    """The one mmdebstrap run of an architecture. With a full variant, ``output`` is the full
    image's tree and the bare tree is saved to ``bare_tar`` on the way; without, ``output`` is
    the bare tree."""
    hooks = [
        'rm -f "$1"/etc/ssh/ssh_host_*',
        f'install -m 0755 {shlex.quote(str(HERE / "entrypoint.sh"))} "$1"{ENTRYPOINT}',
        f'install -m 0644 {shlex.quote(str(HERE / "sshd_config.conf"))} "$1"/etc/ssh/sshd_config.d/cronium.conf',
        'chroot "$1" usermod -p "*" root',
        *(useradd_hook(user, uid) for user, uid in FIXTURE_USERS.items()),
        *(f'echo "{user}:{FIXTURE_SUDO_PASSWORD}" | chroot "$1" chpasswd' for user in FIXTURE_PASSWORD_USERS),
    ]
    if "full" in arch_variants(arch):
        options = " ".join(BARE_TAR_OPTIONS)
        hooks += [
            f'tar --create --one-file-system --numeric-owner {options} --file "{bare_tar}" --directory "$1" .',
            # apt on this machine (apt in the tree would parse its package lists under emulation),
            # dpkg in the tree: without Chroot-Directory dpkg would install on this machine.
            f"{HOST_APT_IN_TREE} install --yes --quiet --no-install-recommends {' '.join(FULL_PACKAGES)}",
            *sudoers_hooks(),
        ]
    hooks.append('rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*')
    # openssh-server's set-up makes the host keys that do not exist yet (an RSA key alone took
    # 13 s under emulation); the fleet brings its own, so empty stand-ins go first (removed above).
    placeholders = " ".join(f'"$1"/etc/ssh/ssh_host_{kind}_key' for kind in ("rsa", "ecdsa", "ed25519"))
    return [
        "mmdebstrap",
        "--quiet",
        # apt in the tree only where the full image's packages are added with it
        "--variant=apt" if "full" in arch_variants(arch) else "--variant=essential",
        *SUITE_OPTIONS[SUITES[arch]],
        f"--architectures={arch}",
        f"--include={','.join(BASE_PACKAGES)}",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        f'--essential-hook=mkdir -p "$1"/etc/ssh && touch {placeholders}',
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


def build(arch: str, niceness: int = 0) -> list[str]:
    """Build the images of one architecture unless all exist; one line per image. ``niceness``
    lowers the build's CPU priority (``nice``), so that a longer build beside it keeps a core."""
    recipes = {variant: recipe_hash(arch, variant) for variant in arch_variants(arch)}
    tags = {variant: hashed_tag(arch, variant, recipe) for variant, recipe in recipes.items()}
    if all(image_exists(hashed) for hashed in tags.values()):
        for variant, hashed in tags.items():
            subprocess.run(["docker", "tag", hashed, image_tag(arch, variant)], check=True)
        return [f"{hashed}: up to date" for hashed in tags.values()]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cronium-rootfs-") as tmp:
        trees = {variant: Path(tmp) / f"{variant}.tar" for variant in tags}
        output = trees.get("full", trees["bare"])
        command = ["nice", "-n", str(niceness), *mmdebstrap_command(arch, output, str(trees["bare"]))]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed for {arch}:\n{result.stderr[-4000:]}")
        for variant, hashed in tags.items():
            changes = [
                *IMAGE_SETTINGS,
                f"LABEL cronium.sshd.arch={arch} cronium.sshd.variant={variant} cronium.sshd.recipe={recipes[variant]}",
            ]
            change_args = [arg for change in changes for arg in ("--change", change)]
            tree = str(trees[variant])
            subprocess.run(["docker", "import", *change_args, tree, hashed], check=True, capture_output=True)
            subprocess.run(["docker", "tag", hashed, image_tag(arch, variant)], check=True)
    seconds = time.monotonic() - started
    return [f"{hashed}: built in {seconds:.0f} s" for hashed in tags.values()]


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
    stale = [(a, v) for a, v in wanted if not image_exists(hashed_tag(a, v))]
    if args.check:
        print("to build: " + ", ".join(f"{a}/{v}" for a, v in stale) if stale else "all images up to date")
        return 1 if stale else 0
    if stale:
        check_build_host({arch for arch, _ in stale})
    # Two architectures at a time (two cores), the longest first: emulated arm64 (~3.7 min),
    # riscv64 (~1.7 min), then the native one. arm64 is the critical path: it keeps one core,
    # the others (and `make test`'s runner build, also niced) share the other at a lower priority.
    arches = sorted({arch for arch, _ in wanted}, key=lambda arch: (arch == HOST_ARCH, arch == "riscv64"))
    niceness = [0] + [BESIDE_THE_LONGEST_NICENESS] * (len(arches) - 1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for lines in pool.map(build, arches, niceness):
            for line in lines:
                print(f"{IMAGE_REPOSITORY} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
