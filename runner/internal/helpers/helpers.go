// Package helpers owns the runtime helpers a run's script sees: the helper programs installed
// for a runner session (the embedded Python and Node helper objects, and the shell commands
// cronium.input, cronium.output, ... which are links to the runner binary itself), the run's
// data files, the interpreter command line per script type, and the shell helpers' behaviour
// in bundled mode (JSON files in $CRONIUM_DIR, under a file lock) and API mode (HTTP over the
// run's Unix socket to the orchestrator's runtime service, the token read from a file).
package helpers

import (
	"embed"
	"os"
	"path/filepath"

	"cronium/runner/internal/pyjson"
)

//go:embed resources/cronium.py resources/cronium.js resources/bootstrap.py
var resources embed.FS

// Resources are the helper files every session installs.
var Resources = []string{"cronium.py", "bootstrap.py", "cronium.js"}

// Dir is the helper dir's name inside a work dir (when no session dir holds them).
const Dir = ".cronium"

// Shell maps a shell helper command to its verb.
var Shell = map[string]string{
	"cronium.input":       "input",
	"cronium.output":      "output",
	"cronium.getVariable": "getVariable",
	"cronium.setVariable": "setVariable",
	"cronium.event":       "event",
	"cronium.tool":        "tool",
}

// Run data files in $CRONIUM_DIR.
const (
	InputFile        = "input.json"
	OutputFile       = "output.json"
	VariablesFile    = "variables.json"
	EventFile        = "event.json"
	LockFile         = ".helpers.lock"
	APISocketVar     = "CRONIUM_API_SOCKET"
	APITokenFileVar  = "CRONIUM_API_TOKEN_FILE"
	toolsNeedAPI     = "tool actions need API mode (run the event with api=True, or %%cronium --api)"
	needsCroniumDir  = "cronium helpers need CRONIUM_DIR (they run inside cronium-runner)"
	defaultAPIPrefix = "/v1/executions/"
)

// EventFields are the fields cronium.event knows.
var EventFields = []string{"id", "name", "type", "execution_id", "server", "payload_version", "runner_version", "timeout"}

// Resource returns an embedded helper file.
func Resource(name string) []byte {
	data, err := resources.ReadFile("resources/" + name)
	if err != nil {
		panic(err)
	}
	return data
}

// InstallPrograms writes the helper programs into helperDir, which must not exist yet, and
// returns its bin dir: the resources, and the shell commands as symlinks to executable (the
// runner binary, which acts as the helper its name says). They hold no per-run data, so one
// copy serves every run of a runner session.
func InstallPrograms(helperDir, executable string) (string, error) {
	bin := filepath.Join(helperDir, "bin")
	if err := os.Mkdir(helperDir, 0o700); err != nil {
		return "", err
	}
	if err := os.Mkdir(bin, 0o700); err != nil {
		return "", err
	}
	for _, name := range Resources {
		if err := os.WriteFile(filepath.Join(helperDir, name), Resource(name), 0o666); err != nil {
			return "", err
		}
	}
	for name := range Shell {
		if err := os.Symlink(executable, filepath.Join(bin, name)); err != nil {
			return "", err
		}
	}
	return bin, nil
}

// WriteRunData writes the run's own helper data files.
func WriteRunData(workdir string, input, variables, event any) error {
	for _, f := range []struct {
		name  string
		value any
	}{{InputFile, input}, {VariablesFile, variables}, {EventFile, event}} {
		if err := os.WriteFile(filepath.Join(workdir, f.name), pyjson.Dumps(f.value, pyjson.Options{}), 0o666); err != nil {
			return err
		}
	}
	return nil
}

// InterpreterArgv is the command line that runs a script of scriptType.
func InterpreterArgv(scriptType, interpreter, helperDir, entrypoint string) []string {
	switch scriptType {
	case "python":
		return []string{interpreter, filepath.Join(helperDir, "bootstrap.py"), entrypoint}
	case "node":
		return []string{interpreter, "--require", filepath.Join(helperDir, "cronium.js"), entrypoint}
	}
	return []string{interpreter, entrypoint}
}
