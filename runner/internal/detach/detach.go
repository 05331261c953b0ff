// Package detach owns detached runs: a run handed to a keeper process of its own on the server,
// so that the script goes on when the orchestrator's connection (and the session that took the
// request) goes away, and its output waits on the server until an orchestrator comes back for it.
//
// Each detached run has a private job dir, <workroot>/jobs/<job> (0700, like every dir of the
// work root), holding:
//
//	spool        the run's frames as the wire carries them (magic, then O/E/M frames), bounded
//	             (frame headers count): past the limit output is counted, not written, and a spool_dropped
//	             message before the result says how many lines and bytes were dropped
//	control      a FIFO (0600) that the keeper holds open: control lines written to it reach
//	             the run ({"op": "stop", ...}); opening it for writing without blocking fails
//	             with ENXIO once no keeper holds it, which is how a gone keeper is noticed
//	info.json    job, execution id, server, keeper pid, host id, start time, spool limit, and the
//	             run mark of the script's processes (a lost run's are found and killed by it)
//	result.json  the result message, once the run has ended
//
// A session answers "detach" (start a keeper, then follow), "attach" (follow: the spool from
// the start, then live, until the result; a stop line from the orchestrator goes to the
// control FIFO), "release" (the orchestrator stored the result: remove the job dir) and "jobs"
// (list). Job dirs of runs that ended and were never released are removed after KeepFor.
// Secret values of the run context reach the keeper on its stdin only, never a file.
package detach

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"cronium/runner/internal/execute"
	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/hostid"
	"cronium/runner/internal/payload"
	"cronium/runner/internal/proctree"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// Names in a job dir, and where job dirs live in the work root.
const (
	JobsDir     = "jobs"
	SpoolFile   = "spool"
	ControlFile = "control"
	InfoFile    = "info.json"
	ResultFile  = "result.json"
)

const (
	// DefaultSpoolBytes bounds a run's spooled output when the request names no limit.
	DefaultSpoolBytes = 64 * 1024 * 1024
	// MaxSpoolBytes is the largest limit a request may ask for.
	MaxSpoolBytes = 4 * 1024 * 1024 * 1024
	// KeepFor is how long the job dir of a run that ended stays when nobody releases it.
	KeepFor = 7 * 24 * time.Hour
	// PollInterval is how often a follower looks for new spool bytes (at most this much latency).
	PollInterval = 100 * time.Millisecond
	// NoJob is the runner_error code of an attach or release of a job that is not there.
	NoJob = "no_job"
	// Lost is the runner_error code of a run whose keeper is gone without a result.
	Lost = "detached_lost"
)

// validJobName says whether job is a name the orchestrator chooses: 1 to 64 of
// A-Z, a-z, 0-9, "_" and "-", safe as a file name.
func validJobName(job string) bool {
	if len(job) == 0 || len(job) > 64 {
		return false
	}
	for _, c := range []byte(job) {
		ok := c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-'
		if !ok {
			return false
		}
	}
	return true
}

// Config is what the session's detached-run requests need.
type Config struct {
	Workroot       string
	Executable     string // the runner binary: the keeper is this binary, and the helpers link to it
	MaxResultBytes int64
	// KeeperCommand starts the keeper (tests substitute their own); nil: this binary, "keeper".
	KeeperCommand func(args ...string) *exec.Cmd
}

func (c Config) keeper(args ...string) *exec.Cmd {
	if c.KeeperCommand != nil {
		return c.KeeperCommand(args...)
	}
	cmd := exec.Command("/proc/self/exe", append([]string{"keeper"}, args...)...)
	cmd.Args[0] = "cronium-runner"
	return cmd
}

// Dir is the job dir of job (after checking the name).
func Dir(workroot, job string) (string, error) {
	if !validJobName(job) {
		return "", exitcode.New(exitcode.Usage, "bad detached job name %s: [A-Za-z0-9_-]{1,64} expected", pyjson.ReprString(job))
	}
	return filepath.Join(workroot, JobsDir, job), nil
}

func jobOf(request *pyjson.Object) string {
	v, _ := request.Get("job")
	s, _ := v.(string)
	return s
}

func resultError(code, message string) *pyjson.Object {
	return pyjson.NewObject().Set("type", "result").Set("exit_code", nil).
		Set("runner_error", pyjson.NewObject().Set("code", code).Set("message", message))
}

// Start answers a "detach" request whose payload (data) has been read: it creates the job dir,
// starts the keeper (given the request line and the payload on its stdin), says "detached" and
// follows the run like "attach". A request refused before the keeper starts gets a result.
func Start(line []byte, request *pyjson.Object, data []byte, in *execute.Input, out *execute.Framed, c Config) {
	started, err := start(line, request, data, c)
	if err != nil {
		out.Message(execute.ErrorResult(execute.AsRunnerError(err)))
		return
	}
	out.Message(pyjson.NewObject().Set("type", "detached").Set("job", started.Job).Set("pid", started.PID).
		Set("started_at", json.Number(pyjson.FormatFloat(started.StartedAt))))
	follow(started.Job, in, out, c)
}

// Info is info.json.
type Info struct {
	Job         string  `json:"job"`
	ExecutionID string  `json:"execution_id"`
	Server      string  `json:"server"`
	PID         int     `json:"pid"`
	Host        string  `json:"host"`
	StartedAt   float64 `json:"started_at"`
	SpoolBytes  int64   `json:"spool_max_bytes"`
	Mark        string  `json:"mark"` // proctree.MarkVariable's value in the script's processes
}

func spoolLimit(request *pyjson.Object) (int64, error) {
	v, ok := request.Get("spool_max_bytes")
	if !ok || v == nil {
		return DefaultSpoolBytes, nil
	}
	f, isNumber := pyjson.Float(v)
	if !isNumber || !pyjson.IsInt(v) || f <= 0 || f > MaxSpoolBytes {
		return 0, exitcode.New(exitcode.Usage, "'spool_max_bytes' must be a whole number of bytes, 1 to %d", int64(MaxSpoolBytes))
	}
	return int64(f), nil
}

func start(line []byte, request *pyjson.Object, data []byte, c Config) (*Info, error) {
	job := jobOf(request)
	dir, err := Dir(c.Workroot, job)
	if err != nil {
		return nil, err
	}
	limit, err := spoolLimit(request)
	if err != nil {
		return nil, err
	}
	sha, hasSHA := request.Get("sha256")
	shaText, _ := sha.(string)
	if err := payload.Verify(data, shaText, hasSHA && sha != nil); err != nil {
		return nil, err // nothing is started for a payload that is not the one announced
	}
	if _, err := execute.ContextFrom(request); err != nil {
		return nil, err
	}
	root := filepath.Dir(dir)
	if err := payload.PrivateDir(root); err != nil {
		return nil, err
	}
	Sweep(c.Workroot)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, exitcode.New(exitcode.Usage, "a detached run %s exists already on this server", job)
		}
		return nil, exitcode.New(exitcode.Workdir, "cannot create the job dir %s: %s", dir, payload.Strerror(err))
	}
	info, err := launch(dir, job, line, data, limit, request, c)
	if err != nil {
		os.RemoveAll(dir)
		return nil, exitcode.New(exitcode.Workdir, "cannot start the detached run: %v", err)
	}
	return info, nil
}

// launch creates the spool and the control FIFO and starts the keeper with both (fds 3 and 4:
// the FIFO is held open from the start, so the run counts as alive from the first moment).
func launch(dir, job string, line, data []byte, limit int64, request *pyjson.Object, c Config) (*Info, error) {
	spool, err := os.OpenFile(filepath.Join(dir, SpoolFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	defer spool.Close()
	if _, err := spool.WriteString(protocol.Magic); err != nil {
		return nil, err
	}
	fifo := filepath.Join(dir, ControlFile)
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		return nil, err
	}
	control, err := os.OpenFile(fifo, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer control.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	stdin, feed, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer stdin.Close()
	mark := execute.NewMark() // not a secret: only this user can read a process's environment
	args := []string{"--job", dir, "--workroot", c.Workroot, "--executable", c.Executable,
		"--spool-max-bytes", fmt.Sprint(limit), "--mark", mark}
	if c.MaxResultBytes > 0 {
		args = append(args, "--max-result-bytes", fmt.Sprint(c.MaxResultBytes))
	}
	cmd := c.keeper(args...)
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, devnull, devnull
	cmd.ExtraFiles = []*os.File{control, spool}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // not in the session's group: it outlives it
	if err := cmd.Start(); err != nil {
		feed.Close()
		return nil, err
	}
	// Not part of this session's next run: its stop must not reach the keeper (nor reap it).
	proctree.KeepApart(cmd.Process.Pid)
	go func() { // reaped if it ends while this session lives
		cmd.Wait()
		proctree.Rejoin(cmd.Process.Pid)
	}()
	// The request (with the run's secret env) and the payload go on the keeper's stdin only.
	_, writeErr := feed.Write(append(append(append([]byte(nil), line...), '\n'), data...))
	feed.Close()
	if writeErr != nil {
		abandon(cmd.Process)
		return nil, writeErr
	}
	executionID, _ := request.Get("execution_id")
	server, _ := request.Get("server")
	info := &Info{Job: job, ExecutionID: pyjson.Str(executionID), Server: pyjson.Str(server), PID: cmd.Process.Pid,
		Host: hostid.ID(), StartedAt: execute.Now(), SpoolBytes: limit, Mark: mark}
	if err := writeJSON(filepath.Join(dir, InfoFile), info); err != nil { // e.g. a full disk
		abandon(cmd.Process)
		return nil, err
	}
	return info, nil
}

// abandon stops a keeper whose start failed (its job dir is removed next, so nobody could
// follow or stop it later). SIGTERM, not SIGKILL: a keeper already running the script stops
// the script's whole tree, as on any stop; one that is not that far yet simply ends.
func abandon(keeper *os.Process) {
	keeper.Signal(syscall.SIGTERM)
}

// writeJSON replaces path atomically with v as JSON (mode 0600).
func writeJSON(path string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	temporary := fmt.Sprintf("%s.tmp-%d", path, os.Getpid())
	if err := os.WriteFile(temporary, data, 0o600); err != nil {
		return err
	}
	return os.Rename(temporary, path)
}

// Alive says whether the job's keeper still runs: it holds the control FIFO open for reading,
// so opening it for writing without blocking succeeds.
func Alive(dir string) bool {
	fd, err := syscall.Open(filepath.Join(dir, ControlFile), syscall.O_WRONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return false // ENXIO: nobody reads it
	}
	syscall.Close(fd)
	return true
}

// maxStopReason bounds a stop line's reason: the line must fit one FIFO write (PIPE_BUF).
const maxStopReason = 256

// stopLine is the control line of an orchestrator's stop request: its op and reason only,
// short enough to reach the keeper in one piece (a line cut short would swallow the next).
func stopLine(request *pyjson.Object) []byte {
	line := pyjson.NewObject().Set("op", "stop")
	if reason, ok := request.Get("reason"); ok {
		text := pyjson.Str(reason)
		if len(text) > maxStopReason {
			text = strings.ToValidUTF8(text[:maxStopReason], "")
		}
		line.Set("reason", text)
	}
	return pyjson.Compact(line)
}

// sendControl writes one control line to the running job.
func sendControl(dir string, line []byte) {
	fd, err := syscall.Open(filepath.Join(dir, ControlFile), syscall.O_WRONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer syscall.Close(fd)
	syscall.Write(fd, append(append([]byte(nil), line...), '\n')) // under PIPE_BUF: one piece
}

// Attach answers an "attach" request: "attached", then the run's frames from the start of its
// spool, then live, until its result.
func Attach(request *pyjson.Object, in *execute.Input, out *execute.Framed, c Config) {
	job := jobOf(request)
	dir, err := Dir(c.Workroot, job)
	if err != nil {
		out.Message(execute.ErrorResult(execute.AsRunnerError(err)))
		return
	}
	info, err := readInfo(dir)
	if err != nil {
		out.Message(resultError(NoJob, fmt.Sprintf("no detached run %s on this server (fetched already, expired, or never started)", job)))
		return
	}
	out.Message(pyjson.NewObject().Set("type", "attached").Set("job", job).Set("pid", info.PID).
		Set("started_at", json.Number(pyjson.FormatFloat(info.StartedAt))))
	follow(job, in, out, c)
}

func readInfo(dir string) (*Info, error) {
	data, err := readPrivate(filepath.Join(dir, InfoFile))
	if err != nil {
		return nil, err
	}
	var info Info
	if err := json.Unmarshal(data, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// readPrivate reads a small file of a job dir, never through a symlink.
func readPrivate(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, protocol.MaxFrame))
}

// readResult is the job's result.json, or nil while it has none (or not a whole one).
func readResult(dir string) []byte {
	data, err := readPrivate(filepath.Join(dir, ResultFile))
	if err != nil || !json.Valid(data) {
		return nil
	}
	return data
}

// follow relays the job's spool to out from its start, then as it grows, until the result
// frame; stop lines from in go to the job's control FIFO. It returns when the result has been
// sent, when in ends (the orchestrator left: the run goes on), or when out fails.
func follow(job string, in *execute.Input, out *execute.Framed, c Config) {
	dir, _ := Dir(c.Workroot, job)
	spool, err := os.OpenFile(filepath.Join(dir, SpoolFile), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		out.Message(resultError(NoJob, fmt.Sprintf("no detached run %s on this server (fetched already, expired, or never started)", job)))
		return
	}
	defer spool.Close()
	var decoder protocol.Decoder
	buf := make([]byte, 65536)
	gone := false // the keeper was found gone: one more read, then the run is lost
	for {
		n, _ := spool.Read(buf)
		if n > 0 {
			frames, err := decoder.Feed(buf[:n])
			for _, frame := range frames {
				if out.Frame(frame.Kind, frame.TS, frame.Payload) != nil {
					return
				}
				if frame.Kind == protocol.Message && isResult(frame.Payload) {
					return
				}
			}
			if err != nil {
				out.Message(resultError(Lost, fmt.Sprintf("the detached run's spool is corrupt: %v", err)))
				return
			}
			continue
		}
		if gone {
			// result.json is written before the result frame: a spool write that failed
			// after it (a full disk) leaves the result there.
			if result := readResult(dir); result != nil {
				out.Frame(protocol.Message, execute.Now(), result)
				return
			}
			if info, err := readInfo(dir); err == nil {
				stopLost(info)
			}
			out.Message(resultError(Lost, "the detached run's keeper process is gone and left no result "+
				"(killed, or the server restarted); its output up to then was sent"))
			return
		}
		if !Alive(dir) {
			gone = true // it may have written its last frames just before it went: read once more
			continue
		}
		messages, ended := in.Wait(PollInterval)
		for _, message := range messages {
			if obj, ok := message.(*pyjson.Object); ok {
				if op, _ := obj.Get("op"); op == "stop" {
					sendControl(dir, stopLine(obj))
				}
			}
		}
		if ended {
			return // the orchestrator left; the run goes on
		}
	}
}

func isResult(message []byte) bool {
	parsed, err := pyjson.Parse(message)
	if err != nil {
		return false
	}
	obj, ok := parsed.(*pyjson.Object)
	if !ok {
		return false
	}
	kind, _ := obj.Get("type")
	return kind == "result"
}

// Release answers a "release" request: the orchestrator has stored the run's result, so its
// job dir goes (not while the run goes on).
func Release(request *pyjson.Object, out *execute.Framed, c Config) {
	job := jobOf(request)
	reply := pyjson.NewObject().Set("type", "released").Set("job", job)
	dir, err := Dir(c.Workroot, job)
	switch {
	case err != nil:
		reply.Set("removed", false).Set("reason", err.Error())
	case Alive(dir) && !exists(filepath.Join(dir, ResultFile)): // ended: its keeper may still be exiting
		reply.Set("removed", false).Set("reason", "the run goes on")
	default:
		_, statErr := os.Lstat(dir)
		reply.Set("removed", statErr == nil && os.RemoveAll(dir) == nil)
	}
	out.Message(reply)
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// State is one job as "jobs" lists it.
type State struct {
	Info
	State      string          `json:"state"` // running, finished, lost, starting, elsewhere
	SpoolSize  int64           `json:"spool_bytes"`
	Result     json.RawMessage `json:"result,omitempty"` // without outputs and variables
	FinishedAt float64         `json:"finished_at,omitempty"`
}

// List is every job dir's state, oldest first.
func List(workroot string) []State {
	root := filepath.Join(workroot, JobsDir)
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	states := []State{}
	for _, entry := range entries {
		if !entry.IsDir() || !validJobName(entry.Name()) {
			continue
		}
		states = append(states, stateOf(filepath.Join(root, entry.Name()), entry.Name()))
	}
	return states
}

func sameHost(a, b string) bool { return len(a) >= 9 && len(b) >= 9 && a[:9] == b[:9] }

func stateOf(dir, job string) State {
	s := State{Info: Info{Job: job}}
	if info, err := readInfo(dir); err == nil {
		s.Info = *info
	}
	if st, err := os.Lstat(filepath.Join(dir, SpoolFile)); err == nil {
		s.SpoolSize = st.Size()
	}
	if data := readResult(dir); data != nil {
		s.State, s.Result = "finished", summary(data)
		if st, err := os.Lstat(filepath.Join(dir, ResultFile)); err == nil {
			s.FinishedAt = float64(st.ModTime().UnixNano()) / 1e9
		}
		return s
	}
	switch {
	case s.Host != "" && !sameHost(s.Host, hostid.ID()):
		s.State = "elsewhere" // a home shared with another host: its keeper cannot be seen from here
	case Alive(dir):
		s.State = "running"
	case s.PID == 0:
		s.State = "starting"
	default:
		s.State = "lost"
	}
	return s
}

// summary is a result message without its outputs and variables (a listing stays small).
func summary(result []byte) json.RawMessage {
	var fields map[string]json.RawMessage
	if json.Unmarshal(result, &fields) != nil {
		return nil
	}
	delete(fields, "outputs")
	delete(fields, "variables")
	data, _ := json.Marshal(fields)
	return data
}

// Jobs answers a "jobs" request: every detached run on this server and its state.
func Jobs(out *execute.Framed, c Config) {
	Sweep(c.Workroot)
	data, _ := json.Marshal(List(c.Workroot))
	parsed, err := pyjson.Parse(data)
	if err != nil {
		parsed = []any{}
	}
	out.Message(pyjson.NewObject().Set("type", "jobs").Set("jobs", parsed))
}

// stopLost kills what is left of a lost run's processes (found by its run mark): a keeper
// killed with SIGKILL could not stop them, and nothing else enforces their timeout.
func stopLost(info *Info) {
	if info.Mark == "" || !sameHost(info.Host, hostid.ID()) {
		return
	}
	mark := []byte(proctree.MarkVariable + "=" + info.Mark)
	for pid, state := range proctree.Processes(-1, mark) { // -1: by the mark alone
		if state != 'Z' {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Sweep stops what is left of lost runs of this host, and removes job dirs of this host whose
// run ended (or was lost) more than KeepFor ago and that nobody released.
func Sweep(workroot string) {
	cutoff := time.Now().Add(-KeepFor)
	for _, s := range List(workroot) {
		if s.State == "lost" {
			stopLost(&s.Info)
		}
		if s.State != "finished" && s.State != "lost" {
			continue
		}
		dir := filepath.Join(workroot, JobsDir, s.Job)
		newest := time.Time{}
		for _, name := range []string{SpoolFile, ResultFile, InfoFile} {
			if st, err := os.Lstat(filepath.Join(dir, name)); err == nil && st.ModTime().After(newest) {
				newest = st.ModTime()
			}
		}
		if !newest.IsZero() && newest.Before(cutoff) && (s.Host == "" || sameHost(s.Host, hostid.ID())) {
			os.RemoveAll(dir)
		}
	}
}
