"""The peer tools, driven the way their users drive them, on the same fleet.

Each driver runs one command on a list of servers and checks that every server answered with
exit status 0 and the expected output: a benchmark that times a failure measures nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from cronium_nb import Server

ANSIBLE = str(Path(sys.executable).parent / "ansible")  # installed beside this Python by `.[bench]`


class PeerFailed(RuntimeError):
    """A peer tool did not get the expected answer from every server."""


def _check(tool: str, answers: dict[str, tuple[int | None, str]], expect: str) -> None:
    bad = {host: answer for host, answer in answers.items() if answer[0] != 0 or expect not in answer[1]}
    if bad:
        raise PeerFailed(f"{tool}: {len(bad)} server(s) did not answer as expected: {list(bad.items())[:2]}")


def tool_versions() -> dict[str, str]:
    return {
        "parallel-ssh": version("parallel-ssh"),
        "ssh2-python": version("ssh2-python"),
        "fabric": version("fabric"),
        "paramiko": version("paramiko"),
        "ansible-core": version("ansible-core"),
        "asyncssh": version("asyncssh"),
        "OpenSSH client (Ansible)": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
    }


class ParallelSsh:
    """parallel-ssh's ParallelSSHClient (libssh2). ``new_client`` makes every call connect anew."""

    name = "parallel-ssh"

    def __init__(self, servers: Sequence[Server]) -> None:
        from pssh.clients import ParallelSSHClient
        from pssh.config import HostConfig

        self._make = lambda: ParallelSSHClient(
            [s.host for s in servers],
            host_config=[HostConfig(port=s.port, user=s.user, private_key=s.key_path) for s in servers],
            pool_size=max(10, len(servers)),
        )
        self._client = None

    def run(self, command: str, expect: str, *, new_client: bool) -> None:
        if new_client or self._client is None:
            self._client = self._make()
        output = self._client.run_command(command, stop_on_errors=True)
        self._client.join(output)
        answers = {}
        for i, o in enumerate(output):
            text = "\n".join(o.stdout)  # first: libssh2 has the exit code only once the output is read
            answers[f"{o.host}#{i}"] = (o.exit_code, text)
        if new_client:
            self.close()
        _check(self.name, answers, expect)

    def close(self) -> None:
        if self._client is not None:
            for host_client in self._client._host_clients.values():
                if host_client is not None:
                    host_client.disconnect()
            self._client = None


class FabricGroup:
    """Fabric's ThreadingGroup (paramiko). ``new_client`` makes every call connect anew."""

    name = "Fabric"

    def __init__(self, servers: Sequence[Server]) -> None:
        self._servers = list(servers)
        self._group = None

    def _make(self):
        from fabric import ThreadingGroup

        first = self._servers[0]
        return ThreadingGroup(
            *[f"{s.host}:{s.port}" for s in self._servers],
            user=first.user,
            connect_kwargs={"key_filename": first.key_path, "look_for_keys": False, "allow_agent": False},
        )

    def run(self, command: str, expect: str, *, new_client: bool) -> None:
        if new_client or self._group is None:
            self.close()
            self._group = self._make()
        results = self._group.run(command, hide=True, warn=True)
        answers = {f"{c.host}:{c.port}": (r.exited, r.stdout) for c, r in results.items()}
        if new_client:
            self.close()
        _check(self.name, answers, expect)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None


class AnsibleAdHoc:
    """``ansible all -m shell``: pipelining on, forks = N, ControlPersist on (OpenSSH masters)."""

    name = "Ansible"

    def __init__(self, servers: Sequence[Server]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cronium-bench-ansible-")
        root = Path(self._dir.name)
        self.inventory = root / "hosts.ini"
        self.inventory.write_text(
            "[fleet]\n"
            + "".join(
                f"{s.name} ansible_host={s.host} ansible_port={s.port} ansible_user={s.user} "
                f"ansible_ssh_private_key_file={s.key_path}\n"
                for s in servers
            )
        )
        self.config = root / "ansible.cfg"
        self.config.write_text(
            textwrap.dedent(
                f"""\
                [defaults]
                host_key_checking = True
                forks = {len(servers)}
                gathering = explicit
                interpreter_python = /usr/bin/python3
                retry_files_enabled = False
                [ssh_connection]
                pipelining = True
                ssh_args = -o ControlMaster=auto -o ControlPersist=120s -o UserKnownHostsFile={servers[0].known_hosts}
                control_path_dir = {root / "cp"}
                """
            )
        )
        self._count = len(servers)

    def run(self, command: str, expect: str, *, new_client: bool = False) -> None:
        del new_client  # every call is a new ansible process; the SSH masters persist
        env = {**os.environ, "ANSIBLE_CONFIG": str(self.config), "ANSIBLE_LOCAL_TEMP": f"{self._dir.name}/tmp"}
        completed = subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible"),
                "all",
                "-i",
                str(self.inventory),
                "-m",
                "shell",
                "-a",
                command,
                "-o",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        ok = [line for line in completed.stdout.splitlines() if "| CHANGED | rc=0" in line and expect in line]
        if completed.returncode != 0 or len(ok) != self._count:
            raise PeerFailed(f"Ansible: {len(ok)} of {self._count} ok:\n{completed.stdout[-800:]}{completed.stderr}")

    def close(self) -> None:
        subprocess.run(
            ["pkill", "-f", f"ControlPath={self._dir.name}"], capture_output=True, check=False
        )  # the ControlPersist masters
        self._dir.cleanup()
