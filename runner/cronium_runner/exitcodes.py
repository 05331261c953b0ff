"""Exit codes of the runner itself. A script's own exit code (0-255, 128+N when it was killed
by signal N) is passed through unchanged; these are used only when the runner fails before or
around the script, and the framed protocol's result message names the failure too, so that a
script exiting with one of these numbers is never mistaken for a runner failure."""

from enum import IntEnum


class RunnerExit(IntEnum):
    USAGE = 64  # bad command line, or a helper called wrongly
    BAD_PAYLOAD = 65  # not a gzip tar, an unsafe member, a missing manifest or entrypoint
    NO_PAYLOAD = 66  # payload file missing or stdin ended early
    CHECKSUM_MISMATCH = 67  # payload SHA-256 differs from --sha256: nothing was extracted or run
    BAD_MANIFEST = 68  # manifest.yaml does not match the schema
    INTERPRETER_MISSING = 69  # bash/sh/python3/node not found on the server
    INTERNAL = 70  # a bug in the runner
    WORKDIR = 73  # the private work dir could not be created or is unsafe

    @property
    def slug(self) -> str:
        return self.name.lower()


class RunnerError(Exception):
    """A failure of the runner, with the exit code it maps to."""

    def __init__(self, code: RunnerExit, message: str) -> None:
        super().__init__(message)
        self.code = code
