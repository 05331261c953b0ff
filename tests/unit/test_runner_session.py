"""A runner session that never says hello, on both kinds of channel: a daemon session (a
stream-local channel to the daemon's Unix socket, which has no exit status) and a ``serve``
process (an exec channel). Both end in RunnerUnavailable, which the session layer answers with
its fallback. A bare asyncssh server on 127.0.0.1 is enough: no runner, no Docker."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncssh
import pytest

from cronium_nb.errors import RunnerUnavailable
from cronium_nb.ssh.remote_run import RunnerSession

T = TypeVar("T")


class _Server(asyncssh.SSHServer):
    """No authentication; direct stream-local channels go to the Unix socket they name."""

    def begin_auth(self, username: str) -> bool:
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return True


async def _not_found(process: asyncssh.SSHServerProcess) -> None:
    """What sshd's shell does with a runner that is not there."""
    process.stderr.write("sh: 1: cronium-runner: not found\n")
    process.exit(127)


def _with_connection(scenario: Callable[[asyncssh.SSHClientConnection, Path], Awaitable[T]]) -> T:
    """Run ``scenario(connection, directory)`` against a fresh in-process SSH server; the
    directory is short enough for a Unix socket path."""
    directory = Path(tempfile.mkdtemp(prefix="cronium-", dir="/tmp"))

    async def main() -> T:
        server = await asyncssh.create_server(
            _Server,
            "127.0.0.1",
            0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            process_factory=_not_found,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncssh.connect(
                "127.0.0.1", port, username="test", known_hosts=None, client_keys=None, agent_path=None
            ) as connection:
                return await asyncio.wait_for(scenario(connection, directory), 30)
        finally:
            server.close()
            await server.wait_closed()

    try:
        return asyncio.run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _daemon_session_error(
    connection: asyncssh.SSHClientConnection,
    directory: Path,
    daemon: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> str:
    """Open a runner daemon session to a fake daemon served by ``daemon``: the message of the
    RunnerUnavailable it must end in."""
    socket_path = directory / "daemon.sock"
    listener = await asyncio.start_unix_server(daemon, str(socket_path))
    try:
        with pytest.raises(RunnerUnavailable) as caught:
            await RunnerSession.connect(connection, str(socket_path), "cronium-runner-test")
    finally:
        listener.close()
        await listener.wait_closed()
    return str(caught.value)


@pytest.mark.parametrize("reply", [b"", b"this is not a runner frame\n"], ids=["closes", "garbage"])
def test_a_daemon_session_without_hello_is_runner_unavailable(reply: bytes) -> None:
    """The daemon accepts the connection and closes it (or answers nonsense) without a hello:
    the session raises RunnerUnavailable (it used to ask the stream-local channel for an exit
    status it does not have, an AttributeError that escaped the daemon fallback)."""

    async def scenario(connection: asyncssh.SSHClientConnection, directory: Path) -> str:
        async def daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(reply)
            await writer.drain()
            writer.close()

        return await _daemon_session_error(connection, directory, daemon)

    message = _with_connection(scenario)
    assert message.startswith("the runner daemon's session ended before its hello: ")
    if reply:
        assert "corrupt runner output" in message


def test_a_serve_process_without_hello_is_runner_unavailable_with_its_exit_status() -> None:
    async def scenario(connection: asyncssh.SSHClientConnection, directory: Path) -> str:
        with pytest.raises(RunnerUnavailable) as caught:
            await RunnerSession.start(connection, "cronium-runner serve", "cronium-runner-test")
        return str(caught.value)

    message = _with_connection(scenario)
    assert message.startswith("runner did not start (exit 127): ")
    assert "cronium-runner: not found" in message


def test_a_daemon_that_accepts_and_stays_silent_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon whose socket takes the connection (its listen backlog) but never answers: the
    session gives up after HELLO_TIMEOUT_S with RunnerUnavailable (the session layer then starts
    a runner of its own) instead of waiting out the event's timeout."""
    monkeypatch.setattr("cronium_nb.ssh.remote_run.HELLO_TIMEOUT_S", 0.5)

    async def scenario(connection: asyncssh.SSHClientConnection, directory: Path) -> str:
        async def daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # holds the connection and says nothing, until the client leaves
            writer.close()

        return await _daemon_session_error(connection, directory, daemon)

    assert _with_connection(scenario) == "no hello from the runner within 0.5 s"
