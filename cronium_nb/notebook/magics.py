"""IPython magics: ``%cronium_servers``, ``%%cronium``, ``%cronium_fleet``, ``%cronium_metrics``,
``%cronium_history``, ``%cronium_vars``."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from cronium_nb.fleet import VARIANTS, FleetError
from cronium_nb.inventory import InventoryError, UnknownServerError
from cronium_nb.manifest import SCRIPT_TYPES
from cronium_nb.model import DEFAULT_TIMEOUT_S, Event, EventError
from cronium_nb.notebook.live import BackgroundRun, EventQueue, WidgetView, make_view
from cronium_nb.notebook.session import NotebookSession


def _parse(magic: Any, line: str) -> Any:
    try:
        return parse_argstring(magic, line)
    except UsageError as error:
        raise UsageError(str(error).splitlines()[-1]) from None


@magics_class
class CroniumMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session = NotebookSession()

    @property
    def _user_ns(self) -> dict[str, Any]:
        """The notebook's variables."""
        if self.shell is None:  # only a magic that was never registered with a shell
            raise UsageError("the cronium magics need an IPython shell")
        return self.shell.user_ns

    @magic_arguments()
    @argument("path", nargs="?", help="inventory YAML to load; without it, show the servers")
    @argument("--raw", action="store_true", help="the inventory as written, not resolved through the ssh config")
    @argument(
        "--ssh-config",
        dest="ssh_config",
        help="the OpenSSH client config to resolve and connect with from now on (default ~/.ssh/config)",
    )
    @line_magic
    def cronium_servers(self, line: str) -> Any:
        """Load an inventory file, or show the servers known to this notebook: the host, port,
        user, keys, known_hosts files, jump hosts, host-key policy and connect timeout each
        connection uses, resolved through the ssh config, and where each value came from."""
        args = _parse(self.cronium_servers, line)
        if args.path:
            from cronium_nb.inventory import Inventory

            try:
                self.session.loaded = Inventory.load(args.path)
            except InventoryError as error:
                raise UsageError(str(error)) from None
        if args.ssh_config:
            try:
                self.session.use_ssh_config(args.ssh_config)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if args.raw:
            return self.session.inventory.to_dataframe()
        from cronium_nb.ssh.resolve import resolved_frame

        return resolved_frame(self.session.inventory, self.session.ssh_options)

    @magic_arguments()
    @argument("path", help="the key file protected by a passphrase")
    @line_magic
    def cronium_unlock(self, line: str) -> Any:
        """A password field that unlocks a passphrase-protected key for this notebook (the
        passphrase is not kept; the decrypted key stays in this process's memory)."""
        from cronium_nb.notebook.passphrase import unlock_widget

        return unlock_widget(_parse(self.cronium_unlock, line).path)

    @magic_arguments()
    @argument("-s", "--servers", default="all", help="server names, group names or 'all', comma-separated")
    @argument("-t", "--type", default="bash", choices=list(SCRIPT_TYPES), help="script type (default bash)")
    @argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds (default {DEFAULT_TIMEOUT_S:g})")
    @argument("-n", "--name", help="event name (default: derived from the script)")
    @argument("-i", "--input", dest="input_json", help="input of the run, as JSON")
    @argument("-I", "--input-from", dest="input_var", help="input of the run: this notebook variable's value")
    @argument("-o", "--output", dest="output_var", help="store the result (or --bg handle) in this variable")
    @argument("--bg", action="store_true", help="return at once with a cancellable handle")
    @argument("--api", action="store_true", help="API mode: live variables and tool actions through an SSH forward")
    @argument("--become", action="store_true", help="run the script as root through sudo (see --become-user)")
    @argument("--become-user", help="the user --become runs the script as (default root; implies --become)")
    @cell_magic
    def cronium(self, line: str, cell: str) -> Any:
        """Run the cell's script on servers over SSH, with live output per server.

        Ctrl-C (interrupt the kernel) cancels the remote work on every server.
        """
        args = _parse(self.cronium, line)
        run_input: Any = None
        if args.input_json is not None and args.input_var is not None:
            raise UsageError("give --input or --input-from, not both")
        if args.input_var is not None:
            if args.input_var not in self._user_ns:
                raise UsageError(f"--input-from: no variable {args.input_var!r} in the notebook")
            run_input = self._user_ns[args.input_var]
            try:
                json.dumps(run_input)
            except (TypeError, ValueError) as error:
                raise UsageError(f"--input-from {args.input_var}: not JSON-able: {error}") from None
        if args.input_json is not None:
            text = args.input_json
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                text = text[1:-1]  # IPython's argument splitting keeps the quotes
            try:
                run_input = json.loads(text)
            except ValueError as error:
                raise UsageError(f"--input is not valid JSON: {error}") from None
        name = args.name or f"cell-{hashlib.sha256(cell.encode()).hexdigest()[:8]}"
        try:
            event = Event(
                name=name,
                script=cell,
                type=args.type,
                timeout=args.timeout,
                become=args.become or args.become_user is not None,
                become_user=args.become_user or "root",
            )
            executor = self.session.executor
            servers = [s.name for s in executor.inventory.select(args.servers)]
        except (EventError, UnknownServerError) as error:
            raise UsageError(str(error)) from None
        events = EventQueue()
        job = executor.submit(event, servers, input=run_input, callbacks=events.callbacks(), api=args.api)
        view = make_view(servers, f"{name} ({args.type})", job if args.bg else None)
        if isinstance(view, WidgetView):
            display(view)
        if args.bg:
            handle = BackgroundRun(job, view, events)
            if args.output_var:
                self._user_ns[args.output_var] = handle
            return handle
        try:
            while not job.done():
                events.drain(view)
        except KeyboardInterrupt:
            view.note("interrupted: cancelling the remote work…")
            job.cancel()
            while not job.done():
                events.drain(view)
        events.drain(view, wait=0)
        result = job.result()
        view.finish(result)
        if args.output_var:
            self._user_ns[args.output_var] = result
        return result

    @magic_arguments()
    @argument("action", choices=["up", "down", "status"])
    @argument("--amd64", type=int, default=1, help="amd64 servers (default 1)")
    @argument("--arm64", type=int, default=1, help="arm64 servers (default 1)")
    @argument("--variant", default="full", choices=list(VARIANTS))
    @argument(
        "--behind-bastion",
        action="store_true",
        help="servers on an internal network, reached only through a published bastion (their jump host)",
    )
    @argument("-o", "--output", dest="output_var", help="also store the Fleet in this variable")
    @line_magic
    def cronium_fleet(self, line: str) -> Any:
        """Start or remove local Docker sshd servers; they join this notebook's inventory."""
        args = _parse(self.cronium_fleet, line)
        from cronium_nb.fleet import Fleet

        if args.action == "up":
            if self.session.fleet is not None:
                raise UsageError("a fleet is already up: %cronium_fleet down first")
            try:
                self.session.fleet = Fleet.up(
                    amd64=args.amd64, arm64=args.arm64, variant=args.variant, behind_bastion=args.behind_bastion
                )
            except (FleetError, ValueError) as error:
                raise UsageError(str(error)) from None
            if args.output_var:
                self._user_ns[args.output_var] = self.session.fleet
        elif args.action == "down":
            if self.session.fleet is not None:
                self.session.fleet.down()
                self.session.fleet = None
            return None
        if self.session.fleet is None:
            return "no fleet is up"
        return self.session.fleet.inventory.to_dataframe()

    @line_magic
    def cronium_executor(self, line: str) -> Any:
        """The executor the magics use (``ex = %cronium_executor``), e.g. to register tool
        actions with ``ex.tools.register(name, fn)``."""
        return self.session.executor

    @line_magic
    def cronium_metrics(self, line: str) -> Any:
        """The executor's metrics as a DataFrame."""
        return self.session.executor.metrics()

    @magic_arguments()
    @argument("-n", "--limit", type=int, default=20)
    @line_magic
    def cronium_history(self, line: str) -> Any:
        """Past executions (from the store) as a DataFrame."""
        return self.session.executor.history(_parse(self.cronium_history, line).limit)

    @magic_arguments()
    @argument("scope", nargs="?", default=None)
    @line_magic
    def cronium_vars(self, line: str) -> Any:
        """Variables in the store as a DataFrame."""
        return self.session.executor.store.variables(_parse(self.cronium_vars, line).scope)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(CroniumMagics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("CroniumMagics")
    if magics is not None:
        magics.session.close()
