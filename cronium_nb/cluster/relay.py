"""What a worker's agent sends back to the client while it runs an execution: the message
format on the Dask event topic, and how a server's result travels in it.

One message is ``{"execution": id, "items": [item, ...]}``, sent with ``Worker.log_event`` on the
executor's own topic and received with ``Client.subscribe_topic``. Items keep the order they
happened in (one worker's events reach the client in order):

- ``["lines", server, stream, text, count, ts]``: ``count`` output lines joined by newlines,
  secrets already redacted;
- ``["status", server, status, phase, arch]``: a server's status or phase changed;
- ``["deploy_failed", server, attempt, reason]``: a deployment attempt failed (it is retried);
- ``["done", server, fields]``: the server's final result (:func:`result_fields`), sent after
  its last line.

Everything in a message is msgpack-able (Dask's requirement for events).

Flow control: the client acknowledges the line text it has taken in (``Client.run`` of the
agent's ``ack``, every ``RELAY_ACK_BYTES``, once its store keeps up); a worker with more than
``RELAY_UNACKED_BYTES`` of an execution's text unacknowledged stops reading that execution's
output (the runners then wait on SSH flow control), so memory stays bounded however fast the
servers write. An acknowledgement that does not come within ``RELAY_ACK_WAIT_S`` (a client gone)
lets the worker go on rather than hang.
"""

from __future__ import annotations

from typing import Any

from cronium_nb.model import Status
from cronium_nb.results import ServerResult

RELAY_FLUSH_S = 0.1  # a worker sends what it has at least this often: live lines well within 1 s
RELAY_BATCH_BYTES = 64 * 2**10  # and at once when this much line text is waiting
RELAY_UNACKED_BYTES = 16 * 2**20  # line text a worker may have sent per execution and not heard back of
RELAY_ACK_BYTES = 4 * 2**20  # the client acknowledges after taking in this much more
RELAY_ACK_WAIT_S = 60.0
# The scheduler keeps the last 1000 events of each topic (distributed.admin.low-level-log-length):
# one topic per executor and batches of at most RELAY_BATCH_BYTES bound what it holds.

LINES, STATUS, DEPLOY_FAILED, DONE = "lines", "status", "deploy_failed", "done"

# The fields of a ServerResult that travel back (the worker column is the client's to fill).
RESULT_FIELDS = (
    "status", "arch", "exit_code", "duration_s", "deploy", "attempts", "error", "error_kind", "outputs",
    "variables", "phases", "helpers",
)  # fmt: skip


def result_fields(result: ServerResult) -> dict[str, Any]:
    """A server's final result as plain data."""
    fields = {name: getattr(result, name) for name in RESULT_FIELDS}
    fields["status"] = result.status.value
    return fields


def apply_fields(result: ServerResult, fields: dict[str, Any]) -> None:
    """Fill ``result`` from :func:`result_fields` data."""
    for name in RESULT_FIELDS:
        setattr(result, name, fields[name])
    result.status = Status(fields["status"])
    result.phases = dict(result.phases or {})
    result.variables = dict(result.variables or {})
