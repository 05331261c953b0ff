"""IPython magics: ``%cronium_servers``, ``%%cronium``, ``%cronium_attach``, ``%cronium_fleet``,
``%cronium_metrics``, ``%cronium_history``, ``%cronium_vars``, ``%cronium_put``, ``%cronium_fetch``,
``%cronium_confirm_above``, ``%cronium_cluster``."""

from __future__ import annotations

import hashlib
import json
import shlex
from argparse import ArgumentTypeError
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from cronium_nb.detached import DetachedError
from cronium_nb.executor import Executor, Job
from cronium_nb.fleet import VARIANTS, FleetError
from cronium_nb.inventory import InventoryError, UnknownServerError
from cronium_nb.manifest import SCRIPT_TYPES
from cronium_nb.model import DEFAULT_TIMEOUT_S, Event, EventError
from cronium_nb.notebook.confirm import confirm_run
from cronium_nb.notebook.live import BackgroundRun, EventQueue, WidgetView, make_view
from cronium_nb.notebook.session import NotebookSession
from cronium_nb.notebook.transfer_view import TransferProgress
from cronium_nb.rollout import Rollout, RolloutError


def _count_or_fraction(text: str) -> int | float:
    """``--max-fail``: a count of servers (``2``) or a fraction of them (``0.25``)."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


def _parse(magic: Any, line: str) -> Any:
    try:
        return parse_argstring(magic, line)
    except UsageError as error:
        raise UsageError(str(error).splitlines()[-1]) from None


def _parse_paths(magic: Any, line: str) -> Any:
    """Like :func:`_parse`, for magics that take paths: quotes are removed the way a shell does
    (IPython's own splitting keeps them), so ``'my file.txt'`` is the path ``my file.txt``."""
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise UsageError(f"cannot split the arguments: {error}") from None
    try:
        return magic.parser.parse_args(words)
    except UsageError as error:
        raise UsageError(str(error).splitlines()[-1]) from None


def _follow(executor: Executor, job: Job, view: Any, events: EventQueue) -> Any:
    """Show a job's events until it ends and return its result. Ctrl-C cancels the remote work,
    or, for a detached execution, stops following it (its runs go on)."""
    try:
        while not job.done():
            events.drain(view)
    except KeyboardInterrupt:
        if job.detached:
            view.note(f"interrupted: the runs go on on the servers; ex.attach({job.execution_id!r}) follows them")
            executor.stop_following(job)
        else:
            view.note("interrupted: cancelling the remote work…")
            job.cancel()
        while not job.done():
            events.drain(view)
    events.drain(view, wait=0)
    result = job.result()
    view.finish(result)
    return result


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
    @argument("-o", "--output", dest="output_var", help="store the result (the --bg handle, the --dry-run plan) here")
    @argument("--bg", action="store_true", help="return at once with a cancellable handle")
    @argument("--api", action="store_true", help="API mode: live variables and tool actions through an SSH forward")
    @argument("--batch", type=int, dest="batch_size", help="rollout: this many servers at a time, in order")
    @argument(
        "--max-fail",
        type=_count_or_fraction,
        dest="max_fail",
        help="rollout: stop before the next batch once more servers than this failed (a count, or a fraction 0-1)",
    )
    @argument("--dry-run", action="store_true", help="show the plan (targets, payload, runner cache); run nothing")
    @argument("--yes", action="store_true", help="run on more than the executor's confirm_above servers without asking")
    @argument("--detach", action="store_true", help="the runs go on if the kernel dies: ex.attach(id) follows them")
    @argument("--become", action="store_true", help="run the script as root through sudo (see --become-user)")
    @argument("--become-user", help="the user --become runs the script as (default root; implies --become)")
    @cell_magic
    def cronium(self, line: str, cell: str) -> Any:
        """Run the cell's script on servers over SSH, with live output per server.

        Ctrl-C (interrupt the kernel) cancels the remote work on every server. ``--batch N
        --max-fail K`` rolls it out N servers at a time; ``--dry-run`` shows the plan and runs
        nothing; a cell aimed at more than the executor's ``confirm_above`` servers (20) asks
        first, and is refused headless unless ``--yes``.
        """
        args = _parse(self.cronium, line)
        run_input: Any = None
        if args.input_json is not None and args.input_var is not None:
            raise UsageError("give --input or --input-from, not both")
        if args.api and args.detach:
            raise UsageError("--api needs the kernel to answer the script's helpers: a --detach run cannot use it")
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
        rollout = {"batch_size": args.batch_size, "max_fail": args.max_fail}
        try:
            if args.dry_run:
                plan = executor.plan(event, servers, input=run_input, **rollout)
                if args.output_var:
                    self._user_ns[args.output_var] = plan
                return plan
            Rollout(**rollout)  # checked before anyone is asked
        except RolloutError as error:
            raise UsageError(str(error)) from None
        if len(servers) > executor.confirm_above and not args.yes:
            confirm_run(servers, executor.confirm_above)
        events = EventQueue()
        try:
            job = executor.submit(
                event, servers, input=run_input, callbacks=events.callbacks(), api=args.api, detach=args.detach,
                **rollout,
            )  # fmt: skip
        except EventError as error:  # e.g. --detach with --batch
            raise UsageError(str(error)) from None
        view = make_view(servers, f"{name} ({args.type})", job if args.bg else None)
        if isinstance(view, WidgetView):
            display(view)
        if args.bg:
            handle = BackgroundRun(job, view, events)
            if args.output_var:
                self._user_ns[args.output_var] = handle
            return handle
        result = _follow(executor, job, view, events)
        if args.output_var:
            self._user_ns[args.output_var] = result
        return result

    @magic_arguments()
    @argument("execution_id", nargs="?", help="the detached execution to follow; without it, list them")
    @argument("-o", "--output", dest="output_var", help="store the result in this variable")
    @line_magic
    def cronium_attach(self, line: str) -> Any:
        """Follow a detached execution (``%%cronium --detach``, ``submit(..., detach=True)``) with
        live output, from its first line to its result; without an id, list the detached
        executions (``ex.detached()``). Ctrl-C stops following; the runs go on."""
        args = _parse(self.cronium_attach, line)
        executor = self.session.executor
        if args.execution_id is None:
            return executor.detached()
        events = EventQueue()
        try:
            job = executor.attach(args.execution_id, callbacks=events.callbacks(), background=True)
        except (DetachedError, UnknownServerError) as error:
            raise UsageError(str(error)) from None
        row = executor.store.execution_row(args.execution_id) or {"targets": [], "event_name": "?"}
        view = make_view(list(row["targets"]), f"{row['event_name']} (attached {args.execution_id})", None)
        if isinstance(view, WidgetView):
            display(view)
        result = _follow(executor, job, view, events)
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

    @magic_arguments()
    @argument("local", help="the local file to copy")
    @argument("remote", help="where it goes on each server (a directory keeps the file's name)")
    @argument("-s", "--servers", default="all", help="server names, group names or 'all', comma-separated")
    @argument("--mode", help="octal permissions of the remote file, e.g. 644 (default: the replaced file's, else 644)")
    @argument("--timeout", type=float, default=None, help="seconds per server (default: no limit)")
    @argument("-o", "--output", dest="output_var", help="store the result table in this variable")
    @line_magic
    def cronium_put(self, line: str) -> Any:
        """Copy a local file to servers (streamed, checksummed, renamed into place); shows the
        bytes done per server, then a table: server, path, bytes, sha256, status, error."""
        args = _parse_paths(self.cronium_put, line)
        mode = None
        if args.mode is not None:
            try:
                mode = int(args.mode, 8)
            except ValueError:
                raise UsageError(f"--mode must be octal permissions such as 644, got {args.mode!r}") from None
        executor = self.session.executor
        try:
            servers = [s.name for s in executor.inventory.select(args.servers)]
            view = TransferProgress(servers, f"put {args.local} → {args.remote}")
            job = executor.submit_put(
                args.local, args.remote, servers, mode=mode, timeout=args.timeout, progress=view.callback()
            )
        except (OSError, ValueError, TypeError) as error:  # bad input: nothing was started
            raise UsageError(str(error)) from None
        return self._keep(args.output_var, view.follow(job))

    @magic_arguments()
    @argument("remote", help="the file to copy from each server")
    @argument("-s", "--servers", default="all", help="server names, group names or 'all', comma-separated")
    @argument("--dest", required=True, help="local directory: each server's copy goes to DEST/<server>/<name>")
    @argument("--timeout", type=float, default=None, help="seconds per server (default: no limit)")
    @argument("-o", "--output", dest="output_var", help="store the result table in this variable")
    @line_magic
    def cronium_fetch(self, line: str) -> Any:
        """Copy a file from servers to DEST/<server>/<name> (streamed, checksummed); shows the
        bytes done per server, then a table: server, path, bytes, sha256, status, error."""
        args = _parse_paths(self.cronium_fetch, line)
        executor = self.session.executor
        try:
            servers = [s.name for s in executor.inventory.select(args.servers)]
            view = TransferProgress(servers, f"fetch {args.remote} → {args.dest}")
            job = executor.submit_fetch(
                args.remote, servers, dest=args.dest, timeout=args.timeout, progress=view.callback()
            )
        except (OSError, ValueError, TypeError) as error:  # bad input: nothing was started
            raise UsageError(str(error)) from None
        return self._keep(args.output_var, view.follow(job))

    def _keep(self, name: str | None, value: Any) -> Any:
        """``value``, also stored in the notebook variable ``name`` when one is given."""
        if name:
            self._user_ns[name] = value
        return value

    @line_magic
    def cronium_executor(self, line: str) -> Any:
        """The executor the magics use (``ex = %cronium_executor``), e.g. to register tool
        actions with ``ex.tools.register(name, fn)``."""
        return self.session.executor

    @magic_arguments()
    @argument("count", nargs="?", type=int, help="a %%%%cronium cell aimed at more servers asks first")
    @line_magic
    def cronium_confirm_above(self, line: str) -> Any:
        """Show, or set, how many servers a ``%%cronium`` cell may aim at without asking for
        confirmation (default 20; ``--yes`` on the cell skips the question)."""
        count = _parse(self.cronium_confirm_above, line).count
        if count is not None:
            if count < 0:
                raise UsageError(f"confirm_above must be 0 or more servers, got {count}")
            self.session.confirm_above = count
        return self.session.executor.confirm_above

    @magic_arguments()
    @argument("client", nargs="?", help="a notebook variable holding a distributed.Client, or 'off'")
    @line_magic
    def cronium_cluster(self, line: str) -> Any:
        """Run the magics' events through a Dask cluster (``%cronium_cluster client``), or in
        this process again (``%cronium_cluster off``); without an argument, say which."""
        name = _parse(self.cronium_cluster, line).client
        if name == "off":
            self.session.use_cluster(None)
        elif name is not None:
            if name not in self._user_ns:
                raise UsageError(f"no variable {name!r} in the notebook (expected a distributed.Client)")
            try:
                self.session.use_cluster(self._user_ns[name])
                self.session.executor  # noqa: B018 - made now, so a wrong object is refused here
            except (TypeError, ValueError) as error:
                self.session.use_cluster(None)
                raise UsageError(str(error)) from None
        client = self.session.executor.cluster
        return "running in this process" if client is None else f"running through the Dask cluster {client}"

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
