package execute

import (
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"encoding/json"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/helpers"
	"cronium/runner/internal/manifest"
	"cronium/runner/internal/payload"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// APITokenFile holds the API token in the work dir, mode 0600: never in the environment.
const APITokenFile = ".api-token"

// ResultFileError is the runner_error code of a bad result file (output.json, variables.json).
const ResultFileError = "result_file"

// Options are how RunPayload runs one payload.
type Options struct {
	SHA256         string
	HasSHA256      bool
	Workroot       string
	KeepWorkdir    bool
	HelperDir      string // helper programs already installed (a session's); "": into the work dir
	Executable     string // the runner binary, which the shell helpers link to
	MaxResultBytes int64  // 0: DefaultMaxResultBytes (a run context's max_result_bytes wins)
	Mark           string // the run mark of its processes ("": a new one); a detached run's is in its info.json
}

// ErrorResult is the result message of a run that failed before it started.
func ErrorResult(err *exitcode.Error) *pyjson.Object {
	return pyjson.NewObject().Set("type", "result").Set("exit_code", int(err.Code)).
		Set("runner_error", pyjson.NewObject().Set("code", err.Code.Slug()).Set("message", err.Message))
}

// AsRunnerError returns err as an *exitcode.Error (a bug, when it is none).
func AsRunnerError(err error) *exitcode.Error {
	var runnerErr *exitcode.Error
	if errors.As(err, &runnerErr) {
		return runnerErr
	}
	return &exitcode.Error{Code: exitcode.Internal, Message: "internal error: " + err.Error()}
}

func num(f float64) json.Number { return json.Number(pyjson.FormatFloat(f)) }

// RunPayload verifies, extracts, runs and reports one payload; it returns the runner's exit
// code (the script's own, or the runner's failure's).
func RunPayload(data []byte, ctx *Context, reporter Reporter, in *Input, o Options) int {
	startedAt := Now()
	clock := time.Now()
	timings := pyjson.NewObject().Set("started_at", num(startedAt))
	result := pyjson.NewObject().Set("type", "result").Set("outputs", nil).
		Set("variables", pyjson.NewObject()).Set("timed_out", false)
	workdir := ""
	code := func() int {
		if err := payload.Verify(data, o.SHA256, o.HasSHA256); err != nil {
			return fail(result, err)
		}
		var err error
		if workdir, err = payload.MakeWorkdir(o.Workroot); err != nil {
			workdir = ""
			return fail(result, err)
		}
		sha := ""
		if o.HasSHA256 {
			sha = strings.ToLower(strings.TrimSpace(o.SHA256))
		}
		m, err := payload.Extract(data, workdir, sha)
		if err != nil {
			return fail(result, err)
		}
		extractS := time.Since(clock).Seconds()
		timings.Set("extract_s", num(extractS))
		interpreter, err := exec.LookPath(m.Interpreter())
		if err != nil && !errors.Is(err, exec.ErrDot) {
			return fail(result, exitcode.New(exitcode.InterpreterMissing, "interpreter %s for %s not found",
				pyjson.ReprString(m.Interpreter()), m.Type))
		}
		event := pyjson.NewObject().Set("id", nil).Set("payload_version", nil)
		for _, source := range []*pyjson.Object{m.Event, ctx.Event} {
			for _, k := range source.Keys() {
				v, _ := source.Get(k)
				event.Set(k, v)
			}
		}
		var timeout any = num(m.Timeout)
		if m.Timeout == math.Trunc(m.Timeout) {
			timeout = json.Number(strconv.FormatFloat(m.Timeout, 'f', 0, 64))
		}
		event.Set("name", m.Name).Set("type", m.Type).Set("execution_id", ctx.ExecutionID).
			Set("server", ctx.Server).Set("timeout", timeout).Set("runner_version", protocol.RunnerVersion)
		input := m.Input
		if ctx.HasInput {
			input = ctx.Input
		}
		helperDir := o.HelperDir
		if helperDir == "" {
			helperDir = filepath.Join(workdir, helpers.Dir)
			if _, err := helpers.InstallPrograms(helperDir, o.Executable); err != nil {
				return fail(result, exitcode.New(exitcode.Workdir, "cannot install the helpers: %v", err))
			}
		}
		if err := helpers.WriteRunData(workdir, input, ctx.Variables, event); err != nil {
			return fail(result, exitcode.New(exitcode.Workdir, "cannot write the run's data: %v", err))
		}
		argv := helpers.InterpreterArgv(m.Type, interpreter, helperDir, m.Entrypoint)
		env, err := scriptEnv(m, ctx, workdir, filepath.Join(helperDir, "bin"))
		if err != nil {
			return fail(result, exitcode.New(exitcode.Workdir, "cannot write the API token file: %v", err))
		}
		timings.Set("prepare_s", num(time.Since(clock).Seconds()-extractS))
		supervisor := &Supervisor{Argv: argv, Dir: workdir, Env: env, Timeout: Seconds(m.Timeout),
			Grace: Seconds(m.GracePeriod), Reporter: reporter, Input: in, Become: ctx.Become, Mark: o.Mark}
		if ctx.Become != nil {
			if supervisor.Argv, supervisor.Env, err = ctx.Become.prepare(argv, workdir, helperDir, env, supervisor.Grace, o.Executable); err != nil {
				return fail(result, err)
			}
		}
		outcome, err := supervisor.Run()
		if err != nil {
			return fail(result, err)
		}
		if ctx.Become != nil && ctx.Become.Failure != "" && !outcome.Stopped {
			return fail(result, exitcode.New(exitcode.BecomeFailed, "%s", ctx.Become.Failure))
		}
		timings.Set("script_s", num(outcome.ScriptS))
		limit := o.MaxResultBytes
		if ctx.MaxResultBytes > 0 {
			limit = ctx.MaxResultBytes
		}
		if limit <= 0 {
			limit = DefaultMaxResultBytes
		}
		var problems []string
		outputs, err := ReadResultFile(workdir, helpers.OutputFile, nil, limit, false)
		if err != nil {
			problems = append(problems, err.Error())
		}
		variables, err := ReadResultFile(workdir, helpers.VariablesFile, pyjson.NewObject(), limit, true)
		if err != nil {
			problems = append(problems, err.Error())
			variables = pyjson.NewObject()
		}
		var sig, reason any
		if outcome.Signal != 0 {
			sig = outcome.Signal
		}
		if outcome.Stopped {
			reason = outcome.StopReason
		}
		var runnerError any
		if len(problems) > 0 {
			runnerError = pyjson.NewObject().Set("code", ResultFileError).Set("message", strings.Join(problems, "; "))
		}
		result.Set("exit_code", outcome.ExitCode).Set("signal", sig).Set("timed_out", outcome.TimedOut).
			Set("stop_reason", reason).Set("outputs", outputs).Set("variables", variables).Set("runner_error", runnerError)
		return outcome.ExitCode
	}()
	if workdir != "" && !o.KeepWorkdir {
		os.RemoveAll(workdir)
	}
	if o.KeepWorkdir && workdir != "" {
		result.Set("workdir", workdir)
	}
	timings.Set("total_s", num(time.Since(clock).Seconds())).Set("finished_at", num(Now()))
	result.Set("timings", timings)
	if size := len(pyjson.Compact(result)); size > protocol.MaxFrame-4096 {
		result.Set("outputs", nil).Set("variables", pyjson.NewObject()).Set("runner_error", pyjson.NewObject().
			Set("code", ResultFileError).
			Set("message", fmt.Sprintf("the result is %s, over the %s frame limit", humanSize(int64(size)), limitText(protocol.MaxFrame))))
	}
	reporter.Message(result)
	return code
}

func fail(result *pyjson.Object, err error) int {
	runnerErr := AsRunnerError(err)
	result.Set("exit_code", int(runnerErr.Code)).
		Set("runner_error", pyjson.NewObject().Set("code", runnerErr.Code.Slug()).Set("message", runnerErr.Message))
	return int(runnerErr.Code)
}

// scriptEnv is the script's environment: the runner's, the manifest's, the run context's
// (secret) values, and the CRONIUM_* variables.
func scriptEnv(m *manifest.Manifest, ctx *Context, workdir, binDir string) ([]string, error) {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "_PYI_") || strings.HasPrefix(k, "_MEI") {
			continue
		}
		if _, seen := env[k]; !seen {
			env[k] = v
		}
	}
	if orig, ok := env["LD_LIBRARY_PATH_ORIG"]; ok {
		env["LD_LIBRARY_PATH"] = orig
		delete(env, "LD_LIBRARY_PATH_ORIG")
	}
	for _, kv := range m.Env {
		env[kv[0]] = kv[1]
	}
	for _, k := range ctx.Env.Keys() {
		v, _ := ctx.Env.Get(k)
		env[k] = v.(string)
	}
	if _, ok := env["PYTHONUNBUFFERED"]; !ok {
		env["PYTHONUNBUFFERED"] = "1" // so that Python scripts' output streams live
	}
	if ctx.HasAPI {
		tokenFile := filepath.Join(workdir, APITokenFile)
		f, err := os.OpenFile(tokenFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		_, err = f.WriteString(ctx.APIToken)
		if closeErr := f.Close(); err == nil {
			err = closeErr
		}
		if err != nil {
			return nil, err
		}
		env[helpers.APISocketVar], env[helpers.APITokenFileVar] = ctx.APISocket, tokenFile
	}
	path := env["PATH"]
	if path == "" {
		path = "/usr/local/bin:/usr/bin:/bin"
	}
	env["CRONIUM_DIR"] = workdir
	env["CRONIUM_EXECUTION_ID"] = ctx.ExecutionID
	env["CRONIUM_EVENT"] = m.Name
	env["CRONIUM_SERVER"] = ctx.Server
	env["PATH"] = binDir + ":" + path
	list := make([]string, 0, len(env))
	for k, v := range env {
		list = append(list, k+"="+v)
	}
	sort.Strings(list)
	return list, nil
}

var fileTypes = map[uint32]string{
	syscall.S_IFIFO: "a FIFO", syscall.S_IFCHR: "a character device", syscall.S_IFBLK: "a block device",
	syscall.S_IFDIR: "a directory", syscall.S_IFSOCK: "a socket", syscall.S_IFLNK: "a symbolic link",
}

// ReadResultFile reads a result file the script left in its work dir without trusting it:
// opened without following a symlink and without blocking on a FIFO, a regular file only, at
// most limit bytes, valid JSON (an object when object is set). A missing file is fallback.
func ReadResultFile(workdir, name string, fallback any, limit int64, object bool) (any, error) {
	fd, err := syscall.Open(filepath.Join(workdir, name), syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err == syscall.ENOENT {
		return fallback, nil
	}
	if err == syscall.ELOOP {
		return fallback, fmt.Errorf("%s is a symbolic link, not a regular file", name)
	}
	if err != nil {
		return fallback, fmt.Errorf("cannot open %s: %s", name, payload.Strerror(err))
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return fallback, fmt.Errorf("cannot read %s: %s", name, payload.Strerror(err))
	}
	if kind := st.Mode & syscall.S_IFMT; kind != syscall.S_IFREG {
		what := fileTypes[kind]
		if what == "" {
			what = "not a regular file"
		}
		return fallback, fmt.Errorf("%s is %s, not a regular file", name, what)
	}
	if st.Size > limit {
		return fallback, fmt.Errorf("%s is %s, over the %s limit", name, humanSize(st.Size), limitText(limit))
	}
	data := make([]byte, 0, st.Size+1)
	buf := make([]byte, 65536)
	for int64(len(data)) <= limit {
		n, err := f.Read(buf)
		data = append(data, buf[:n]...)
		if err != nil || n == 0 {
			break
		}
	}
	if int64(len(data)) > limit {
		return fallback, fmt.Errorf("%s grew over the %s limit", name, limitText(limit))
	}
	value, err := pyjson.Parse(data)
	if err != nil {
		return fallback, fmt.Errorf("%s is not valid JSON: %v", name, err)
	}
	if _, isObject := value.(*pyjson.Object); object && !isObject {
		return fallback, fmt.Errorf("%s holds %s, not a JSON object", name, typeName(value))
	}
	return value, nil
}

func typeName(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case string:
		return "a string"
	case []any:
		return "a list"
	}
	return "a number"
}

// humanSize is a size in decimal megabytes ("40 MB"), or bytes when under one.
func humanSize(n int64) string {
	if n < 1000*1000 {
		return fmt.Sprintf("%d bytes", n)
	}
	return strings.TrimSuffix(fmt.Sprintf("%.1f", float64(n)/1e6), ".0") + " MB"
}

// limitText is a limit in MiB when it is whole MiB ("16 MiB"), else bytes.
func limitText(n int64) string {
	if n%(1024*1024) == 0 {
		return fmt.Sprintf("%d MiB", n/(1024*1024))
	}
	return fmt.Sprintf("%d bytes", n)
}
