// Package session owns `cronium-runner serve`: a long-lived runner session that runs one framed
// payload after another from its input (stdin, or a daemon connection), with the session's
// helper programs installed once, and the stale-binary check (a runner whose file on disk was
// removed or replaced since it started says "stale" and leaves, so the orchestrator deploys
// again instead of running an old runner). Detached runs' requests (detach, attach, release,
// jobs) are handed to package detach.
package session

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"cronium/runner/internal/apisocket"
	"cronium/runner/internal/detach"
	"cronium/runner/internal/execute"
	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/helpers"
	"cronium/runner/internal/hostid"
	"cronium/runner/internal/payload"
	"cronium/runner/internal/pyjson"
)

// MaxStdinPayload is the largest payload a request may announce.
const MaxStdinPayload = 256 * 1024 * 1024

// Identity is the runner executable's path, inode, size and mtime (ns) when it started: the
// same metadata the deployment's listing holds.
type Identity struct {
	Path              string
	Ino, Size, MtimeN int64
}

// IdentityOf stats path; ok false when it is gone.
func IdentityOf(path string) (Identity, bool) {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return Identity{Path: path}, false
	}
	return Identity{path, int64(st.Ino), st.Size, st.Mtim.Nano()}, true
}

// Current says whether the executable on disk is still the one of id.
func (id Identity) Current() bool {
	now, ok := IdentityOf(id.Path)
	return ok && now == id
}

// String is the identity as the daemon passes it to its sessions: "ino:size:mtime_ns".
func (id Identity) String() string { return fmt.Sprintf("%d:%d:%d", id.Ino, id.Size, id.MtimeN) }

// ParseIdentity reads String's form back, for path.
func ParseIdentity(path, text string) (Identity, error) {
	parts := strings.Split(text, ":")
	if len(parts) != 3 {
		return Identity{}, fmt.Errorf("bad identity %q", text)
	}
	id := Identity{Path: path}
	for i, target := range []*int64{&id.Ino, &id.Size, &id.MtimeN} {
		v, err := strconv.ParseInt(parts[i], 10, 64)
		if err != nil {
			return Identity{}, fmt.Errorf("bad identity %q", text)
		}
		*target = v
	}
	return id, nil
}

// Hello is the hello message's fields (the caller adds pid and serve).
func Hello(info *pyjson.Object) *pyjson.Object {
	hello := pyjson.NewObject().Set("type", "hello")
	for _, k := range info.Keys() {
		v, _ := info.Get(k)
		hello.Set(k, v)
	}
	return hello.Set("pid", os.Getpid())
}

// HelperDir creates a private dir for a session's helper programs,
// session-<host id>-<pid>-<random>/helpers in the work root, after sweeping those of gone
// sessions; "" when the work root is unsafe or full (each run then fails on it, with the
// reason).
func HelperDir(workroot, executable string) string {
	if payload.PrivateDir(workroot) != nil {
		return ""
	}
	payload.SweepStale(workroot)
	dir, err := os.MkdirTemp(workroot, fmt.Sprintf("session-%s-%d-", hostid.ID(), os.Getpid()))
	if err != nil {
		return ""
	}
	helperDir := filepath.Join(dir, "helpers")
	if _, err := helpers.InstallPrograms(helperDir, executable); err != nil {
		os.RemoveAll(dir)
		return ""
	}
	return helperDir
}

// Config is what a session needs.
type Config struct {
	Workroot       string
	Identity       Identity // the runner as it was when this session (or its daemon) started
	HelperDir      string   // installed by the daemon; "": the session installs its own
	MaxResultBytes int64
	Info           *pyjson.Object // version fields for hello
}

// Serve runs payloads one after another, each as `run - --framed` would, until the input
// ends. Each request is a JSON line {"op": "run", "sha256": ..., "payload_size": ...,
// <run context>} followed by the payload; the run's frames end with its result message.
func Serve(in *execute.Input, reporter *execute.Framed, c Config) int {
	reporter.Message(Hello(c.Info).Set("serve", true))
	helperDir := c.HelperDir
	if helperDir == "" { // `serve` (a daemon's sessions are given the daemon's helper dir)
		apisocket.SweepHome()
		helperDir = HelperDir(c.Workroot, c.Identity.Path)
		if helperDir != "" {
			defer os.RemoveAll(filepath.Dir(helperDir))
		}
	}
	intact := c.Identity.Current() // the whole runner, once per session: one file here
	for {
		line, ok := in.Line()
		if !ok {
			return 0 // the orchestrator closed the session
		}
		if len(strings.TrimSpace(string(line))) == 0 {
			line = []byte("{}")
		}
		parsed, err := pyjson.Parse(line)
		if err != nil {
			fmt.Fprintf(os.Stderr, "cronium-runner: bad request line: %v\n", err)
			return int(exitcode.Internal)
		}
		request, isObj := parsed.(*pyjson.Object)
		if !isObj {
			fmt.Fprintf(os.Stderr, "cronium-runner: bad request line: not a JSON object\n")
			return int(exitcode.Internal)
		}
		op, _ := request.Get("op")
		jobs := detach.Config{Workroot: c.Workroot, Executable: c.Identity.Path, MaxResultBytes: c.MaxResultBytes}
		switch op {
		case "run", "detach":
		case "attach":
			detach.Attach(request, in, reporter, jobs)
			continue
		case "release":
			detach.Release(request, reporter, jobs)
			continue
		case "jobs":
			detach.Jobs(reporter, jobs)
			continue
		default:
			continue // e.g. a stop that arrived after its run had ended
		}
		if !intact || !c.Identity.Current() {
			reporter.Message(pyjson.NewObject().Set("type", "stale").
				Set("reason", "the runner on disk changed since this process started"))
			return 0
		}
		data, ctx, err := readRequest(in, request)
		if err != nil {
			runnerErr := execute.AsRunnerError(err)
			reporter.Message(execute.ErrorResult(runnerErr))
			if runnerErr.Code == exitcode.NoPayload {
				return int(runnerErr.Code)
			}
			continue
		}
		if op == "detach" {
			detach.Start(line, request, data, in, reporter, jobs)
			continue
		}
		sha, hasSHA := request.Get("sha256")
		shaText, _ := sha.(string)
		execute.RunPayload(data, ctx, reporter, in, execute.Options{
			SHA256: shaText, HasSHA256: hasSHA && sha != nil, Workroot: c.Workroot, HelperDir: helperDir,
			Executable: c.Identity.Path, MaxResultBytes: c.MaxResultBytes,
		})
		if in.Ended() {
			return 0
		}
	}
}

func readRequest(in *execute.Input, request *pyjson.Object) ([]byte, *execute.Context, error) {
	size, err := PayloadSize(request, "a run request needs payload_size")
	if err != nil {
		return nil, nil, err
	}
	data, err := in.Exactly(size)
	if err != nil {
		return nil, nil, err
	}
	ctx, err := execute.ContextFrom(request)
	return data, ctx, err
}

// PayloadSize is a request's payload_size: a whole number, 0 < size <= MaxStdinPayload.
func PayloadSize(request *pyjson.Object, message string) (int, error) {
	v, _ := request.Get("payload_size")
	f, ok := pyjson.Float(v)
	if v == true {
		f, ok = 1, true
	} else if !pyjson.IsInt(v) {
		ok = false
	}
	if !ok || f <= 0 || f > MaxStdinPayload {
		return 0, exitcode.New(exitcode.Usage, "%s", message)
	}
	return int(f), nil
}
