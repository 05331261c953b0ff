"""Local Docker sshd servers for tests, demos and notebooks.

A :class:`Fleet` starts containers from the images that ``sshd-fixtures/build_images.py``
builds, one sshd per container, port 22 published on 127.0.0.1 only. Each fleet generates a
fresh ed25519 client key and one host key per container, so its ``known_hosts`` file pins
every server before the first connection: strict host-key checking, no trust on first use.

.. code-block:: python

    with Fleet.up(amd64=2, arm64=1) as fleet:
        executor = Executor(inventory=fleet.inventory)
        fleet.exec("amd64-1", "ps -ef")

``Fleet.up(..., behind_bastion=True)`` puts the servers on an internal Docker network of the
fleet's own (no route out, no published port) and publishes one bastion, the only way in: the
servers' inventory entries say ``jump: bastion``, as a real fleet behind a bastion would.

The images are not part of the package and are never pulled from a registry: ``make fixtures``
in a cronium_nb checkout builds them into this machine's Docker daemon, and an installed
cronium_nb (the wheel, with the ``fleet`` extra for the docker SDK) uses them from there.
The docker SDK is imported when a fleet starts, not with this module.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import platform
import shutil
import socket
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from cronium_nb.errors import CroniumError
from cronium_nb.inventory import Inventory
from cronium_nb.model import Server
from cronium_nb.ssh.deploy import MACHINE_ARCH
from cronium_nb.store import current_owner, owner_alive

if TYPE_CHECKING:
    import docker

IMAGE_REPOSITORY = "cronium-sshd"
ARCHES = ("amd64", "arm64", "riscv64")
VARIANTS = ("full", "bare")
# riscv64 (Debian trixie, emulated) comes in the bare variant only: enough to show a third
# architecture end to end, at a fraction of the build time.
IMAGES = tuple((arch, variant) for arch in ARCHES for variant in VARIANTS if arch != "riscv64" or variant == "bare")
# Users created in every image (name -> uid); the fleet's key is authorized for root and these.
FIXTURE_USERS = {"cronium": 1000, "intruder": 1001, "operator": 1002}
# sudo in the full images (runs with become=True): cronium may sudo without a password,
# operator with FIXTURE_SUDO_PASSWORD, intruder not at all. intruder has the same password, so
# that sudo gets past asking for it and says why it refuses ("... is not in the sudoers file").
# Password logins over SSH stay off (sshd_config.conf): the password is good for sudo only.
FIXTURE_SUDOERS = "cronium ALL=(ALL:ALL) NOPASSWD: ALL\noperator ALL=(ALL:ALL) ALL\n"
FIXTURE_SUDO_PASSWORD = "fixture-sudo-pw-7c41e9"
FIXTURE_PASSWORD_USERS = ("operator", "intruder")
FLEET_LABEL = "cronium.fleet"
OWNER_LABEL = "cronium.fleet.owner"  # the starting process, as cronium_nb.store.current_owner() names it
WORKDIR_OWNER_FILE = "owner"  # in a fleet's temporary folder: the process that started it
NETWORK_LABEL = "cronium.fleet.network"  # the fleet's networks: "internal" or "edge"
HOST_KEY_PATH = "etc/ssh/ssh_host_ed25519_key"
BASTION = "bastion"  # the bastion's server name (after the fleet's name prefix)
# The bastion forwards TCP whatever the servers' sshd options say (OpenSSH's default is yes too).
BASTION_SSHD_OPTIONS = {"AllowTcpForwarding": "yes"}
# The sshd of an emulated server (qemu-user: arm64 and riscv64 on an amd64 machine) neither
# re-executes itself for each connection (-r) nor uses PAM. Under emulation every new process
# translates its code afresh, and these two made an arm64 server spend 786 ms of CPU per new SSH
# connection against 297 ms without them: most of the test suite's server CPU. A native server
# keeps Debian's defaults (the benchmarks' servers are native).
EMULATED_SSHD_ARGS = ("-r", "-o", "UsePAM=no")
HOST_ARCH = MACHINE_ARCH.get(platform.machine(), platform.machine())
READY_TIMEOUT_S = 120.0  # emulated arm64 sshd can take several seconds to answer
BUILD_HINT = (
    "the fleet's sshd images are built on this machine, not downloaded: in a cronium_nb checkout "
    "run `make fixtures` (sshd-fixtures/build_images.py; Docker, qemu-user binfmt for arm64 and "
    "riscv64, mmdebstrap)"
)


def image_tag(arch: str, variant: str) -> str:
    """The moving tag of a fixture image; the build script also adds a recipe-hash tag."""
    return f"{IMAGE_REPOSITORY}:{arch}-{variant}"


class FleetError(CroniumError, RuntimeError):
    """The fleet could not be started or driven."""


def _docker_client() -> docker.DockerClient:
    """A client of the local Docker daemon, or a FleetError that says what is missing."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise FleetError("a fleet needs the docker SDK: pip install 'cronium-nb[fleet]'") from None
    try:
        return docker.from_env()
    except DockerException as error:
        raise FleetError(f"cannot reach the Docker daemon: {error}") from None


@dataclass(frozen=True)
class ExecResult:
    """What ``docker exec`` of a command in a fleet container gave."""

    exit_code: int
    output: str


@dataclass(frozen=True)
class FleetMember:
    server: Server
    arch: str
    variant: str
    container_id: str
    behind_bastion: bool = False  # on the fleet's internal network only, reached through the bastion


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tar(files: Sequence[tuple[str, bytes | None, int, int]]) -> bytes:
    """A tar of (path, content or None for a directory, mode, uid) entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, content, mode, uid in files:
            info = tarfile.TarInfo(path)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, int(time.time())
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class Fleet:
    """Running sshd containers and the files (keys, known_hosts) that reach them.

    Create one with :meth:`up`; remove it with :meth:`down` (or use it as a context manager).
    """

    def __init__(self, client: docker.DockerClient, fleet_id: str, workdir: Path) -> None:
        self._client = client
        self.fleet_id = fleet_id
        self.workdir = workdir
        self.key_path = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self._members: dict[str, FleetMember] = {}
        self.network: str | None = None  # behind_bastion: the internal network's name
        self.bastion: str | None = None  # behind_bastion: the bastion's server name

    # -- start and stop

    @classmethod
    def up(
        cls,
        amd64: int = 1,
        arm64: int = 1,
        variant: str = "full",
        *,
        riscv64: int = 0,
        user: str = "root",
        sshd_options: Mapping[str, str] | None = None,
        tmpfs: Mapping[str, str] | None = None,
        name_prefix: str = "",
        ready_timeout: float = READY_TIMEOUT_S,
        behind_bastion: bool = False,
    ) -> Fleet:
        """Start ``amd64`` + ``arm64`` (+ ``riscv64``, bare only) servers of one image variant and
        wait until sshd answers.

        Servers are named ``<prefix><arch>-<n>``. ``sshd_options`` are passed to sshd as
        ``-o KEY=VALUE`` (e.g. ``{"AllowTcpForwarding": "no"}``). ``tmpfs`` mounts small
        filesystems (path -> options, e.g. ``{"/root/.cache": "size=1m"}``) to fill disks in tests.
        An emulated server's sshd also gets ``EMULATED_SSHD_ARGS`` (no re-exec, no PAM), after
        ``sshd_options``, which therefore win.

        ``behind_bastion``: the servers go on an internal network the fleet creates
        (``cronium-<id>-internal``: no route out, no published port; each server answers there
        to its own name) and one more container, ``<prefix>bastion`` (amd64, the same variant,
        sshd forwarding TCP), is the only one published on 127.0.0.1. It sits on that network
        and on a second network of the fleet's (``cronium-<id>-edge``, a plain bridge that
        carries the published port). The inventory lists the bastion and gives every server
        ``host: <its name>``, port 22 and ``jump: <prefix>bastion``; ``known_hosts`` pins the
        servers' keys under those names. ``names``/``servers`` and the groups ``fleet`` and
        ``<arch>`` leave the bastion out.
        """
        if variant not in VARIANTS:
            raise ValueError(f"unknown fleet variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if user != "root" and user not in FIXTURE_USERS:
            raise ValueError(f"unknown fleet user {user!r}; expected root or one of {', '.join(FIXTURE_USERS)}")
        counts = {"amd64": amd64, "arm64": arm64, "riscv64": riscv64}
        if any(not isinstance(n, int) or n < 0 for n in counts.values()) or not sum(counts.values()):
            raise ValueError(f"server counts must be non-negative integers, not all zero: {counts}")
        for arch, count in counts.items():
            if count and (arch, variant) not in IMAGES:
                raise ValueError(f"there is no {variant} image for {arch}; images: {IMAGES}")
        client = _docker_client()
        import docker.errors

        missing = []
        needed = [arch for arch, count in counts.items() if count]
        if behind_bastion and "amd64" not in needed:
            needed.append("amd64")  # the bastion's image
        for arch in needed:
            try:
                client.images.get(image_tag(arch, variant))
            except docker.errors.ImageNotFound:
                missing.append(image_tag(arch, variant))
        if missing:
            raise FleetError(f"missing from the Docker daemon: image {', '.join(missing)}; {BUILD_HINT}")
        fleet_id = uuid.uuid4().hex[:8]
        workdir = Path(tempfile.mkdtemp(prefix=f"cronium-fleet-{fleet_id}-"))
        # Before any container exists: cleanup_stale() in another process must not take the
        # folder of a fleet that is still starting for one that was left behind.
        (workdir / WORKDIR_OWNER_FILE).write_text(current_owner())
        fleet = cls(client, fleet_id, workdir)
        try:
            fleet._start(
                counts,
                variant,
                user,
                dict(sshd_options or {}),
                dict(tmpfs or {}),
                name_prefix,
                ready_timeout,
                behind_bastion,
            )
        except BaseException:
            fleet.down()
            raise
        atexit.register(fleet.down)  # a process that ends normally (a kernel shut down) cleans up
        return fleet

    def _start(
        self,
        counts: Mapping[str, int],
        variant: str,
        user: str,
        sshd_options: dict[str, str],
        tmpfs: dict[str, str],
        prefix: str,
        ready_timeout: float,
        behind_bastion: bool = False,
    ) -> None:
        client_key = asyncssh.generate_private_key("ssh-ed25519", comment=f"cronium-fleet-{self.fleet_id}")
        client_key.write_private_key(str(self.key_path))
        os.chmod(self.key_path, 0o600)
        authorized = client_key.export_public_key("openssh")
        home_files = [("root/.ssh", None, 0o700, 0), ("root/.ssh/authorized_keys", authorized, 0o600, 0)]
        for fixture_user, uid in FIXTURE_USERS.items():
            home = f"home/{fixture_user}/.ssh"
            home_files += [(home, None, 0o700, uid), (f"{home}/authorized_keys", authorized, 0o600, uid)]

        def sshd_args(options: Mapping[str, str]) -> list[str]:
            return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]

        def files_for(name: str) -> tuple[bytes, str]:
            """The container's files (host key, authorized keys) and its host key's public half."""
            host_key = asyncssh.generate_private_key("ssh-ed25519", comment=name)
            files = _tar(
                [
                    (HOST_KEY_PATH, host_key.export_private_key("openssh"), 0o600, 0),
                    (HOST_KEY_PATH + ".pub", host_key.export_public_key("openssh"), 0o644, 0),
                    *home_files,
                ]
            )
            kind, blob = host_key.export_public_key("openssh").decode().split()[:2]
            return files, f"{kind} {blob}"

        known_hosts_lines = []

        def add_member(
            name: str, arch: str, container_id: str, public: str, host: str, port: int, jump: str | None = None
        ) -> None:
            """A started container as a fleet member, its host key pinned as the client will see it."""
            server = Server(
                name=name,
                host=host,
                port=port,
                user=user,
                key_path=str(self.key_path),
                known_hosts=str(self.known_hosts),
                jump=jump,
            )
            self._members[name] = FleetMember(server, arch, variant, container_id, behind_bastion=jump is not None)
            known_hosts_lines.append(f"{host if port == 22 else f'[{host}]:{port}'} {public}\n")

        bastion: str | None = None
        if behind_bastion:
            self.network, edge = self._create_networks()
            bastion = self.bastion = f"{prefix}{BASTION}"
            files, public = files_for(bastion)
            container, port = self._start_container(
                bastion, "amd64", variant, sshd_args({**sshd_options, **BASTION_SSHD_OPTIONS}), files, {}, network=edge
            )
            assert port is not None
            add_member(bastion, "amd64", container.id, public, "127.0.0.1", port)
        for arch, count in counts.items():
            for index in range(1, count + 1):
                name = f"{prefix}{arch}-{index}"
                files, public = files_for(name)
                # the caller's options first: sshd takes the first value given for an option
                command = [*sshd_args(sshd_options), *(EMULATED_SSHD_ARGS if arch != HOST_ARCH else ())]
                container, port = self._start_container(
                    name, arch, variant, command, files, tmpfs, internal=self.network
                )
                if port is None:  # behind the bastion: its name on the internal network, port 22
                    add_member(name, arch, container.id, public, name, 22, jump=bastion)
                else:
                    add_member(name, arch, container.id, public, "127.0.0.1", port)
        self.known_hosts.write_text("".join(known_hosts_lines))
        with ThreadPoolExecutor(max_workers=max(1, len(self._members))) as pool:
            list(pool.map(lambda name: self.wait_ready(name, ready_timeout), self._members))

    def _create_networks(self) -> tuple[str, str]:
        """The fleet's internal network (no route out) and the bastion's edge network (a plain
        bridge, for its published port); both carry the fleet's labels and go with it."""
        import docker.errors

        labels = {FLEET_LABEL: self.fleet_id, OWNER_LABEL: current_owner()}
        names = []
        for role, internal in (("internal", True), ("edge", False)):
            name = f"cronium-{self.fleet_id}-{role}"
            try:
                labels[NETWORK_LABEL] = role
                self._client.networks.create(name, driver="bridge", internal=internal, labels=dict(labels))
            except docker.errors.APIError as error:
                raise FleetError(f"cannot create the fleet's {role} network: {error.explanation}") from error
            names.append(name)
        return names[0], names[1]

    def _start_container(
        self,
        name: str,
        arch: str,
        variant: str,
        command: list[str],
        files: bytes,
        tmpfs: dict[str, str],
        *,
        network: str | None = None,
        internal: str | None = None,
    ):
        """Create the container, copy ``files`` (a tar) into it, start it; returns it and its
        port on 127.0.0.1. With ``internal`` (a network name) it goes on that network only,
        answering to ``name`` there, and publishes nothing (port None). With ``network`` it is
        published from that network; the fleet's internal network, if any, is added too (the
        bastion)."""
        import docker.errors

        labels = {FLEET_LABEL: self.fleet_id, OWNER_LABEL: current_owner(), "cronium.fleet.server": name}
        placement: dict[str, Any] = {}
        if internal is not None:
            endpoint = self._client.api.create_endpoint_config(aliases=[name])
            placement = {"network": internal, "networking_config": {internal: endpoint}}
        elif network is not None:
            placement = {"network": network}
        for _attempt in range(10):
            port = None if internal is not None else _free_loopback_port()
            try:
                container = self._client.containers.create(
                    image_tag(arch, variant),
                    command=command,
                    name=f"cronium-{self.fleet_id}-{name}",
                    hostname=name,
                    labels=labels,
                    ports={"22/tcp": ("127.0.0.1", port)} if port is not None else {},
                    tmpfs=tmpfs,
                    detach=True,
                    **placement,
                )
                container.put_archive("/", files)
                if network is not None and self.network is not None:
                    self._client.networks.get(self.network).connect(container, aliases=[name])
            except docker.errors.APIError as error:
                raise FleetError(f"cannot create container for {name}: {error.explanation}") from error
            try:
                container.start()
            except docker.errors.APIError as error:
                container.remove(force=True)
                # The port was free when probed, but another process may have taken it since.
                if port is not None and ("already allocated" in str(error) or "address already in use" in str(error)):
                    continue
                raise FleetError(f"cannot start container for {name}: {error.explanation}") from error
            return container, port
        raise FleetError(f"no free loopback port for {name} after 10 attempts")

    def down(self) -> None:
        """Remove every container of the fleet, its networks and its key files. Safe to call twice."""
        atexit.unregister(self.down)
        for container in self._client.containers.list(all=True, filters={"label": f"{FLEET_LABEL}={self.fleet_id}"}):
            container.remove(force=True, v=True)
        for network in self._client.networks.list(filters={"label": f"{FLEET_LABEL}={self.fleet_id}"}):
            network.remove()
        self._members.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    @staticmethod
    def cleanup_stale(client: docker.DockerClient | None = None) -> int:
        """Remove fleet containers (and then the fleets' networks and temporary folders) whose
        starting process is gone; returns how many containers."""
        import docker.errors

        client = client or _docker_client()
        removed = 0
        for container in client.containers.list(all=True, filters={"label": FLEET_LABEL}):
            if owner_alive(container.labels.get(OWNER_LABEL, "")):
                continue
            container.remove(force=True, v=True)
            removed += 1
        for network in client.networks.list(filters={"label": FLEET_LABEL}):
            if owner_alive(network.attrs.get("Labels", {}).get(OWNER_LABEL, "")):
                continue
            with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile by its own fleet
                network.remove()
        for leftover in Path(tempfile.gettempdir()).glob("cronium-fleet-*"):
            with contextlib.suppress(OSError):  # no owner file: an older version's, or removed meanwhile
                if owner_alive((leftover / WORKDIR_OWNER_FILE).read_text()):
                    continue
            fleet_id = leftover.name.split("-")[2]
            if not client.containers.list(all=True, filters={"label": f"{FLEET_LABEL}={fleet_id}"}):
                shutil.rmtree(leftover, ignore_errors=True)
        return removed

    # -- what is running

    @property
    def inventory(self) -> Inventory:
        """The fleet's servers, with groups ``amd64``, ``arm64`` and ``fleet``; the bastion
        (behind_bastion) is listed too, in no group."""
        groups: dict[str, list[str]] = {}
        for name in self.names:
            groups.setdefault(self._members[name].arch, []).append(name)
        groups["fleet"] = self.names
        return Inventory([m.server for m in self._members.values()], groups)

    @property
    def servers(self) -> list[Server]:
        """The servers, the bastion left out."""
        return [self._members[name].server for name in self.names]

    @property
    def names(self) -> list[str]:
        """The servers' names, the bastion left out."""
        return [name for name in self._members if name != self.bastion]

    def member(self, name: str) -> FleetMember:
        try:
            return self._members[name]
        except KeyError:
            raise KeyError(f"no fleet server {name!r}; fleet has {', '.join(self._members)}") from None

    def container(self, name: str):
        """The docker SDK container of a server."""
        return self._client.containers.get(self.member(name).container_id)

    def internal_address(self, name: str) -> str:
        """A server's (or the bastion's) IP address on the fleet's internal network (a fleet
        behind a bastion): where the servers see the bastion's connections come from."""
        if self.network is None:
            raise FleetError("this fleet has no internal network (Fleet.up(behind_bastion=True) makes one)")
        networks = self.container(name).attrs["NetworkSettings"]["Networks"]
        if self.network not in networks or not networks[self.network].get("IPAddress"):
            raise FleetError(f"{name} has no address on {self.network} (is it running?)")
        return str(networks[self.network]["IPAddress"])

    # -- driving servers (for tests)

    def exec(self, name: str, cmd: str | Sequence[str], *, user: str = "root") -> ExecResult:
        """Run ``cmd`` in the container with ``docker exec`` (a string goes through ``sh -c``)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        exit_code, output = self.container(name).exec_run(argv, user=user)
        return ExecResult(exit_code, output.decode("utf-8", errors="replace"))

    def pause(self, name: str, attempts: int = 5) -> None:
        """Freeze every process of the server (``docker pause``). runc can fail to freeze a
        container whose processes fork at that moment ("unable to freeze", seen under load with
        emulated servers): it is asked again, up to ``attempts`` times."""
        import docker.errors

        for attempt in range(1, attempts + 1):
            try:
                self.container(name).pause()
                return
            except docker.errors.APIError as error:
                if "unable to freeze" not in str(error) or attempt == attempts:
                    raise

    def unpause(self, name: str) -> None:
        self.container(name).unpause()

    def kill_sshd(self, name: str) -> None:
        """SIGKILL every sshd process (listener and sessions); the container stays up."""
        result = self.exec(name, "pkill -KILL -x sshd")
        if result.exit_code not in (0, 1):  # 1: nothing matched
            raise FleetError(f"pkill sshd failed on {name}: {result.output}")

    def restart(self, name: str, *, ready_timeout: float = READY_TIMEOUT_S) -> None:
        """Restart the container (same port, same host key, same files) and wait for sshd."""
        self.container(name).restart(timeout=1)
        self.wait_ready(name, ready_timeout)

    def stop(self, name: str) -> None:
        """Stop the container (``docker stop``): its published port is closed, connections to it
        are refused; :meth:`start` brings it back with the same port, host key and files."""
        self.container(name).stop(timeout=1)

    def start(self, name: str, *, ready_timeout: float = READY_TIMEOUT_S) -> None:
        """Start a stopped container again and wait for sshd."""
        self.container(name).start()
        self.wait_ready(name, ready_timeout)

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll until the server's sshd sends its SSH banner; raise FleetError after ``timeout``.
        A server behind the bastion is polled from the bastion, over the internal network."""
        member = self.member(name)
        if member.behind_bastion:
            self._poll_banner(name, timeout, self._banner_behind, f"behind {self.bastion}")
        else:
            self._poll_banner(name, timeout, self._banner_published, f"on port {member.server.port}")

    def _poll_banner(self, name: str, timeout: float, banner: Callable[[str, float], str], where: str) -> None:
        """Call ``banner(name, seconds left)`` (the first bytes sshd sent, or why there were none)
        until it gives ``SSH-``; a container that exited meanwhile fails at once, with its logs."""
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            answer = banner(name, deadline - time.monotonic())
            if answer.startswith("SSH-"):
                return
            last_error = answer
            container = self.container(name)
            if container.status == "exited":
                logs = container.logs(tail=20).decode(errors="replace")
                raise FleetError(f"{name}: container exited before sshd was ready:\n{logs}")
            time.sleep(0.1)
        raise FleetError(f"{name}: sshd {where} not ready after {timeout:.0f} s ({last_error})")

    def _banner_published(self, name: str, left: float) -> str:
        server = self.member(name).server
        try:
            with socket.create_connection((server.host, server.port or 22), timeout=2) as sock:
                sock.settimeout(max(0.5, min(10.0, left)))
                return "SSH-" if sock.recv(4).startswith(b"SSH-") else "no SSH banner"
        except OSError as error:
            return str(error)

    def _banner_behind(self, name: str, left: float) -> str:
        """From the bastion (``docker exec``: bash's /dev/tcp, on the internal network, by the
        server's name)."""
        import docker.errors

        assert self.bastion is not None
        probe = 'exec 3<>"/dev/tcp/$1/22" && head -c 4 <&3'
        try:
            result = self.exec(self.bastion, ["timeout", "5", "bash", "-c", probe, "probe", name])
        except docker.errors.APIError as error:  # the bastion not running (yet)
            return str(error)
        return (
            result.output if result.output.startswith("SSH-") else result.output.strip() or f"exit {result.exit_code}"
        )
