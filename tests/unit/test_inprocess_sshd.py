"""The in-process SSH server itself behaves as sshd does where the orchestrator depends on it."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import asyncssh
import pytest

pytestmark = pytest.mark.timeout(30)


def session(fleet, name: str = "srv-1", **options):
    """An asyncssh client connection to a member (a context manager, used inside asyncio.run)."""
    server = fleet.server(name)
    return asyncssh.connect(
        "127.0.0.1",
        port=server.port,
        username=server.user,
        client_keys=[server.key_path],
        known_hosts=options.pop("known_hosts", server.known_hosts),
        **options,
    )


def test_exec_runs_a_shell_in_the_servers_home_with_stdin_stdout_stderr_and_exit_status(local_servers) -> None:
    fleet = local_servers(1)
    data = os.urandom(3 * 2**20)  # past the server's stdin buffer and the SSH window

    async def main():
        async with session(fleet) as conn:
            piped = await conn.run("cat; echo done >&2; exit 7", input=data, encoding=None, check=False)
            where = await conn.run('echo "$HOME $(pwd)"', check=True)
            early = await conn.run("exit 3", input=data, encoding=None, check=False)  # never reads its stdin
            return piped, where, early

    piped, where, early = asyncio.run(main())
    assert piped.stdout == data and piped.stderr == b"done\n" and piped.exit_status == 7
    assert where.stdout.split() == [str(fleet["srv-1"].home)] * 2
    assert early.exit_status == 3


def test_a_signal_request_signals_the_process_and_its_end_is_reported(local_servers) -> None:
    fleet = local_servers(1)

    async def main():
        async with session(fleet) as conn:
            process = await conn.create_process("echo ready; exec sleep 5201")
            assert await process.stdout.readline() == "ready\n"
            process.terminate()
            return await process.wait(check=False)

    result = asyncio.run(main())
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"


def test_stream_local_channels_connect_refuse_and_close_like_sshd(local_servers, tmp_path: Path) -> None:
    fleet = local_servers(1)
    path = str(tmp_path / "service.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve_one() -> None:  # says hello and hangs up at once
        connection, _ = listener.accept()
        connection.sendall(b"hello")
        connection.close()

    threading.Thread(target=serve_one, daemon=True).start()

    async def main():
        async with session(fleet) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection(str(tmp_path / "nobody.sock"))
            reader, writer = await conn.open_unix_connection(path)
            assert await reader.read() == b"hello"  # then the end of its data
            writer.write_eof()  # both directions ended: the channel closes, as under sshd
            await asyncio.wait_for(writer.channel.wait_closed(), 5)

    asyncio.run(main())
    listener.close()


def test_a_remote_forward_listens_privately_and_forwards_back(local_servers, tmp_path: Path) -> None:
    fleet = local_servers(1)
    remote_path = str(fleet["srv-1"].home / "fwd.sock")

    async def main():
        async def answer(reader, writer):
            writer.write(b"pong:" + await reader.readexactly(4))
            writer.write_eof()

        server = await asyncio.start_unix_server(answer, str(tmp_path / "local.sock"))
        async with server, session(fleet) as conn:
            forward = await conn.forward_remote_path(remote_path, str(tmp_path / "local.sock"))
            assert os.stat(remote_path).st_mode & 0o777 == 0o600
            with pytest.raises(asyncssh.ChannelListenError):  # the path is taken (no unlink)
                await conn.forward_remote_path(remote_path, str(tmp_path / "local.sock"))
            reader, writer = await asyncio.open_unix_connection(remote_path)  # a process on the server
            writer.write(b"ping")
            reply = await reader.read()
            writer.close()
            forward.close()
            return reply

    assert asyncio.run(main()) == b"pong:ping"


def test_the_host_key_is_verified(local_servers, tmp_path: Path) -> None:
    fleet = local_servers(2)
    # srv-2's key where srv-1's should be: the client must refuse srv-1
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(fleet["srv-2"].host_key_line.replace(str(fleet["srv-2"].port), str(fleet["srv-1"].port)))

    async def main():
        async with session(fleet, known_hosts=str(wrong)):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(main())
