"""One exception hierarchy: every error cronium_nb exports is a CroniumError with a known kind."""

from __future__ import annotations

import typing

import cronium_nb
from cronium_nb.errors import ERROR_KINDS, ConnectError, CroniumError, ErrorKind, HostKeyError


def test_error_kinds_are_the_literal_type() -> None:
    assert typing.get_args(ErrorKind) == ERROR_KINDS


def test_every_exported_error_is_a_cronium_error_with_a_known_kind() -> None:
    errors = [
        getattr(cronium_nb, name)
        for name in cronium_nb.__all__
        if isinstance(getattr(cronium_nb, name), type) and issubclass(getattr(cronium_nb, name), Exception)
    ]
    assert len(errors) >= 14
    for error in errors:
        assert issubclass(error, CroniumError), error
        assert error.error_kind in ERROR_KINDS, error


def test_connect_errors_carry_their_kind() -> None:
    assert ConnectError("no route").error_kind == "unreachable"
    assert ConnectError("refused our key", error_kind="auth").error_kind == "auth"
    assert HostKeyError("changed").error_kind == "host_key"
    assert isinstance(HostKeyError("changed"), ConnectError)


def test_bad_arguments_are_value_errors_too() -> None:
    for error in (cronium_nb.EventError, cronium_nb.InventoryError, cronium_nb.ManifestError):
        assert issubclass(error, ValueError)
