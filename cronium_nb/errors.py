"""Every exception cronium_nb raises, under one base, and the kinds of a server's failure.

``CroniumError`` is the base of all of them, so ``except cronium_nb.CroniumError`` catches
anything this package raises on purpose. The errors raised before anything runs live with what
they check and are also ``ValueError`` subclasses, as bad arguments are: ``EventError``
(model), ``InventoryError`` and ``UnknownServerError`` (inventory), ``ManifestError``; the
others: ``ProtocolError``, ``StoreError``, ``FleetError``, ``ToolError``. This module holds the
base and the errors of one server's way from connecting to running its script.

A failure on one server does not raise: it is that server's row, with a readable ``error`` and
an ``error_kind`` (one of :data:`ERROR_KINDS`) that a program can branch on without parsing text.
The exceptions used on the way to that row carry their kind as ``error_kind``.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal[
    "unreachable",  # no connection: refused, reset, no route, no answer, lost during the run
    "auth",  # the server refused our key, or the key file cannot be used
    "host_key",  # the server's host key is unknown, changed or revoked
    "deploy",  # the runner could not be put on the server
    "runner",  # the runner would not start, or reported an error of its own
    "become",  # become (sudo): refused, a wrong or missing password, or no sudo on the server
    "script",  # the script ran and failed (exit code, a value it set that cannot be stored)
    "timeout",  # the event's timeout ended the script, or a setup step stalled past it
    "cancelled",  # cancelled by the caller (job.cancel(), Ctrl-C, continue_on_failure=False)
    "internal",  # a bug in cronium_nb
    "worker_lost",  # the Dask worker running this server was lost mid-run (not rerun elsewhere)
]
ERROR_KINDS: tuple[ErrorKind, ...] = (
    "unreachable",
    "auth",
    "host_key",
    "deploy",
    "runner",
    "become",
    "script",
    "timeout",
    "cancelled",
    "internal",
    "worker_lost",
)


class CroniumError(Exception):
    """The base of every exception cronium_nb raises on purpose."""

    error_kind: ErrorKind = "internal"


# -- one server's failure (becomes its row's error and error_kind)


class ConnectError(CroniumError):
    """A server could not be reached or refused us; the message says why, for that server's row."""

    def __init__(self, message: str, *, error_kind: ErrorKind = "unreachable") -> None:
        super().__init__(message)
        self.error_kind = error_kind


class HostKeyError(ConnectError):
    """The server's host key could not be verified, with what to do about it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_kind="host_key")


class DeployError(CroniumError):
    """The runner could not be deployed (after retries, or for a reason retrying cannot fix)."""

    error_kind: ErrorKind = "deploy"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class RunnerUnavailable(CroniumError):
    """The runner did not start or is out of date on the server: deploy again and retry."""

    error_kind: ErrorKind = "runner"


class SetupStalled(CroniumError):
    """A step before the script (connect, probe, deploy, API forward, runner start) did not
    finish within the event's timeout plus grace; the message names the step."""

    error_kind: ErrorKind = "timeout"
