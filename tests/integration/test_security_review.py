"""The security review's findings (issue 14), each shown against the fleet on both architectures:
host-key trust (@revoked, @cert-authority, first use), secrets in multi-line form, outputs and
variables, a login that hangs before the script, and a runaway script's stored output."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from cronium_nb import Event, Executor, Fleet, Inventory, SSHOptions, Status
from cronium_nb.fleet import HOST_KEY_PATH
from cronium_nb.model import Server

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDm3W8CQb2j0m7tpJ4t1Z1yq8xQ0xnb2V0aWxsc2VjcmV0a2V5bGluZQ==\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


def host_public_key(fleet: Fleet, name: str) -> str:
    return fleet.exec(name, f"cat /{HOST_KEY_PATH}.pub").output.split()[1]


def pattern(server: Server) -> str:
    return f"[{server.host}]:{server.port}"


def run_one(server: Server, tmp_path: Path, policy: str, script: str = "echo ok", **event_options):
    inventory = Inventory([server])
    with Executor(inventory, state_dir=tmp_path / "state", ssh_options=SSHOptions(host_key_policy=policy)) as ex:
        return ex.run(Event(name="security", script=script, **event_options), servers=[server.name])[server.name]


# -- host keys


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("policy", ["strict", "accept-new", "off"])
def test_a_revoked_host_key_is_refused_under_every_policy(
    cronium_fleet: Fleet, tmp_path: Path, arch: str, policy: str
) -> None:
    member = cronium_fleet.member(f"{arch}-1").server
    known_hosts = tmp_path / "known_hosts"
    revoked = f"@revoked {pattern(member)} ssh-ed25519 {host_public_key(cronium_fleet, member.name)}\n"
    # strict also has the plain key: the revocation must win over it
    plain = f"{pattern(member)} ssh-ed25519 {host_public_key(cronium_fleet, member.name)}\n"
    known_hosts.write_text(revoked + (plain if policy == "strict" else ""))
    server = dataclasses.replace(member, known_hosts=str(known_hosts))
    if policy == "off":
        with pytest.warns(UserWarning, match="host key checking is off"):
            result = run_one(server, tmp_path, policy)
    else:
        result = run_one(server, tmp_path, policy)
    assert result.status == Status.FAILED
    assert "revoked" in result.error
    assert (
        not (tmp_path / "state" / "known_hosts").exists()
        or member.host not in (tmp_path / "state" / "known_hosts").read_text()
    )


@pytest.fixture(scope="module")
def certified_fleet(cronium_fleet_factory, tmp_path_factory: pytest.TempPathFactory):
    """Servers whose sshd presents a host certificate signed by a CA of ours."""
    fleet = cronium_fleet_factory(
        amd64=1, arm64=1, name_prefix="ca-", sshd_options={"HostCertificate": f"/{HOST_KEY_PATH}-cert.pub"}
    )
    ca = asyncssh.generate_private_key("ssh-ed25519", comment="test host CA")
    for name in fleet.names:
        host_key = asyncssh.import_public_key(fleet.exec(name, f"cat /{HOST_KEY_PATH}.pub").output)
        certificate = ca.generate_host_certificate(host_key, name, principals=["127.0.0.1"])
        text = certificate.export_certificate().decode().strip()
        assert fleet.exec(name, f"echo '{text}' > /{HOST_KEY_PATH}-cert.pub && pkill -HUP -x sshd").exit_code == 0
    for name in fleet.names:
        fleet.wait_ready(name)
    return fleet, ca.export_public_key().decode().split()[1]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("policy", ["strict", "accept-new"])
def test_a_host_certificate_signed_by_a_known_ca_is_accepted(
    certified_fleet, tmp_path: Path, arch: str, policy: str
) -> None:
    fleet, ca_public = certified_fleet
    member = fleet.member(f"ca-{arch}-1").server
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority {pattern(member)} ssh-ed25519 {ca_public}\n")
    result = run_one(dataclasses.replace(member, known_hosts=str(known_hosts)), tmp_path, policy)
    assert result.status == Status.SUCCESS, result.error
    recorded = tmp_path / "state" / "known_hosts"
    assert not recorded.exists() or recorded.read_text() == ""  # covered by the CA: not a new host


@pytest.mark.parametrize("arch", ARCHES)
def test_a_host_covered_only_by_another_ca_is_not_trusted_on_first_use(
    certified_fleet, tmp_path: Path, arch: str
) -> None:
    fleet, _ca_public = certified_fleet
    member = fleet.member(f"ca-{arch}-1").server
    other_ca = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority {pattern(member)} ssh-ed25519 {other_ca}\n")
    result = run_one(dataclasses.replace(member, known_hosts=str(known_hosts)), tmp_path, "accept-new")
    assert result.status == Status.FAILED and "does not match" in result.error
    recorded = tmp_path / "state" / "known_hosts"
    assert not recorded.exists() or recorded.read_text() == ""


def test_concurrent_first_connections_record_one_key_per_host(cronium_fleet: Fleet, tmp_path: Path) -> None:
    inventory = Inventory([dataclasses.replace(m, known_hosts=str(tmp_path / "empty")) for m in cronium_fleet.servers])
    options = SSHOptions(host_key_policy="accept-new", max_channels_per_connection=1)
    with Executor(inventory, state_dir=tmp_path / "state", ssh_options=options) as executor:
        jobs = [executor.submit(Event(name=f"first-{i}", script="sleep 1"), servers="all") for i in range(4)]
        assert all(job.result(timeout=180).ok for job in jobs)
        assert executor.pool.connects >= 2 * len(cronium_fleet.names)  # several connections raced
    lines = (tmp_path / "state" / "known_hosts").read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(pattern(s) for s in cronium_fleet.servers)


# -- secrets


@pytest.mark.parametrize("api", [False, True], ids=["bundled", "api"])
def test_multi_line_secrets_outputs_and_variables_are_redacted(cronium_fleet: Fleet, tmp_path: Path, api: bool) -> None:
    script = (
        'printf "%s\\n" "$DEPLOY_KEY"\n'
        'echo "token is $TOKEN"\n'
        'cronium.output key "$DEPLOY_KEY"\n'
        'cronium.output token "$TOKEN"\n'
        'cronium.setVariable leaked "prefix-$TOKEN"\n'
        'echo "$DEPLOY_KEY" | cronium.setVariable key_copy -\n'
        'echo "$TOKEN" >&2; exit 3\n'
    )
    token = "tok-9f8e7d6c5b4a"
    event = Event(name="secret-spill", script=script, secrets={"DEPLOY_KEY": PEM, "TOKEN": token})
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(event, servers="all", api=api)
        history = executor.history()
        variables = executor.store.variables()
    assert result.status == Status.FAILED
    for server in cronium_fleet.names:
        logs = result.logs.query("server == @server")
        assert logs[logs["stream"] == "stdout"]["line"].tolist() == ["***"] * 4 + ["", "token is ***"]
        assert logs[logs["stream"] == "stderr"]["line"].tolist() == ["***"]
        assert result[server].outputs == {"key": "***\n***\n***\n***\n", "token": "***"}
        assert result[server].variables["leaked"] == "prefix-***"
        assert "BEGIN" not in result[server].variables["key_copy"]
    assert "BEGIN" not in variables.to_string() and token not in variables.to_string()
    assert token not in history.to_string()
    for path in (tmp_path / "state").glob("cronium.db*"):
        data = path.read_bytes()
        assert token.encode() not in data and b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ" not in data


# -- deadlines before the script


@pytest.mark.parametrize("arch", ARCHES)
def test_a_login_that_hangs_in_a_shell_rc_file_fails_within_the_timeout(
    cronium_fleet: Fleet, tmp_path: Path, arch: str
) -> None:
    name = f"{arch}-1"
    member = cronium_fleet.member(name).server
    rc = "/home/intruder/.bashrc"
    # first in the file: Debian's .bashrc returns early for a non-interactive shell
    cronium_fleet.exec(name, f"cp {rc} {rc}.saved && {{ echo 'sleep 600'; cat {rc}.saved; }} > {rc}")
    try:
        started = time.monotonic()
        result = run_one(dataclasses.replace(member, user="intruder"), tmp_path, "strict", timeout=2, grace_period=1)
        elapsed = time.monotonic() - started
    finally:
        cronium_fleet.exec(name, f"mv {rc}.saved {rc} 2>/dev/null || rm -f {rc}; pkill -u intruder sleep || true")
    assert result.status == Status.FAILED
    assert "stalled while probing the server (probe)" in result.error
    assert elapsed < 60  # bounded by timeout + grace, plus connect and teardown (a hang is the bug)


def test_a_server_that_never_speaks_ssh_fails_within_the_timeout(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept and stay silent
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        server = Server(
            name="silent", host="127.0.0.1", port=listener.getsockname()[1], known_hosts=str(tmp_path / "kh")
        )
        (tmp_path / "kh").write_text("")
        started = time.monotonic()
        result = run_one(server, tmp_path, "strict", timeout=2, grace_period=1)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()
    assert result.status == Status.FAILED
    assert "stalled while connecting (connect)" in result.error
    assert elapsed < 30  # SSHOptions.connect_timeout is 30 s: the event's 3 s came first


# -- stored output


@pytest.mark.parametrize("arch", ARCHES)
def test_stored_output_is_capped_per_execution_with_a_marker(cronium_fleet: Fleet, tmp_path: Path, arch: str) -> None:
    name = f"{arch}-1"
    script = (
        "pad=$(printf '%0100d' 0); i=0; while [ $i -lt 3000 ]; do echo \"line $i $pad\"; i=$((i+1)); done; echo done"
    )
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state", max_log_bytes=50_000) as executor:
        result = executor.run(Event(name="runaway", script=script, timeout=300), servers=[name])
    assert result.ok
    logs = result.logs
    stored = logs[logs["stream"] == "stdout"]
    assert 0 < len(stored) < 3001 and stored["line"].str.len().sum() <= 50_000
    marker = logs[logs["stream"] == "cronium"]["line"].tolist()
    assert len(marker) == 1
    dropped = 3001 - len(stored)
    assert marker[0].startswith(f"[cronium] output truncated: {dropped} lines (")
    assert logs["seq"].tolist() == [*range(1, len(stored) + 1), 3002]


# -- what the script leaves in its work dir


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("mkfifo output.json", "output.json is a FIFO, not a regular file"),
        ("ln -s /dev/zero output.json", "output.json is a symbolic link, not a regular file"),
        ("head -c 40000000 /dev/zero > output.json", "output.json is 40 MB, over the 16 MiB limit"),
        ("echo '{not json' > variables.json", "variables.json is not valid JSON"),
        ("echo '[1, 2]' > variables.json", "variables.json"),
    ],
    ids=["fifo", "symlink-to-dev-zero", "oversize", "invalid-variables", "non-object-variables"],
)
def test_result_files_the_script_leaves_are_checked(
    cronium_fleet: Fleet, tmp_path: Path, script: str, message: str
) -> None:
    """The runner neither blocks on nor reads without bound what a script leaves as its result
    files: each is that server's clear error, with the script's output and exit code kept."""
    event = Event(name="result-files", script=f'echo before\ncd "$CRONIUM_DIR"\n{script}\necho after\n', timeout=120)
    started = time.monotonic()
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(event, servers="all")
    assert time.monotonic() - started < 300  # a FIFO must not block the runner (a hang is the bug)
    assert result.status == Status.FAILED
    for server in cronium_fleet.names:
        assert message in result[server].error, result[server].error
        assert result[server].exit_code == 0
        assert result.logs.query("server == @server")["line"].tolist() == ["before", "after"]
        assert result[server].variables == {}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_runner_changed_in_place_with_its_mtime_restored_is_noticed(
    cronium_fleet_factory, tmp_path: Path, arch: str
) -> None:
    """Size, mtime and inode unchanged, content changed: the ctime in the verification listing
    gives it away, the hash check fails, and the runner is deployed again."""
    fleet = cronium_fleet_factory(amd64=int(arch == "amd64"), arm64=int(arch == "arm64"), name_prefix="ctime-")
    name = fleet.names[0]
    event = Event(name="ctime", script="echo fine")
    with Executor(fleet.inventory, state_dir=tmp_path / "one") as executor:
        assert executor.run(event).ok
    tamper = (
        # no runner process may be left (a running executable cannot be written: ETXTBSY)
        "pkill -f 'cronium-runner [d]aemon'; "
        "for i in $(seq 100); do pgrep -f '[c]ronium-runner' >/dev/null || break; sleep 0.1; done; "
        "for f in ~/.cache/cronium/runner/*/cronium-runner; do "
        'cp -p "$f" /tmp/stamp && printf X | dd of="$f" bs=1 seek=4096 conv=notrunc 2>/dev/null '
        '&& touch -r /tmp/stamp "$f"; done'
    )
    assert fleet.exec(name, tamper).exit_code == 0
    with Executor(fleet.inventory, state_dir=tmp_path / "two") as executor:
        result = executor.run(event)
    assert result.ok, result.summary.to_string()
    assert result[name].deploy == "deployed"
