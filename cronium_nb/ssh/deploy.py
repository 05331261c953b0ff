"""Runner deployment: find out what a host is, pick the right build, keep it cached there.

Remote layout (all 0700, owned by the login user, never through a symlink)::

    ~/.cache/cronium/                 also the parent of the runner's work dirs (runs/)
    ~/.cache/cronium/runner/<version>-<flavour>-<arch>-<sha>/cronium-runner/...  + SHA256SUMS

A deployment is verified on the server with ``sha256sum -c`` when installed, and then cheaply:
a listing of its files' names, sizes, mtimes and inodes must match the one taken when the hashes
last passed (else they are checked again). It is remembered here, per server, runner version and
checksum, for 24 hours and for as long as the connection that verified it lasts; a new
connection — after a reconnect, a restarted server — verifies again, in the same round trip that
probes the host. Within that, a run goes straight to the runner. A run
whose runner turns out to be missing or broken invalidates the entry, and the executor deploys
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from cronium_nb.ssh.pool import PooledConnection, ServerKey
from cronium_runner import __version__ as RUNNER_VERSION

CACHE_VALIDITY_S = 24 * 3600.0
DEFAULT_BACKOFF_S = (2.0, 4.0, 8.0)
REMOTE_ROOT = '"$HOME/.cache/cronium"'  # expanded by the login shell; no user data goes in
MACHINE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
ZIPAPP_MIN_PYTHON = (3, 8)
MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes


class DeployError(Exception):
    """The runner could not be deployed (after retries, or for a reason retrying cannot fix)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class HostInfo:
    machine: str
    python: tuple[int, int] | None  # None: none, or not asked (a bundle fits the machine)
    home: str | None = None  # the login user's $HOME: where the runner daemon's socket is

    @property
    def arch(self) -> str | None:
        return MACHINE_ARCH.get(self.machine)

    def facts(self) -> dict[str, Any]:
        return {"machine": self.machine, "python": list(self.python) if self.python else None, "home": self.home}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> HostInfo:
        python = facts.get("python")
        return cls(str(facts["machine"]), (int(python[0]), int(python[1])) if python else None, facts.get("home"))


@dataclass(frozen=True)
class RunnerBuild:
    """One deployable runner archive from ``runner/dist``."""

    flavour: str  # "bundle" or "zipapp"
    arch: str  # "amd64", "arm64" or "any"
    path: Path
    sha256: str

    @property
    def remote_name(self) -> str:
        return f"{RUNNER_VERSION}-{self.flavour}-{self.arch}-{self.sha256[:16]}"

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_ROOT}/runner/{self.remote_name}/cronium-runner"

    def daemon_socket(self, home: str) -> str | None:
        """The runner daemon's socket, in this build's private directory; None when the path is
        too long for a Unix socket (the runner then starts per connection instead)."""
        path = f"{home.rstrip('/')}/.cache/cronium/runner/{self.remote_name}/daemon.sock"
        return path if len(path.encode()) <= MAX_SOCKET_PATH else None

    def command(self, args: Sequence[str]) -> str:
        """The shell command that starts this runner with ``args`` (all quoted)."""
        quoted = " ".join(shlex.quote(a) for a in args)
        if self.flavour == "bundle":
            return f"exec {self.remote_dir}/cronium-runner {quoted}"
        return f"exec python3 {self.remote_dir}/cronium-runner.pyz {quoted}"


class RunnerBuilds:
    """The runner builds available to deploy (``make runner`` puts them in ``runner/dist``)."""

    def __init__(self, dist: Path) -> None:
        self.dist = dist
        self._builds: dict[tuple[str, str], RunnerBuild] = {}
        candidates = [("bundle", arch, f"cronium-runner-linux-{arch}.tar.gz") for arch in ("amd64", "arm64")]
        candidates.append(("zipapp", "any", "cronium-runner-zipapp.tar.gz"))
        for flavour, arch, name in candidates:
            path = dist / name
            sums = dist / f"{name}.sha256"
            if path.is_file() and sums.is_file():
                self._builds[(flavour, arch)] = RunnerBuild(flavour, arch, path, sums.read_text().split()[0])
        if not self._builds:
            raise DeployError(f"no runner builds in {dist}: run `make runner`", retryable=False)

    def probe_command(self) -> str:
        """The probe script, with every build's remote name (all checked by SAFE_NAME)."""
        names = [build.remote_name for build in self._builds.values()]
        if not all(SAFE_NAME.match(name) for name in names):
            raise DeployError(f"unexpected runner build names {names!r}", retryable=False)
        machines = [m for (flavour, arch) in self._builds if flavour == "bundle" for m in BUNDLE_MACHINES[arch]]
        script = PROBE_SCRIPT.replace("@NAMES@", " ".join(names)).replace("@BUNDLE_MACHINES@", " ".join(machines))
        return "sh -c " + shlex.quote(script)

    def choose(self, info: HostInfo) -> RunnerBuild:
        """The standalone bundle for amd64/arm64, else the zipapp where python3 >= 3.8 exists."""
        if info.arch and ("bundle", info.arch) in self._builds:
            return self._builds[("bundle", info.arch)]
        if info.python and info.python >= ZIPAPP_MIN_PYTHON and ("zipapp", "any") in self._builds:
            return self._builds[("zipapp", "any")]
        python = f"python3 {info.python[0]}.{info.python[1]}" if info.python else "no python3"
        raise DeployError(
            f"no runner for architecture {info.machine} ({python}): standalone bundles exist for "
            f"amd64 and arm64; elsewhere the zipapp needs python3 >= 3.8",
            retryable=False,
        )


# Fixed scripts: the only values put in are builds' remote names, checked by SAFE_NAME, and
# fixed machine names. The runner dir's ``listing`` holds the name, size, mtime and inode of
# every file, as `find` printed them when `sha256sum -c` last passed: re-verifying compares a
# fresh listing with it (one `find`, no hashing of the 15 MB bundle), and hashes again only
# when something changed.
_FUNCTIONS = """
check_private() {
  if [ -L "$1" ] || [ ! -d "$1" ] || [ ! -O "$1" ] || [ "$(stat -c %a "$1")" != 700 ]; then
    echo "unsafe directory $1: it must be a real directory owned by $(id -un) with mode 700" >&2
    return 3
  fi
}
listing() { (cd "$1/cronium-runner" && find . -printf '%p %s %T@ %i\\n'); }
verify() {
  dir="$HOME/.cache/cronium/runner/$1"
  [ -e "$dir" ] || [ -L "$dir" ] || return 4
  check_private "$dir" || return 3
  listing "$dir" | cmp -s - "$dir/listing" && return 0
  (cd "$dir/cronium-runner" && sha256sum -c --quiet --strict SHA256SUMS >/dev/null 2>&1) || return 5
  listing "$dir" > "$dir/listing"
}
"""
# One round trip per new connection: the machine, python3's version where no bundle fits it,
# and whether each candidate build is in place (a code per build: 0 good, 3 unsafe, 4 missing,
# 5 damaged).
PROBE_SCRIPT = (
    "set -u\n" + _FUNCTIONS + 'machine=$(uname -m)\necho "machine $machine"\necho "home $HOME"\n'
    'case " @BUNDLE_MACHINES@ " in *" $machine "*) ;; *)\n'
    '  python3 -c \'import sys; print("python %d.%d" % sys.version_info[:2])\' 2>/dev/null || echo "python none";;\n'
    "esac\n"
    'root="$HOME/.cache/cronium"\n'
    'if [ -e "$root/runner" ] || [ -L "$root/runner" ]; then\n'
    '  for d in "$root" "$root/runner"; do check_private "$d" || { echo "unsafe"; exit 0; }; done\n'
    "fi\n"
    'for name in @NAMES@; do verify "$name"; echo "build $name $?"; done\n'
)
VERIFY_SCRIPT = (
    "set -u\n" + _FUNCTIONS + 'root="$HOME/.cache/cronium"\n'
    '[ -e "$root/runner/@NAME@" ] || [ -L "$root/runner/@NAME@" ] || exit 4\n'
    'for d in "$root" "$root/runner"; do check_private "$d" || exit 3; done\n'
    'verify "@NAME@"\n'
)
INSTALL_SCRIPT = (
    "set -u\numask 077\n" + _FUNCTIONS + 'root="$HOME/.cache/cronium"\nrunner_root="$root/runner"\n'
    'dir="$runner_root/@NAME@"\n'
    'mkdir -p "$HOME/.cache" || exit 6\n'
    'for d in "$root" "$runner_root"; do\n'
    '  [ -e "$d" ] || [ -L "$d" ] || mkdir -m 700 "$d" || exit 6\n'
    '  check_private "$d" || exit 3\n'
    "done\n"
    'find "$runner_root" -maxdepth 1 -name ".partial-*" -mmin +10 -exec rm -rf {} + 2>/dev/null\n'
    'tmp=$(mktemp -d "$runner_root/.partial-XXXXXX") || exit 6\n'
    "trap 'rm -rf \"$tmp\"' EXIT\n"
    'tar xzf - -C "$tmp" || exit 6\n'
    '(cd "$tmp/cronium-runner" && sha256sum -c --quiet --strict SHA256SUMS >/dev/null) || exit 5\n'
    'listing "$tmp" > "$tmp/listing" || exit 6\n'
    'rm -rf "$dir" && mv "$tmp" "$dir" || exit 6\n'
    "trap - EXIT\n"
)
VERIFY_MISSING, UNSAFE, MISMATCH, WRITE_FAILED = 4, 3, 5, 6
BUNDLE_MACHINES = {"amd64": ("x86_64", "amd64"), "arm64": ("aarch64", "arm64")}


def remote_script(template: str, build: RunnerBuild) -> str:
    if not SAFE_NAME.match(build.remote_name):
        raise DeployError(f"unexpected runner build name {build.remote_name!r}", retryable=False)
    return "sh -c " + shlex.quote(template.replace("@NAME@", build.remote_name))


@dataclass
class DeployOutcome:
    build: RunnerBuild
    state: str  # "cached" (known good here), "verified" (found intact on the server), "deployed"
    attempts: int
    bytes_sent: int = 0


class Deployer:
    """Deploys runner builds and remembers good deployments."""

    def __init__(
        self,
        builds: RunnerBuilds,
        *,
        backoff: Sequence[float] = DEFAULT_BACKOFF_S,
        attempts: int = 3,
        validity_s: float = CACHE_VALIDITY_S,
    ) -> None:
        if attempts < 1:
            raise ValueError("deploy attempts must be at least 1")
        self.builds = builds
        self.backoff = tuple(backoff)
        self.attempts = attempts
        self.validity_s = validity_s
        # (server, runner version, checksum) -> (when verified, the connection it was verified on)
        self._verified: dict[tuple[ServerKey, str, str], tuple[float, int]] = {}
        self._locks: dict[ServerKey, asyncio.Lock] = {}

    async def host_info(self, pooled: PooledConnection) -> HostInfo:
        """What the host is; learnt once per connection, with the state of every candidate build."""
        if pooled.info is None:
            result = await pooled.connection.run(self.builds.probe_command(), check=False)
            lines = str(result.stdout).splitlines()
            home = next((line[len("home ") :] for line in lines if line.startswith("home /")), None)
            fields = [line.split() for line in lines if line.strip()]
            values = {words[0]: words[1:] for words in fields if words[0] in ("machine", "python")}
            if result.exit_status != 0 or not values.get("machine"):
                raise DeployError(f"cannot probe the host: {str(result.stderr).strip() or result.exit_status}")
            if ["unsafe"] in fields:
                raise DeployError(str(result.stderr).strip(), retryable=False)
            python = None
            if values.get("python", ["none"])[0] != "none":
                major, minor = values["python"][0].split(".")[:2]
                python = (int(major), int(minor))
            pooled.info = HostInfo(machine=values["machine"][0], python=python, home=home)
            # Good until used once: the first ensure() on this connection needs no round trip.
            pooled.probed_builds = {words[1]: int(words[2]) for words in fields if words[0] == "build"}
        return pooled.info

    def _still_valid(self, cache_key: tuple[ServerKey, str, str], pooled: PooledConnection) -> bool:
        verified_at, connection = self._verified.get(cache_key, (-1e18, 0))
        return connection == pooled.serial and time.monotonic() - verified_at < self.validity_s

    def invalidate(self, key: ServerKey, build: RunnerBuild) -> None:
        self._verified.pop((key, RUNNER_VERSION, build.sha256), None)

    async def ensure(
        self,
        pooled: PooledConnection,
        *,
        force: bool = False,
        on_attempt_failed: Callable[[int, str], Awaitable[None] | None] | None = None,
    ) -> DeployOutcome:
        """Make sure the right runner is on the server; deploy with retries when it is not."""
        build = self.builds.choose(await self.host_info(pooled))
        cache_key = (pooled.key, RUNNER_VERSION, build.sha256)
        if not force and self._still_valid(cache_key, pooled):
            return DeployOutcome(build, "cached", 0)
        lock = self._locks.setdefault(pooled.key, asyncio.Lock())
        async with lock:  # one upload per server; the others wait and then find it verified
            if not force and self._still_valid(cache_key, pooled):
                return DeployOutcome(build, "cached", 0)
            if not force:
                # The probe's word is final only when good: a bad one may be stale by now (another
                # connection may have deployed while we waited for the lock), and an unsafe one
                # needs the script's message.
                if pooled.probed_builds.pop(build.remote_name, None) == 0:
                    status = (0, "")
                else:
                    status = await self._run_script(pooled, remote_script(VERIFY_SCRIPT, build))
                if status[0] == 0:
                    self._verified[cache_key] = (time.monotonic(), pooled.serial)
                    return DeployOutcome(build, "verified", 0)
                if status[0] == UNSAFE:
                    raise DeployError(status[1], retryable=False)
            data = build.path.read_bytes()
            for attempt in range(1, self.attempts + 1):
                code, message = await self._run_script(pooled, remote_script(INSTALL_SCRIPT, build), data)
                if code == 0:
                    self._verified[cache_key] = (time.monotonic(), pooled.serial)
                    return DeployOutcome(build, "deployed", attempt, len(data))
                if code == UNSAFE:
                    raise DeployError(message, retryable=False)
                reason = message or ("checksum mismatch after upload" if code == MISMATCH else f"exit {code}")
                if on_attempt_failed is not None:
                    maybe = on_attempt_failed(attempt, reason)
                    if maybe is not None:
                        await maybe
                if attempt == self.attempts:
                    raise DeployError(f"deploying the runner failed {attempt} times; last: {reason}")
                await asyncio.sleep(self.backoff[min(attempt - 1, len(self.backoff) - 1)])
        raise AssertionError("unreachable")

    @staticmethod
    async def _run_script(pooled: PooledConnection, command: str, stdin: bytes | None = None) -> tuple[int, str]:
        """Exit status and stderr of a remote script; the script may exit before reading stdin."""
        try:
            process = await pooled.connection.create_process(command, encoding=None)
            if stdin:
                with contextlib.suppress(asyncssh.Error, OSError):
                    process.stdin.write(stdin)
                    process.stdin.write_eof()
            else:
                process.stdin.write_eof()
            result = await process.wait(check=False)
        except asyncssh.Error as error:
            return -1, f"connection failed: {error.reason}"
        message = result.stderr.decode(errors="replace").strip() if result.stderr else ""
        return result.exit_status if result.exit_status is not None else -1, message
