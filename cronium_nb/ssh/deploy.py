"""Runner deployment: find out what a host is, pick the right build, keep it cached there.

The runner is one static binary per Linux architecture (``runner/dist``, see
``runner/build/build_go.py``). Remote layout (all 0700, owned by the login user, never through a
symlink)::

    ~/.cache/cronium/                 also the parent of the runner's work dirs (runs/)
    ~/.cache/cronium/runner/<version>-<arch>-<sha16>/cronium-runner     + listing
    ~/.cache/cronium/runner/<version>-<arch>-<sha16>/daemon-<host>.sock the runner daemon

A deployment is verified on the server against the binary's SHA-256, which is written into the
probe and verify scripts themselves (nothing shipped with the binary vouches for it), and then
cheaply: a listing of the binary's size, mtime, ctime, inode and mode must match the one taken
when the hash last passed (else it is hashed again). It is remembered here, per server, runner
version and checksum, for 24 hours and for as long as the connection that verified it lasts; a
new connection (after a reconnect, a restarted server) verifies again, in the same round trip
that probes the host. A freshly uploaded binary must answer ``version`` before it is put in
place: a server where it cannot run (a noexec home, a kernel too old) fails with the reason. A
cold server costs two commands: the probe and the install, which also starts the runner daemon. A
run whose runner turns out to be missing or broken invalidates the entry, and the executor
deploys again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import json
import re
import secrets
import shlex
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from cronium_nb.errors import DeployError
from cronium_nb.ssh.pool import PooledConnection, ServerKey

CACHE_VALIDITY_S = 24 * 3600.0
DEFAULT_BACKOFF_S = (2.0, 4.0, 8.0)
# The runner's directory on a server, relative to the login user's home (runner/PROTOCOL.md; the
# runner's protocol.CacheDir): deployed builds and sockets under runner/, work dirs under runs/.
CACHE_DIR = ".cache/cronium"
RUNNER_DIR = f"{CACHE_DIR}/runner"
REMOTE_ROOT = f'"$HOME/{CACHE_DIR}"'  # expanded by the login shell; no user data goes in
# `uname -m` -> the Go architecture of the build that runs there
MACHINE_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "riscv64": "riscv64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# sockaddr_un holds 107 bytes of path (the daemon's temporary name is shorter than its socket's)
MAX_SOCKET_PATH = 100
BUILD_INFO = "runner.json"  # written by runner/build/build_go.py


@dataclass(frozen=True)
class HostInfo:
    machine: str
    home: str | None = None  # the login user's $HOME: where the runner daemon's socket is
    host: str | None = None  # its host name: homes shared between hosts (NFS) get one socket each

    @property
    def arch(self) -> str | None:
        return MACHINE_ARCH.get(self.machine)

    def facts(self) -> dict[str, Any]:
        return {"machine": self.machine, "home": self.home, "host": self.host}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> HostInfo:
        return cls(str(facts["machine"]), facts.get("home"), facts.get("host"))


@dataclass(frozen=True)
class RunnerBuild:
    """The runner binary for one architecture."""

    arch: str
    path: Path
    sha256: str
    version: str

    @property
    def remote_name(self) -> str:
        return f"{self.version}-{self.arch}-{self.sha256[:16]}"

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_ROOT}/runner/{self.remote_name}"

    def daemon_socket(self, home: str, host: str | None) -> str | None:
        """The runner daemon's socket, in this build's private directory, named after the host
        (two hosts sharing a home run a daemon each); None when the path is too long for a Unix
        socket or the host is unknown (the runner then starts per connection instead)."""
        if not host:
            return None
        tag = re.sub(r"[^A-Za-z0-9.-]", "_", host)[:32]
        path = f"{home.rstrip('/')}/{RUNNER_DIR}/{self.remote_name}/daemon-{tag}.sock"
        return path if len(path.encode()) <= MAX_SOCKET_PATH else None

    def invocation(self, args: Sequence[str]) -> str:
        """The shell command line that runs this runner with ``args`` (all quoted)."""
        return f"{self.remote_dir}/cronium-runner {' '.join(shlex.quote(a) for a in args)}"

    def command(self, args: Sequence[str]) -> str:
        """The shell command that becomes this runner with ``args`` (``exec``)."""
        return f"exec {self.invocation(args)}"

    def upload(self) -> bytes:
        """What goes on the wire: the binary, gzip-compressed (about 40% of its size); made once
        per build (compressing takes ~100 ms of CPU, which a fan-out must not pay per server)."""
        return _compressed(self.path, self.sha256)


@functools.lru_cache(maxsize=8)
def _compressed(path: Path, sha256: str) -> bytes:
    """The build compressed, once its bytes are checked against ``sha256``: the server checks
    only gzip's CRC of what it unpacks, so the checksum that names the build is checked here."""
    binary = path.read_bytes()
    if hashlib.sha256(binary).hexdigest() != sha256:
        raise OSError(f"{path} changed since its checksum was taken (rebuild with `make runner`)")
    return gzip.compress(binary, compresslevel=6, mtime=0)


class RunnerBuilds:
    """The runner builds available to deploy (``make runner`` puts them in ``runner/dist``)."""

    def __init__(self, dist: Path) -> None:
        self.dist = dist
        info_file = dist / BUILD_INFO
        if not info_file.is_file():
            raise DeployError(f"no runner builds in {dist}: run `make runner`", retryable=False)
        info = json.loads(info_file.read_text())
        self.version = str(info["version"])
        self._builds: dict[str, RunnerBuild] = {}
        for arch, sha256 in info["binaries"].items():
            path = dist / f"cronium-runner-linux-{arch}"
            if not (SAFE_NAME.match(arch) and SHA256.match(sha256) and SAFE_NAME.match(self.version)):
                raise DeployError(f"unexpected runner build {arch} {sha256} {self.version}", retryable=False)
            if path.is_file():
                self._builds[arch] = RunnerBuild(arch, path, sha256, self.version)
        if not self._builds:
            raise DeployError(f"no runner binaries in {dist}: run `make runner`", retryable=False)

    @property
    def arches(self) -> list[str]:
        return sorted(self._builds)

    def probe_command(self) -> str:
        """The probe script, with every build's remote name and digest (checked by SAFE_NAME and
        SHA256 when the builds were read)."""
        pairs = " ".join(f"{b.remote_name}:{b.sha256}" for b in self._builds.values())
        return "sh -c " + shlex.quote(PROBE_SCRIPT.replace("@BUILDS@", pairs))

    def choose(self, info: HostInfo) -> RunnerBuild:
        """The binary for the host's architecture, or a clear error naming it."""
        if info.arch in self._builds:
            return self._builds[info.arch]
        raise DeployError(
            f"no runner for architecture {info.machine}: the runner is built for linux/{', linux/'.join(self.arches)}",
            retryable=False,
        )


# Fixed scripts: the only values put in are builds' remote names and SHA-256 digests, checked
# when the builds were read, and a random hex token. The runner dir's ``listing`` holds the
# binary's size, mtime, ctime, inode and mode as `find` printed them when its hash last passed:
# re-verifying compares a fresh listing with it and hashes again only when something changed.
# Each process a script starts costs the server about 1.5 ms of CPU, so they use shell builtins
# where one will do: the probe of a server with the runner in place runs `uname` and one `find`,
# which checks the three directories' modes and lists the binary (a cold deployment is bound by
# the servers' CPU: benchmarks/analysis.md).
_ROOT = f'root="$HOME/{CACHE_DIR}"\nrunner_root="$root/runner"\n'
_FUNCTIONS = """
check_private() {
  if [ -L "$1" ] || [ ! -d "$1" ] || [ ! -O "$1" ] || [ "$(stat -c %a "$1")" != 700 ]; then
    echo "unsafe directory $1: it must be a real directory owned by $(id -un) with mode 700" >&2
    return 3
  fi
}
listing_format='%s %T@ %C@ %i %m\\n'
listing() { find "$1/cronium-runner" -maxdepth 0 -printf "$listing_format"; }
hash_ok() { set -- "$(sha256sum < "$1/cronium-runner")" "$2"; [ "${1%% *}" = "$2" ]; }
verify() {
  dir="$runner_root/$1"
  [ -e "$dir" ] || [ -L "$dir" ] || return 4
  for d in "$root" "$runner_root" "$dir"; do
    [ ! -L "$d" ] && [ -d "$d" ] && [ -O "$d" ] || { check_private "$d"; return 3; }
  done
  # One find: "unsafe" for a directory whose mode is not 700, and the binary's listing.
  seen=$(find "$root" "$runner_root" "$dir" "$dir/cronium-runner" -maxdepth 0 \\( -type d ! -perm 700 \\
    -printf 'unsafe\\n' \\) -o \\( -type f -printf "$listing_format" \\) 2>/dev/null)
  case "$seen" in *unsafe*)
    for d in "$root" "$runner_root" "$dir"; do check_private "$d" || return 3; done
    return 3 ;;
  esac
  saved=""
  [ -f "$dir/listing" ] && read -r saved < "$dir/listing"
  [ -n "$saved" ] && [ "$seen" = "$saved" ] && return 0
  hash_ok "$dir" "$2" || return 5
  printf '%s\\n' "$seen" > "$dir/listing"
}
"""
# One round trip per new connection: the machine, home and host name, and whether each
# candidate build is in place (a code per build: 0 good, 3 unsafe, 4 missing, 5 damaged).
PROBE_SCRIPT = (
    "set -u\n" + _ROOT + _FUNCTIONS + 'echo "machine $(uname -m)"\necho "home $HOME"\n'
    # the node name `uname -n` gives, read without a process
    '{ read -r host < /proc/sys/kernel/hostname; } 2>/dev/null || host=$(uname -n)\necho "host $host"\n'
    'for build in @BUILDS@; do verify "${build%%:*}" "${build#*:}"; echo "build ${build%%:*} $?"; done\n'
)
VERIFY_SCRIPT = "set -u\n" + _ROOT + _FUNCTIONS + 'verify "@NAME@" "@SHA256@"\n'
INSTALL_SCRIPT = (
    "set -u\numask 077\n" + _ROOT + _FUNCTIONS + 'dir="$runner_root/@NAME@"\ntmp="$runner_root/.partial-@TOKEN@"\n'
    "trap 'rm -rf \"$tmp\"' EXIT\n"
    '[ -d "${root%/*}" ] || mkdir -p "${root%/*}" || exit 6\n'
    # What is missing is made by one mkdir, just now, by us, 0700 (or it fails); the upload's
    # directory is named by a random token (runner_root is private: no one else makes names there).
    'if [ -e "$root" ] || [ -L "$root" ]; then\n'
    '  check_private "$root" || exit 3\n'
    '  if [ -e "$runner_root" ] || [ -L "$runner_root" ]; then\n'
    '    check_private "$runner_root" || exit 3\n'
    '    for p in "$runner_root"/.partial-*; do\n'
    '      [ -e "$p" ] && find "$runner_root" -maxdepth 1 -name ".partial-*" -mmin +10 -exec rm -rf {} + 2>/dev/null\n'
    "      break\n"
    "    done\n"
    '    mkdir -m 700 "$tmp" || exit 6\n'
    '  else mkdir -m 700 "$runner_root" "$tmp" || exit 6; fi\n'
    'else mkdir -m 700 "$root" "$runner_root" "$tmp" || exit 6; fi\n'
    # gzip checks the CRC-32 and length of what it wrote: the binary is the one that was sent
    # (whose SHA-256 the orchestrator checked when it compressed it), without a second read.
    'if ! out=$(gzip -dc 2>&1 > "$tmp/cronium-runner"); then\n'
    '  echo "the upload did not arrive intact:$(printf %s "$out" | tr -s "\\n" " ")" >&2; exit 5\n'
    "fi\n"
    'chmod 700 "$tmp/cronium-runner" || exit 6\n'
    'if ! out=$("$tmp/cronium-runner" version 2>&1); then\n'
    '  echo "the runner cannot run on this server ($(uname -m), kernel $(uname -r)): $out" >&2; exit 7\n'
    "fi\n"
    'listing "$tmp" > "$tmp/listing" || exit 6\n'
    'if [ -e "$dir" ] || [ -L "$dir" ]; then rm -rf "$dir" || exit 6; fi\n'
    'mv "$tmp" "$dir" || exit 6\n'
    # Another install made $dir between the rm and the mv (two processes deploying at once):
    # theirs stays, ours landed inside it.
    'if [ -e "$dir/${tmp##*/}" ]; then rm -rf "$dir/${tmp##*/}"; fi\n'
    "trap - EXIT\n"
    "@THEN@"
)
VERIFY_MISSING, UNSAFE, MISMATCH, WRITE_FAILED, CANNOT_RUN = 4, 3, 5, 6, 7


def remote_script(template: str, build: RunnerBuild, *, then: str = "") -> str:
    """``template`` for ``build``, as one quoted ``sh -c`` command; ``then`` (a command line whose
    values are quoted already) runs at its end, in place of ``@THEN@``."""
    if not SAFE_NAME.match(build.remote_name) or not SHA256.match(build.sha256):
        raise DeployError(f"unexpected runner build {build.remote_name!r}", retryable=False)
    script = template.replace("@NAME@", build.remote_name).replace("@SHA256@", build.sha256)
    script = script.replace("@TOKEN@", secrets.token_hex(8))
    return "sh -c " + shlex.quote(script.replace("@THEN@", then))


@dataclass
class DeployOutcome:
    build: RunnerBuild
    state: str  # "cached" (known good here), "verified" (found intact on the server), "deployed"
    attempts: int
    bytes_sent: int = 0


@dataclass
class _Probe:
    """What one connection's probe found: the host, and each candidate build's state there
    (0: in place and verified; used once, then stale)."""

    info: HostInfo
    builds: dict[str, int]


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
        self._probes: weakref.WeakKeyDictionary[PooledConnection, _Probe] = weakref.WeakKeyDictionary()

    def known(self, pooled: PooledConnection) -> HostInfo | None:
        """What the host is, if this connection has learnt it already."""
        probe = self._probes.get(pooled)
        return probe.info if probe is not None else None

    def vouched(self, pooled: PooledConnection, info: HostInfo, build: RunnerBuild) -> None:
        """The runner daemon of ``build`` answered on ``pooled``: it vouches for the host's facts
        and for its deployment (so ``ensure`` says "verified" without a round trip)."""
        self._probes[pooled] = _Probe(info, {build.remote_name: 0})

    async def host_info(self, pooled: PooledConnection) -> HostInfo:
        """What the host is; learnt once per connection (by the probe script, run here unless a
        caller ran it already: see :meth:`probed`), with the state of every candidate build."""
        probe = self._probes.get(pooled)
        if probe is None:
            self.probed(pooled, await pooled.connection.run(self.builds.probe_command(), check=False))
            probe = self._probes[pooled]
        return probe.info

    def probed(self, pooled: PooledConnection, result: asyncssh.SSHCompletedProcess) -> None:
        """Take the outcome of :meth:`RunnerBuilds.probe_command` run on ``pooled``."""
        lines = str(result.stdout).splitlines()
        home = next((line[len("home ") :] for line in lines if line.startswith("home /")), None)
        fields = [line.split() for line in lines if line.strip()]
        values = {words[0]: words[1:] for words in fields if words[0] in ("machine", "host")}
        if result.exit_status != 0 or not values.get("machine"):
            raise DeployError(f"cannot probe the host: {str(result.stderr).strip() or result.exit_status}")
        host = values["host"][0] if values.get("host") else None
        # The builds' states are good until used once: the first ensure() on this connection needs
        # no round trip.
        builds = {words[1]: int(words[2]) for words in fields if words[0] == "build"}
        self._probes[pooled] = _Probe(HostInfo(machine=values["machine"][0], home=home, host=host), builds)

    def _still_valid(self, cache_key: tuple[ServerKey, str, str], pooled: PooledConnection) -> bool:
        verified_at, connection = self._verified.get(cache_key, (-1e18, 0))
        return connection == pooled.serial and time.monotonic() - verified_at < self.validity_s

    def invalidate(self, key: ServerKey, build: RunnerBuild) -> None:
        self._verified.pop((key, build.version, build.sha256), None)

    async def ensure(
        self,
        pooled: PooledConnection,
        *,
        force: bool = False,
        on_attempt_failed: Callable[[int, str], Awaitable[None] | None] | None = None,
        daemon_args: Callable[[RunnerBuild], Sequence[str] | None] | None = None,
    ) -> DeployOutcome:
        """Make sure the right runner is on the server; deploy with retries when it is not.

        ``daemon_args(build)``, when it gives arguments, starts the runner daemon with them at the
        end of an install, in the same round trip (best effort: a daemon that does not start
        is started, or done without, when the first session opens)."""
        build = self.builds.choose(await self.host_info(pooled))
        cache_key = (pooled.key, build.version, build.sha256)
        if not force and self._still_valid(cache_key, pooled):
            return DeployOutcome(build, "cached", 0)
        lock = self._locks.setdefault(pooled.key, asyncio.Lock())
        waited = lock.locked()
        async with lock:  # one upload per server; the others wait and then find it verified
            if not force and self._still_valid(cache_key, pooled):
                return DeployOutcome(build, "cached", 0)
            probe = self._probes.get(pooled)
            probed = probe.builds.pop(build.remote_name, None) if probe is not None else None
            # The probe's "missing" is taken as it is unless we waited for another deployment here
            # (if another process deployed since, the install replaces it, or keeps it if it won a race).
            if not force and not (probed == VERIFY_MISSING and not waited):
                # Its "good" is final; anything else is checked again: a bad one may be stale by
                # now, and an unsafe one needs the script's message.
                status = (0, "") if probed == 0 else await self._run_script(pooled, remote_script(VERIFY_SCRIPT, build))
                if status[0] == 0:
                    self._verified[cache_key] = (time.monotonic(), pooled.serial)
                    return DeployOutcome(build, "verified", 0)
                if status[0] == UNSAFE:
                    raise DeployError(status[1], retryable=False)
            try:
                data = build.upload()
            except OSError as error:  # the build here, not the server
                raise DeployError(f"cannot read the runner build {build.path}: {error}", retryable=False) from None
            args = daemon_args(build) if daemon_args is not None else None
            start_daemon = f"{build.invocation(args)} >/dev/null 2>&1 || true\n" if args else ""
            for attempt in range(1, self.attempts + 1):
                install = remote_script(INSTALL_SCRIPT, build, then=start_daemon)  # a new token each time
                code, message = await self._run_script(pooled, install, data)
                if code == 0:
                    self._verified[cache_key] = (time.monotonic(), pooled.serial)
                    return DeployOutcome(build, "deployed", attempt, len(data))
                if code in (UNSAFE, CANNOT_RUN):
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
        stderr = result.stderr or b""  # bytes: the process was made with encoding=None
        message = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr).strip()
        return result.exit_status if result.exit_status is not None else -1, message
