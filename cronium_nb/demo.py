"""``make demo``: a real run on a local amd64 + arm64 fleet, printing the result DataFrames."""

from __future__ import annotations

import tempfile

import pandas as pd

from cronium_nb import Event, Executor, Fleet

SCRIPT = """\
echo "hello from $(hostname), $(uname -m)"
echo "input n = $(cronium.input n)"
cronium.output "{\\"machine\\": \\"$(uname -m)\\", \\"square\\": $(( $(cronium.input n) * $(cronium.input n) ))}"
cronium.setVariable last_machine "$(uname -m)"
"""


def main() -> None:
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 20)
    print("starting a fleet: 1 x linux/amd64, 1 x linux/arm64 (emulated) ...", flush=True)
    with (
        Fleet.up(amd64=1, arm64=1) as fleet,
        tempfile.TemporaryDirectory() as state,
        Executor(fleet.inventory, state_dir=state) as executor,
    ):
        event = Event(name="demo", script=SCRIPT, type="bash", timeout=120, input={"n": 7})
        first = executor.run(event, servers="all")
        second = executor.run(event, servers="all", input={"n": 12})
        print(f"\n{first!r}\n{second!r}\n")
        print("summary (first run deploys the runner, the second uses the cache):")
        print(first.summary.to_string(index=False))
        print(second.summary.to_string(index=False))
        print("\nlogs of the second run:")
        print(second.logs.to_string(index=False))
        print("\noutputs:", second.outputs)
        print("variables:", second.variables)
        print("\nphases of the second run (seconds):")
        print(second.phases.to_string(index=False))
        print("\nmetrics:")
        print(executor.metrics().to_string(index=False))
        print("\nhistory:")
        history = executor.history()[["execution_id", "event", "status", "servers_ok", "servers"]]
        print(history.to_string(index=False))
    print("\nfleet removed")


if __name__ == "__main__":
    main()
