"""Event checks the runner would otherwise make on the server, made before anything is sent."""

from __future__ import annotations

import math

import pytest

from cronium_nb import Event, EventError
from cronium_nb.model import MAX_INPUT_DEPTH


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": math.nan}, "timeout must be a positive number"),
        ({"timeout": math.inf}, "field 'timeout' must be a positive, finite number of seconds, got inf"),
        ({"grace_period": math.inf}, "field 'grace_period' must be a positive, finite number"),
        ({"input": {"x": math.nan}}, "input is not JSON-able"),
        ({"input": nested(MAX_INPUT_DEPTH + 1)}, f"input is nested deeper than {MAX_INPUT_DEPTH} levels"),
        ({"input": nested(2000)}, f"input is nested deeper than {MAX_INPUT_DEPTH} levels"),
    ],
)
def test_values_the_runner_refuses_are_refused_here(options: dict, message: str) -> None:
    with pytest.raises(EventError, match=message):
        Event(name="limits", script="true", **options)


def test_input_at_the_depth_limit_is_fine() -> None:
    """The runner takes it: the run context that holds it is then exactly 512 levels deep."""
    assert Event(name="deep", script="true", input=nested(MAX_INPUT_DEPTH)).input


def test_a_variable_too_deep_for_the_next_run_context_is_named() -> None:
    from cronium_nb.model import MAX_VARIABLE_DEPTH, variable_too_deep

    assert variable_too_deep("ok", nested(MAX_VARIABLE_DEPTH)) is None
    assert variable_too_deep("deep", nested(MAX_VARIABLE_DEPTH + 1)) == (
        f"variable 'deep' is nested deeper than {MAX_VARIABLE_DEPTH} levels"
    )
