// Package exitcode owns the runner's own exit codes and the error type that carries one. A
// script's own exit code (0-255, 128+N when killed by signal N) is passed through unchanged;
// these are used only when the runner fails before or around the script, and the result
// message names the failure too, so a script exiting with one of these numbers is never
// mistaken for a runner failure.
package exitcode

import "fmt"

// Code is one of the runner's exit codes.
type Code int

// The runner's exit codes (the same numbers as the Python runner's exitcodes.py).
const (
	Usage              Code = 64 // bad command line, or a helper called wrongly
	BadPayload         Code = 65 // not a gzip tar, an unsafe member, a missing manifest or entrypoint
	NoPayload          Code = 66 // payload file missing or stdin ended early
	ChecksumMismatch   Code = 67 // payload SHA-256 differs from --sha256: nothing was extracted or run
	BadManifest        Code = 68 // manifest.yaml does not match the schema
	InterpreterMissing Code = 69 // bash/sh/python3/node not found on the server
	Internal           Code = 70 // a bug in the runner
	Workdir            Code = 73 // the private work dir could not be created or is unsafe
	BecomeFailed       Code = 74 // become: sudo is missing, or refused to run the script as the user
)

var slugs = map[Code]string{
	Usage: "usage", BadPayload: "bad_payload", NoPayload: "no_payload",
	ChecksumMismatch: "checksum_mismatch", BadManifest: "bad_manifest",
	InterpreterMissing: "interpreter_missing", Internal: "internal", Workdir: "workdir",
	BecomeFailed: "become",
}

// Slug is the code's name in result messages ("bad_payload").
func (c Code) Slug() string {
	if s, ok := slugs[c]; ok {
		return s
	}
	return fmt.Sprintf("code_%d", int(c))
}

// Error is a failure of the runner, with the exit code it maps to.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return e.Message }

// New returns an *Error with a formatted message.
func New(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}
