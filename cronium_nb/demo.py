"""``make demo``: bring up a local amd64 + arm64 fleet, reach every server over SSH, take it down."""

from __future__ import annotations

import asyncio

import asyncssh
import pandas as pd

from cronium_nb.fleet import Fleet
from cronium_nb.model import Server


async def _uname(server: Server) -> dict[str, object]:
    async with asyncssh.connect(
        server.host,
        port=server.port,
        username=server.user,
        client_keys=[server.key_path],
        known_hosts=server.known_hosts,
    ) as connection:
        result = await connection.run("uname -m", check=True)
    return {"server": server.name, "port": server.port, "uname -m": str(result.stdout).strip()}


async def _gather(servers: list[Server]) -> list[dict[str, object]]:
    return await asyncio.gather(*(_uname(server) for server in servers))


def main() -> None:
    print("starting a fleet: 1 x linux/amd64, 1 x linux/arm64 (emulated) ...", flush=True)
    with Fleet.up(amd64=1, arm64=1) as fleet:
        rows = asyncio.run(_gather(fleet.servers))
        print(pd.DataFrame(rows).to_string(index=False))
    print("fleet removed")


if __name__ == "__main__":
    main()
