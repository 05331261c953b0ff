package execute

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/proctree"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// Timing of the process-tree stop.
const (
	readSize     = 65536
	spareBuffers = 4                      // per pipe: the chunks channel's capacity, so a reader seldom allocates
	coalesceWait = time.Millisecond       // see fillWhileFlowing
	pipeDrain    = 2 * time.Second        // how long to read pipes that outlive every process of the run
	killRepeat   = 200 * time.Millisecond // SIGKILL again, should anything have been born since
	checkEvery   = time.Second
)

var signalNames = map[syscall.Signal]string{syscall.SIGTERM: "SIGTERM", syscall.SIGINT: "SIGINT", syscall.SIGHUP: "SIGHUP"}

// Outcome is how the script ended.
type Outcome struct {
	ExitCode   int
	Signal     int // 0: not killed by a signal
	TimedOut   bool
	StopReason string
	Stopped    bool // StopReason is set
	ScriptS    float64
}

// Supervisor runs the script, forwards its output, and makes sure none of its processes
// outlives it.
type Supervisor struct {
	Argv     []string
	Dir      string
	Env      []string
	Timeout  time.Duration
	Grace    time.Duration
	Reporter Reporter
	Input    *Input  // nil: no control channel (local mode)
	Become   *Become // run the script through sudo as another user (become.go)
	Mark     string  // the run mark (proctree.MarkVariable); "": a new one

	mark     []byte
	pid      int
	outcome  Outcome
	killAt   time.Time
	killing  bool
	controls bool // still reading control lines
}

// Seconds converts seconds to a Duration, capped at about a century.
func Seconds(s float64) time.Duration {
	const limit = 100 * 365 * 24 * time.Hour
	if s >= limit.Seconds() {
		return limit
	}
	return time.Duration(s * float64(time.Second))
}

// NewMark returns a fresh run mark value.
func NewMark() string {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], rand.Uint64()) // math/rand/v2: seeded from the OS
	return hex.EncodeToString(b[:])
}

func (s *Supervisor) signalTree(sig syscall.Signal) {
	syscall.Kill(-s.pid, sig)
	for pid, state := range proctree.Processes(os.Getpid(), s.mark) {
		if state != 'Z' {
			syscall.Kill(pid, sig)
		}
	}
}

// reapOrphans reaps zombie orphans and says whether a process of the run other than the
// script is alive.
func (s *Supervisor) reapOrphans() bool {
	alive := false
	for pid, state := range proctree.Processes(os.Getpid(), s.mark) {
		if pid == s.pid {
			continue
		}
		if state == 'Z' {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		} else {
			alive = true
		}
	}
	return alive
}

// stop sends sig to the whole tree now, SIGKILL after the grace period.
func (s *Supervisor) stop(sig syscall.Signal, reason string) {
	if !s.outcome.Stopped {
		s.outcome.Stopped, s.outcome.StopReason = true, reason
	}
	s.signalTree(sig)
	if !s.killing {
		s.killing, s.killAt = true, time.Now().Add(s.killGrace())
	}
}

// killGrace is how long after the first SIGTERM the tree gets SIGKILL. Through sudo, the
// script's side stops its own tree within the grace period; sudo gets a margin more.
func (s *Supervisor) killGrace() time.Duration {
	if s.Become != nil {
		return s.Grace + becomeMargin
	}
	return s.Grace
}

type chunk struct {
	kind  byte
	data  []byte        // nil: end of the stream
	spare chan<- []byte // where data's buffer goes back once sent (nil: nowhere)
}

// recycle hands c's buffer back to its reader, once its data has been sent.
func (c chunk) recycle() {
	select {
	case c.spare <- c.data[:cap(c.data)]:
	default:
	}
}

func readPipe(f *os.File, kind byte, out chan<- chunk, done <-chan struct{}) {
	forwardPipe(f, kind, nil, out, done)
}

// forwardPipe sends first (if any), then what f gives, then the end of the stream. Its read
// buffers come back once sent and are read into again: a fresh 64 KiB buffer per read made a
// long stream's relay mostly the allocator's and the collector's work (benchmarks/analysis.md).
func forwardPipe(f *os.File, kind byte, first []byte, out chan<- chunk, done <-chan struct{}) {
	if len(first) > 0 {
		select {
		case out <- chunk{kind: kind, data: first}:
		case <-done:
			return
		}
	}
	spare := make(chan []byte, spareBuffers)
	for {
		var buf []byte
		select {
		case buf = <-spare:
		default:
			buf = make([]byte, readSize)
		}
		n, err := f.Read(buf)
		if err == nil && n < readSize {
			n, err = fillWhileFlowing(f, buf, n)
		}
		if n > 0 {
			select {
			case out <- chunk{kind: kind, data: buf[:n], spare: spare}:
			case <-done:
				return
			}
		}
		if err != nil {
			select {
			case out <- chunk{kind: kind}:
			case <-done:
			}
			return
		}
	}
}

// fillWhileFlowing reads more into buf[n:] for at most coalesceWait after the first read, up
// to a full buffer. A script writing fast hands the pipe 4 or 8 KiB per write; sending each
// write as its own frame cost the server (runner and sshd) and the orchestrator a frame's work
// per write (benchmarks/analysis.md, B4). Output is sent at most coalesceWait late (the
// deadline is not pushed back by reads: a steady trickle must not wait for a full buffer). A
// deadline that passes is not an error.
func fillWhileFlowing(f *os.File, buf []byte, n int) (int, error) {
	if f.SetReadDeadline(time.Now().Add(coalesceWait)) != nil {
		return n, nil // not a pollable pipe: send what there is
	}
	defer f.SetReadDeadline(time.Time{})
	for n < len(buf) {
		m, err := f.Read(buf[n:])
		n += m
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Run runs the script to its end and returns how it ended.
func (s *Supervisor) Run() (Outcome, error) {
	proctree.BecomeSubreaper()
	mark := s.Mark
	if mark == "" {
		mark = NewMark()
	}
	s.mark = []byte(proctree.MarkVariable + "=" + mark)
	var env []string
	for _, kv := range s.Env {
		if !strings.HasPrefix(kv, proctree.MarkVariable+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, string(s.mark))
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGCHLD)
	defer signal.Stop(signals)

	stdin, err := os.Open(os.DevNull)
	if err != nil {
		return s.outcome, err
	}
	defer stdin.Close()
	var becomeIn *os.File // become: sudo's stdin, for the password and the spec
	if s.Become != nil {
		stdin.Close()
		if stdin, becomeIn, err = os.Pipe(); err != nil {
			return s.outcome, err
		}
		defer becomeIn.Close()
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return s.outcome, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return s.outcome, err
	}
	started := time.Now()
	process, err := os.StartProcess(s.Argv[0], s.Argv, &os.ProcAttr{
		Dir: s.Dir, Env: env, Files: []*os.File{stdin, outW, errW},
		Sys: &syscall.SysProcAttr{Setsid: true},
	})
	outW.Close()
	errW.Close()
	if s.Become != nil {
		stdin.Close()
	}
	if err != nil {
		outR.Close()
		errR.Close()
		return s.outcome, exitcode.New(exitcode.InterpreterMissing, "cannot start %s: %v", s.Argv[0], err)
	}
	s.pid = process.Pid
	if s.Reporter.Message(pyjson.NewObject().Set("type", "started").Set("pid", process.Pid)) != nil {
		s.stop(syscall.SIGTERM, "orchestrator connection lost")
	}

	done := make(chan struct{})
	defer close(done)
	chunks := make(chan chunk, 4)
	go readPipe(outR, protocol.Stdout, chunks, done)
	if s.Become != nil {
		go func() {
			// sudo's own words (prompt, refusal) are not the script's output: only what
			// follows become-exec's ready line is.
			first, ready := s.Become.handshake(errR, becomeIn)
			if !ready {
				io.Copy(io.Discard, errR)
				select {
				case chunks <- chunk{kind: protocol.Stderr}:
				case <-done:
				}
				return
			}
			forwardPipe(errR, protocol.Stderr, first, chunks, done)
		}()
	} else {
		go readPipe(errR, protocol.Stderr, chunks, done)
	}
	defer outR.Close()
	defer errR.Close()
	// The script is waited for on SIGCHLD (and on each check), not by a goroutine blocked in
	// wait: a thread parked in a system call made the scheduler hand work between threads on
	// every run, which cost the server more CPU than the run's own work (benchmarks/analysis.md).
	defer process.Release()

	var control <-chan []byte
	if s.Input != nil {
		if s.Input.ended {
			s.stop(syscall.SIGTERM, "orchestrator connection lost")
		} else {
			control = s.Input.chunks
			s.handleControl()
		}
	}
	deadline := started.Add(s.Timeout)
	open := 2
	var status syscall.WaitStatus
	exited := false
	orphansSignalled := false
	var drainSince time.Time
	var pending []syscall.Signal
	for {
		now := time.Now()
		next := now.Add(checkEvery)
		if !exited && !s.outcome.TimedOut && deadline.Before(next) {
			next = deadline // once it has passed, waking at it again would spin
		}
		if s.killing && s.killAt.Before(next) {
			next = s.killAt
		}
		timer := time.NewTimer(max(0, next.Sub(now)))
		select {
		case c := <-chunks:
			if c.data == nil {
				open--
			} else {
				if s.Reporter.Stream(c.kind, Now(), c.data) != nil {
					s.stop(syscall.SIGTERM, "orchestrator connection lost")
				}
				c.recycle()
			}
		case sig := <-signals:
			if sig != syscall.SIGCHLD {
				pending = append(pending, sig.(syscall.Signal))
			}
		case data := <-control:
			if data == nil {
				s.Input.ended = true
				control = nil
				s.stop(syscall.SIGTERM, "orchestrator connection lost")
			} else {
				s.Input.buf = append(s.Input.buf, data...)
				s.handleControl()
			}
		case <-timer.C:
		}
		timer.Stop()
		if !exited {
			if pid, _ := syscall.Wait4(s.pid, &status, syscall.WNOHANG, nil); pid == s.pid {
				exited = true
				s.outcome.ScriptS = time.Since(started).Seconds()
			}
		}
		for _, sig := range pending {
			s.stop(sig, "runner received "+signalNames[sig])
		}
		pending = pending[:0]
		now = time.Now()
		if !exited && !s.outcome.TimedOut && !now.Before(deadline) {
			s.outcome.TimedOut = true
			s.stop(syscall.SIGTERM, "timeout")
		}
		if s.killing && !now.Before(s.killAt) {
			s.signalTree(syscall.SIGKILL)
			s.killAt = now.Add(killRepeat)
		}
		if !exited {
			continue
		}
		if s.reapOrphans() {
			if !orphansSignalled { // the script ended but left processes behind: they go too
				orphansSignalled = true
				s.signalTree(syscall.SIGTERM)
				if !s.killing {
					s.killing, s.killAt = true, time.Now().Add(s.killGrace())
				}
			}
			continue
		}
		if open == 0 {
			break
		}
		// Nothing of ours is alive, yet a pipe is open: some process outside our tree holds
		// it. Read what comes for a while, then stop waiting.
		if drainSince.IsZero() {
			drainSince = now
		}
		if now.Sub(drainSince) > pipeDrain {
			break
		}
	}
	if status.Signaled() {
		s.outcome.ExitCode, s.outcome.Signal = 128+int(status.Signal()), int(status.Signal())
	} else {
		s.outcome.ExitCode = status.ExitStatus()
	}
	return s.outcome, nil
}

// handleControl acts on the control lines now buffered: {"op": "stop", "reason": ...}.
func (s *Supervisor) handleControl() {
	for _, message := range s.Input.controlMessages() {
		obj, ok := message.(*pyjson.Object)
		if !ok {
			continue
		}
		if op, _ := obj.Get("op"); op != "stop" {
			continue
		}
		reason := "stop requested"
		if v, ok := obj.Get("reason"); ok {
			reason = pyjson.Str(v)
		}
		s.outcome.TimedOut = s.outcome.TimedOut || reason == "timeout"
		s.stop(syscall.SIGTERM, reason)
	}
}
