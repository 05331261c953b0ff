"""Secret redaction of streamed output, outputs, variables and errors (no server needed)."""

from __future__ import annotations

import pytest

from cronium_nb.protocol import LineSplitter
from cronium_nb.redaction import Redactor

PEM = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBzyGqkVBVqV2FsbGFjZWFuZGdyb21pdGFyZXByZXR0eWdvb2Q=
-----END OPENSSH PRIVATE KEY-----
"""


def test_each_line_of_a_multi_line_secret_is_redacted() -> None:
    redactor = Redactor([PEM, "tok3n"])
    shown = redactor.text(f"key follows\n{PEM}done with tok3n\n")
    assert "b3BlbnNzaC1rZXkt" not in shown and "BEGIN OPENSSH" not in shown and "tok3n" not in shown
    assert shown.count("\n") == f"key follows\n{PEM}done with tok3n\n".count("\n")  # line count kept
    assert shown.startswith("key follows\n***\n***\n***\n***\ndone with ***")


def test_outputs_and_variables_are_redacted_everywhere_in_them() -> None:
    redactor = Redactor(["s3cret-value"])
    value = {"token": "s3cret-value", "list": ["a s3cret-value b", 1, None], "s3cret-value": True}
    assert redactor.value(value) == {"token": "***", "list": ["a *** b", 1, None], "***": True}


def test_no_secrets_changes_nothing() -> None:
    redactor = Redactor(["", None or ""])
    assert not redactor and redactor.text("abc") == "abc" and redactor.value({"a": "b"}) == {"a": "b"}


@pytest.mark.parametrize("offset", range(-12, 3))
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_a_secret_never_straddles_the_cut_of_a_long_line(offset: int, chunk: int) -> None:
    secret = "SECRET-0123456789"
    redactor = Redactor([secret])
    max_line = 64
    line = ("x" * (max_line + offset) + secret + "y" * 100).encode() + b"\n" + b"z" * 200
    splitter = LineSplitter(max_line, redactor.data, redactor.longest)
    pieces: list[bytes] = []
    for start in range(0, len(line), chunk):
        pieces += splitter.feed(line[start : start + chunk])
    pieces += splitter.flush()
    joined = b"".join(pieces)
    assert b"SECRET" not in joined and b"0123456789" not in joined
    assert all(len(piece) <= max_line for piece in pieces)
    assert joined.count(b"***") == 1 and joined.count(b"z") == 200


def test_blocks_of_short_lines_are_redacted() -> None:
    redactor = Redactor(["pw123456"])
    splitter = LineSplitter(1024, redactor.data, redactor.longest)
    block, count = splitter.feed_block(b"a pw1234")
    assert (block, count) == (b"", 0)
    block, count = splitter.feed_block(b"56 b\nc\nd")
    assert (block, count) == (b"a *** b\nc", 2)
    assert splitter.flush() == [b"d"]


def test_the_text_view_neutralises_terminal_escapes_and_shortens_long_lines() -> None:
    from cronium_nb.notebook.live import DISPLAY_LINE_CHARS, display_text, line_html

    shown = display_text("red \x1b[31mtext\x1b]0;title\x07 tab\tok \x9b")
    assert shown == "red \\x1b[31mtext\\x1b]0;title\\x07 tab\tok \\x9b"
    long = display_text("y" * (DISPLAY_LINE_CHARS + 500))
    assert long == "y" * DISPLAY_LINE_CHARS + " … [500 more characters]"
    assert "\x1b" not in line_html("stdout", "\x1b[2J<b>")
    assert line_html("stdout", "\x1b[2J<b>") == "\\x1b[2J&lt;b&gt;"


def test_a_short_secret_read_from_a_file_with_its_newline_is_still_redacted() -> None:
    redactor = Redactor(["12345\n"])
    assert redactor.text("pin 12345 ok") == "pin *** ok"


def test_tab_separated_revocations_count(tmp_path) -> None:
    import asyncssh

    from cronium_nb.model import Server
    from cronium_nb.ssh.hostkeys import match_known_hosts

    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@revoked\t[127.0.0.1]:2222 ssh-ed25519 {key}\n")
    found = match_known_hosts([known_hosts], Server(name="s", host="127.0.0.1", port=2222))
    assert len(found.revoked) == len(found.all_revoked) == 1 and not found.empty


@pytest.mark.parametrize("host", ["a b", "a\nb", "*", "host,other", "!bad", "a|b", "x#y", "u@h"])
def test_host_names_that_would_forge_known_hosts_lines_are_refused(host: str) -> None:
    from cronium_nb.model import Server

    with pytest.raises(ValueError, match="host must not contain"):
        Server(name="s", host=host)
