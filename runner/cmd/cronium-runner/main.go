// Command cronium-runner runs cronium payloads on a server: `version`, `run PAYLOAD` (local
// testing mode, or framed orchestrator mode with --framed), `serve` (a long-lived framed
// session on stdin/stdout), `daemon` (sessions over a private Unix socket) and `helper VERB`.
// Called by the name of a shell helper (cronium.input, cronium.output, ...: links to this
// binary), it acts as that helper. See runner/PROTOCOL.md.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"cronium/runner/internal/daemon"
	"cronium/runner/internal/detach"
	"cronium/runner/internal/execute"
	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/helpers"
	"cronium/runner/internal/payload"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
	"cronium/runner/internal/session"
)

// Flavour is this runner's kind in version and hello ("bundle", "zipapp", "source" were the
// Python runner's).
const Flavour = "static"

const defaultWorkroot = "~/" + protocol.CacheDir + "/runs"

func main() {
	// One P: the runner waits on pipes, sockets and children; with more, the scheduler's
	// handoffs between threads cost a run more CPU than its work (benchmarks/analysis.md).
	runtime.GOMAXPROCS(1)
	os.Exit(run(os.Args))
}

func run(argv []string) int {
	if verb, ok := helpers.Shell[filepath.Base(argv[0])]; ok {
		return helpers.Run(verb, argv[1:], os.Stdin, os.Stdout, os.Stderr)
	}
	// A write to a closed stdout is an error to handle, not a death by SIGPIPE.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	if len(argv) < 2 {
		return usageError("", "the following arguments are required: command")
	}
	command, args := argv[1], argv[2:]
	switch command {
	case "version":
		return version(args)
	case "run":
		return runCommand(args)
	case "serve":
		return serve(args)
	case "daemon":
		return daemonCommand(argv[0], args)
	case "keeper":
		return keeperCommand(args)
	case execute.BecomeCommand: // started by sudo, as the user a run becomes (execute/become.go)
		return execute.BecomeExec()
	case "helper":
		if len(args) < 1 {
			return usageError("helper", "the following arguments are required: verb, args")
		}
		return helpers.Run(args[0], args[1:], os.Stdin, os.Stdout, os.Stderr)
	case "-h", "--help":
		fmt.Println(usage)
		return 0
	}
	return usageError("", fmt.Sprintf("argument command: invalid choice: %s (choose from 'version', 'run', 'serve', 'daemon', 'helper')",
		pyjson.ReprString(command)))
}

const usage = "usage: cronium-runner [-h] {version,run,serve,daemon,helper} ..."

func usageError(command, message string) int {
	prog := "cronium-runner"
	if command != "" {
		prog += " " + command
	}
	fmt.Fprintf(os.Stderr, "%s\n%s: error: %s\n", usage, prog, message)
	return 2
}

// flags is a parsed command line: options with values, switches, positionals.
type flags struct {
	values     map[string]string
	switches   map[string]bool
	positional []string
}

// parse reads args for command: valued and switch name the options it knows.
func parse(command string, args []string, valued, switches []string, positionals int) (*flags, int) {
	f := &flags{values: map[string]string{}, switches: map[string]bool{}}
	isValued := map[string]bool{}
	for _, v := range valued {
		isValued[v] = true
	}
	isSwitch := map[string]bool{}
	for _, s := range switches {
		isSwitch[s] = true
	}
	onlyPositional := false
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if onlyPositional || !strings.HasPrefix(arg, "-") || arg == "-" {
			f.positional = append(f.positional, arg)
			continue
		}
		if arg == "--" {
			onlyPositional = true
			continue
		}
		name, value, hasValue := strings.Cut(arg, "=")
		switch {
		case isSwitch[name] && !hasValue:
			f.switches[name] = true
		case isValued[name]:
			if !hasValue {
				if i+1 >= len(args) {
					return nil, usageError(command, fmt.Sprintf("argument %s: expected one argument", name))
				}
				i++
				value = args[i]
			}
			f.values[name] = value
		default:
			return nil, usageError("", "unrecognized arguments: "+arg)
		}
	}
	if len(f.positional) > positionals {
		return nil, usageError("", "unrecognized arguments: "+strings.Join(f.positional[positionals:], " "))
	}
	return f, -1
}

func machine() string {
	var u syscall.Utsname
	if syscall.Uname(&u) != nil {
		return runtime.GOARCH
	}
	var b strings.Builder
	for _, c := range u.Machine {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

func info() *pyjson.Object {
	return pyjson.NewObject().Set("version", protocol.RunnerVersion).Set("flavour", Flavour).
		Set("arch", machine()).Set("go", runtime.Version()).Set("protocol", protocol.Version)
}

func version(args []string) int {
	f, code := parse("version", args, nil, []string{"--json"}, 0)
	if f == nil {
		return code
	}
	i := info()
	if f.switches["--json"] {
		fmt.Println(string(pyjson.Dumps(i, pyjson.Options{})))
	} else {
		arch, _ := i.Get("arch")
		fmt.Printf("cronium-runner %s (%s, %s)\n", protocol.RunnerVersion, Flavour, arch)
	}
	return 0
}

func expandUser(path string) string {
	if path == "~" || strings.HasPrefix(path, "~/") {
		if home := os.Getenv("HOME"); home != "" {
			return strings.TrimRight(home, "/") + path[1:]
		}
	}
	return path
}

func workroot(f *flags) string {
	root, ok := f.values["--workroot"]
	if !ok {
		root = os.Getenv("CRONIUM_WORKROOT")
		if root == "" {
			root = defaultWorkroot
		}
	}
	return expandUser(root)
}

func maxResultBytes(command string, f *flags) (int64, int) {
	text, ok := f.values["--max-result-bytes"]
	if !ok {
		return 0, -1
	}
	n, err := strconv.ParseInt(text, 10, 64)
	if err != nil || n <= 0 {
		return 0, usageError(command, fmt.Sprintf("argument --max-result-bytes: invalid positive int value: %s", pyjson.ReprString(text)))
	}
	return n, -1
}

func executable() string {
	exe, err := os.Executable()
	if err != nil {
		return os.Args[0]
	}
	return exe
}

var runValued = []string{"--sha256", "--context", "--input", "--workroot", "--report", "--max-result-bytes"}

func runCommand(args []string) int {
	f, code := parse("run", args, runValued, []string{"--framed", "--keep-workdir"}, 1)
	if f == nil {
		return code
	}
	if len(f.positional) < 1 {
		return usageError("run", "the following arguments are required: payload")
	}
	limit, code := maxResultBytes("run", f)
	if code >= 0 {
		return code
	}
	path := f.positional[0]
	framed := f.switches["--framed"]
	var reporter execute.Reporter
	var framedReporter *execute.Framed
	if framed {
		framedReporter = execute.NewFramed(os.Stdout)
		reporter = framedReporter
		framedReporter.Message(session.Hello(info()))
	} else {
		reporter = &execute.Text{ReportPath: f.values["--report"]}
	}
	var in *execute.Input
	data, ctx, err := func() ([]byte, *execute.Context, error) {
		var contextData any = pyjson.NewObject()
		var data []byte
		if framed {
			in = execute.NewInput(os.Stdin)
			line, ok := in.Line()
			if !ok {
				return nil, nil, exitcode.New(exitcode.NoPayload, "stdin ended before the run context line")
			}
			if len(line) > 0 {
				var err error
				if contextData, err = pyjson.Parse(line); err != nil {
					return nil, nil, exitcode.New(exitcode.Usage, "the run context is not valid JSON: %v", err)
				}
			}
			if path == "-" {
				obj, _ := contextData.(*pyjson.Object)
				if obj == nil {
					obj = pyjson.NewObject()
				}
				size, err := session.PayloadSize(obj, "run context needs payload_size for a payload on stdin")
				if err != nil {
					return nil, nil, err
				}
				if data, err = in.Exactly(size); err != nil {
					return nil, nil, err
				}
			}
		} else {
			if path == "-" {
				return nil, nil, exitcode.New(exitcode.Usage, "a payload on stdin needs --framed")
			}
			if file, ok := f.values["--context"]; ok {
				text, err := os.ReadFile(file)
				if err != nil {
					return nil, nil, exitcode.New(exitcode.Usage, "cannot read the run context %s: %s", file, payload.Strerror(err))
				}
				if contextData, err = pyjson.Parse(text); err != nil {
					return nil, nil, exitcode.New(exitcode.Usage, "the run context is not valid JSON: %v", err)
				}
			}
			if input, ok := f.values["--input"]; ok {
				value, err := pyjson.Parse([]byte(input))
				if err != nil {
					return nil, nil, exitcode.New(exitcode.Usage, "--input is not valid JSON: %v", err)
				}
				obj, isObj := contextData.(*pyjson.Object)
				if !isObj {
					return nil, nil, exitcode.New(exitcode.Usage, "the run context must be a JSON object")
				}
				obj.Set("input", value)
			}
		}
		if path != "-" {
			var err error
			if data, err = os.ReadFile(path); err != nil {
				return nil, nil, exitcode.New(exitcode.NoPayload, "cannot read payload %s: %s", path, payload.Strerror(err))
			}
		}
		ctx, err := execute.ContextFrom(contextData)
		return data, ctx, err
	}()
	if err != nil {
		runnerErr := execute.AsRunnerError(err)
		reporter.Message(execute.ErrorResult(runnerErr))
		return int(runnerErr.Code)
	}
	sha, hasSHA := f.values["--sha256"]
	return execute.RunPayload(data, ctx, reporter, in, execute.Options{
		SHA256: sha, HasSHA256: hasSHA, Workroot: workroot(f), KeepWorkdir: f.switches["--keep-workdir"],
		Executable: executable(), MaxResultBytes: limit,
	})
}

func serve(args []string) int {
	f, code := parse("serve", args, []string{"--workroot", "--max-result-bytes"}, nil, 0)
	if f == nil {
		return code
	}
	limit, code := maxResultBytes("serve", f)
	if code >= 0 {
		return code
	}
	identity, _ := session.IdentityOf(executable())
	return session.Serve(execute.NewInput(os.Stdin), execute.NewFramed(os.Stdout), session.Config{
		Workroot: workroot(f), Identity: identity, MaxResultBytes: limit, Info: info(),
	})
}

func daemonCommand(argv0 string, args []string) int {
	f, code := parse("daemon", args,
		[]string{"--socket", "--idle-timeout", "--workroot", "--max-result-bytes", "--identity", "--executable", "--listen-fd", "--helper-dir"},
		[]string{"--session"}, 0)
	if f == nil {
		return code
	}
	socket, ok := f.values["--socket"]
	if !ok {
		return usageError("daemon", "the following arguments are required: --socket")
	}
	idle := 600.0
	if text, ok := f.values["--idle-timeout"]; ok {
		var err error
		if idle, err = strconv.ParseFloat(text, 64); err != nil {
			return usageError("daemon", fmt.Sprintf("argument --idle-timeout: invalid float value: %s", pyjson.ReprString(text)))
		}
	}
	limit, code := maxResultBytes("daemon", f)
	if code >= 0 {
		return code
	}
	root, _ := filepath.Abs(workroot(f))
	socket, _ = filepath.Abs(socket)
	exe := f.values["--executable"]
	if exe == "" {
		exe = executable()
	}
	identity, _ := session.IdentityOf(exe)
	if text, ok := f.values["--identity"]; ok {
		parsed, err := session.ParseIdentity(exe, text)
		if err != nil {
			return usageError("daemon", err.Error())
		}
		identity = parsed
	}
	c := daemon.Config{Socket: socket, IdleTimeout: execute.Seconds(idle), Workroot: root,
		Identity: identity, MaxResultBytes: limit, Argv0: argv0}
	if f.switches["--session"] {
		return session.Serve(execute.NewInput(os.Stdin), execute.NewFramed(os.Stdout), session.Config{
			Workroot: root, Identity: identity, HelperDir: f.values["--helper-dir"], MaxResultBytes: limit, Info: info(),
		})
	}
	if text, ok := f.values["--listen-fd"]; ok {
		fd, err := strconv.Atoi(text)
		if err != nil {
			return usageError("daemon", "argument --listen-fd: invalid int value")
		}
		return daemon.Serve(c, fd)
	}
	return daemon.Start(c)
}

// keeperCommand is a detached run's keeper, started by a session (see package detach): the
// request and payload on stdin, the control FIFO as fd 3 and the spool as fd 4.
func keeperCommand(args []string) int {
	f, code := parse("keeper", args, []string{"--job", "--workroot", "--executable", "--spool-max-bytes", "--max-result-bytes", "--mark"}, nil, 0)
	if f == nil {
		return code
	}
	limit, code := maxResultBytes("keeper", f)
	if code >= 0 {
		return code
	}
	spool, err := strconv.ParseInt(f.values["--spool-max-bytes"], 10, 64)
	if err != nil || spool <= 0 || f.values["--job"] == "" {
		return usageError("keeper", "--job and a positive --spool-max-bytes are required")
	}
	exe := f.values["--executable"]
	if exe == "" {
		exe = executable()
	}
	return detach.Keep(detach.KeeperConfig{JobDir: f.values["--job"], Workroot: workroot(f), Executable: exe,
		SpoolBytes: spool, MaxResultBytes: limit, Mark: f.values["--mark"]})
}
