"""Asking before a ``%%cronium`` cell runs on many servers (more than ``Executor.confirm_above``).

In a notebook shown by a frontend the question is the kernel's input request (the same channel
as the passphrase prompt, see :func:`cronium_nb.ssh.keys.ask_passphrase`); in a terminal,
``input()``. Where nobody can answer (papermill, nbclient: no stdin) the cell is refused with a
clear error before anything runs, unless it says ``--yes``.
"""

from __future__ import annotations

import sys

from IPython.core.error import UsageError

YES = ("y", "yes")


def _refused(what: str, why: str) -> UsageError:
    return UsageError(f"{what}: {why}; add --yes to the %%cronium line to run it without asking")


def confirm_run(servers: list[str], confirm_above: int) -> None:
    """Ask whether to run on ``servers``; return when the answer is yes, else raise UsageError."""
    shown = ", ".join(servers[:5]) + (f", … ({len(servers) - 5} more)" if len(servers) > 5 else "")
    what = f"this cell is aimed at {len(servers)} servers, more than confirm_above={confirm_above}"
    prompt = f"{what} ({shown}). Run it? [y/N] "
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
    except ImportError:
        kernel = None
    if kernel is not None:
        if not getattr(kernel, "_allow_stdin", False):
            raise _refused(what, "nobody can confirm it here (a headless run: no input)")
        try:
            answer = str(kernel.raw_input(prompt))
        except Exception as error:  # e.g. StdinNotImplementedError: the frontend cannot answer
            raise _refused(what, f"the notebook could not ask ({error})") from None
    elif sys.stdin is not None and sys.stdin.isatty():
        answer = input(prompt)
    else:
        raise _refused(what, "nobody can confirm it here (no terminal)")
    if answer.strip().lower() not in YES:
        raise UsageError(f"not run: {what}, and the answer was {answer.strip()!r}, not yes")
