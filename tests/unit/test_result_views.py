"""Results as tables: outputs and variables frames, the result's HTML view, the history and
metrics views, and plain text where no HTML frontend shows them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from cronium_nb import views
from cronium_nb.metrics import Metrics
from cronium_nb.model import Status
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.store import Store
from cronium_nb.views import STATUS_COLOURS, HistoryFrame, MetricsFrame, format_duration


@pytest.fixture
def result(tmp_path: Path) -> ExecutionResult:
    store = Store(tmp_path)
    servers = {
        "web1": ServerResult(
            "web1", Status.SUCCESS, arch="x86_64", exit_code=0, duration_s=1.234,
            outputs={"version": "1.2", "checks": {"disk": "ok", "load": 0.5}, "server": "self-named"},
            variables={"last": {"when": "now"}, "count": 3},
            phases={"connect": 0.1, "deploy": 0.2, "upload": 0.05, "run": 0.8, "cleanup": 0.01},
        ),
        "web2": ServerResult(
            "web2", Status.FAILED, arch="aarch64", exit_code=3, duration_s=75.0, outputs="plain text",
            error="exit code 3 <script>alert(1)</script>\nsecond line", error_kind="script",
            phases={"connect": 0.2, "run": 2.0},
        ),
        "web3": ServerResult("web3", Status.SKIPPED, error="skipped: the rollout stopped after batch 1 of 2"),
    }  # fmt: skip
    yield ExecutionResult("abc123", "deploy-app", Status.PARTIAL, servers, store)
    store.close()


def test_outputs_frame_flattens_objects_one_row_per_server(result: ExecutionResult) -> None:
    frame = result.outputs_frame()
    assert list(frame["server"]) == ["web1", "web2", "web3"]
    assert frame.loc[0, "version"] == "1.2"
    assert frame.loc[0, "checks.disk"] == "ok" and frame.loc[0, "checks.load"] == 0.5
    assert frame.loc[0, "output.server"] == "self-named"  # a key named server does not hide the column
    assert frame.loc[1, "output"] == "plain text"  # not an object: its own column
    assert pd.isna(frame.loc[2, "version"]) and pd.isna(frame.loc[2, "output"])


def test_variables_frame_has_a_column_per_variable(result: ExecutionResult) -> None:
    frame = result.variables_frame()
    assert list(frame["server"]) == ["web1", "web2", "web3"]
    assert frame.loc[0, "last"] == {"when": "now"}  # values as they are, not flattened
    assert frame.loc[0, "count"] == 3
    assert pd.isna(frame.loc[1, "count"])


def test_the_html_view_shows_status_in_colour_durations_errors_and_the_timeline(result: ExecutionResult) -> None:
    shown = result.html()
    assert STATUS_COLOURS[Status.PARTIAL] in shown  # the execution's badge
    for status in (Status.SUCCESS, Status.FAILED, Status.SKIPPED):
        assert STATUS_COLOURS[status] in shown
    assert "1.23 s" in shown and "1 min 15 s" in shown  # durations formatted
    assert ">3</td>" in shown and "3.000000" not in shown  # an exit code stays whole next to a missing one
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown and "<script>" not in shown  # errors escaped
    assert "white-space:pre-wrap" in shown  # their line breaks kept
    assert 'title="run: 0.80 s"' in shown and 'title="connect: 0.10 s"' in shown  # the phase timeline
    assert "1 success, 1 failed, 1 skipped" in shown


def test_outside_a_notebook_frontend_views_are_plain_text(result: ExecutionResult) -> None:
    assert result._repr_html_() is None  # no IPython kernel here
    assert HistoryFrame({"status": ["success"]})._repr_html_() is None
    assert "partial" in repr(result) and "'skipped': 1" in repr(result)


class ZMQInteractiveShell:  # named like ipykernel's shell: what html_frontend looks for
    def __init__(self, allow_stdin: bool) -> None:
        self.kernel = SimpleNamespace(_allow_stdin=allow_stdin)


@pytest.mark.parametrize(
    ("allow_stdin", "env", "expected"), [(True, "", True), (False, "", False), (True, "text", False)]
)
def test_a_kernel_is_an_html_frontend_unless_headless(
    monkeypatch: pytest.MonkeyPatch, result: ExecutionResult, allow_stdin: bool, env: str, expected: bool
) -> None:
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell(allow_stdin))
    monkeypatch.setenv(views.DISPLAY_ENV, env)
    assert views.html_frontend() is expected
    assert (result._repr_html_() is not None) is expected


def test_history_and_metrics_stay_dataframes_with_a_styled_view(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.start_execution("e1", "hello", ["a", "b"])
        store.update_server("e1", "a", status=Status.SUCCESS)
        store.update_server("e1", "b", status=Status.SKIPPED, error="skipped: stopped")
        store.finish_execution("e1", Status.PARTIAL)
        history = HistoryFrame(store.history())
    assert isinstance(history, pd.DataFrame) and history.loc[0, "servers_skipped"] == 1
    assert type(history[history["status"] == "partial"]) is pd.DataFrame  # derived frames are plain
    shown = history.html()
    assert STATUS_COLOURS[Status.PARTIAL] in shown and "hello" in shown
    metrics = Metrics()
    metrics.record_deploy("deployed")
    metrics.record_deploy("cached")
    metrics.record_server(ServerResult("a", phases={"run": 125.0}))
    frame = MetricsFrame(metrics.frame())
    assert frame.set_index("metric").loc["deployments.cache_hit_rate", "value"] == 0.5  # the data unchanged
    shown = frame.html()
    assert "50%" in shown and "2 min 05 s" in shown


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (0.4213, "0.42 s"),
        (12.34, "12.3 s"),
        (125, "2 min 05 s"),
        (3725, "1 h 02 min"),
    ],
)
def test_durations_are_formatted(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
