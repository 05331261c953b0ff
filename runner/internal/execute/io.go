// Package execute owns running one payload: the run context, the orchestrator's input
// (request lines, payload bytes and control lines on stdin), the reporters (framed protocol or
// local text mode), the supervision of the script's whole process tree (timeout, stop, signals,
// SIGTERM then SIGKILL after the grace period), and reading the script's result files safely.
package execute

import (
	"bytes"
	"errors"
	"os"
	"sync"
	"time"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// Input is the orchestrator's side of stdin: one reader goroutine for the process's life, so
// that request lines, payload bytes and control lines are all read from one buffer.
type Input struct {
	chunks chan []byte // nil chunk: end of input
	buf    []byte
	ended  bool
}

// NewInput starts reading f.
func NewInput(f *os.File) *Input {
	in := &Input{chunks: make(chan []byte, 4)}
	go func() {
		for {
			data := make([]byte, 65536)
			n, err := f.Read(data)
			if n > 0 {
				in.chunks <- data[:n]
			}
			if err != nil {
				in.chunks <- nil
				return
			}
		}
	}()
	return in
}

func (in *Input) fill() bool {
	if in.ended {
		return false
	}
	chunk := <-in.chunks
	if chunk == nil {
		in.ended = true
		return false
	}
	in.buf = append(in.buf, chunk...)
	return true
}

// Line returns the next line (without its newline); ok false when stdin ended first.
func (in *Input) Line() ([]byte, bool) {
	for {
		if i := bytes.IndexByte(in.buf, '\n'); i >= 0 {
			line := append([]byte(nil), in.buf[:i]...)
			in.buf = in.buf[i+1:]
			return line, true
		}
		if !in.fill() {
			return nil, false
		}
	}
}

// Exactly returns the next size bytes.
func (in *Input) Exactly(size int) ([]byte, error) {
	for len(in.buf) < size {
		if !in.fill() {
			return nil, exitcode.New(exitcode.NoPayload, "stdin ended after %d of %d payload bytes", len(in.buf), size)
		}
	}
	data := append([]byte(nil), in.buf[:size]...)
	in.buf = in.buf[size:]
	return data, nil
}

// Ended says whether stdin has ended (seen during a run).
func (in *Input) Ended() bool { return in.ended }

// Wait waits up to d for more input (a follower of a detached run between polls of its spool)
// and returns the complete control lines now buffered, parsed, and whether stdin has ended.
func (in *Input) Wait(d time.Duration) ([]any, bool) {
	if !in.ended {
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case chunk := <-in.chunks:
			if chunk == nil {
				in.ended = true
			} else {
				in.buf = append(in.buf, chunk...)
			}
		case <-timer.C:
		}
	}
	return in.controlMessages(), in.ended
}

// controlMessages returns the complete control lines now buffered, parsed (an unparsable line
// is an {"op": "invalid"} message).
func (in *Input) controlMessages() []any {
	var messages []any
	for {
		i := bytes.IndexByte(in.buf, '\n')
		if i < 0 {
			return messages
		}
		line := in.buf[:i]
		in.buf = in.buf[i+1:]
		v, err := pyjson.Parse(line)
		if err != nil {
			v = pyjson.NewObject().Set("op", "invalid")
		}
		messages = append(messages, v)
	}
}

// Reporter is where script output and runner messages go. Stream's data is the caller's again
// once Stream returns (its buffer is read into again): a reporter that keeps it copies it.
type Reporter interface {
	Stream(kind byte, ts float64, data []byte) error
	Message(message *pyjson.Object) error
}

// errGone: writing to the orchestrator failed, the connection is gone.
var errGone = errors.New("orchestrator connection lost")

// Now is the Unix time as a float.
func Now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// Framed writes the protocol to a file (stdout), for the orchestrator.
type Framed struct {
	mu      sync.Mutex
	out     *os.File
	gone    bool
	pending []byte
	frame   []byte // the last frame's buffer, written into again (see keptFrameBytes)
}

// keptFrameBytes: a frame buffer up to this size is kept for the next frame (a stream's frames
// are all about this size); a larger one (a big result message) is left to the collector.
const keptFrameBytes = protocol.HeaderSize + 2*readSize

// NewFramed returns a framed reporter on out; the magic line goes with the first frame (one
// write, not two small ones: sshd may still have Nagle's algorithm on).
func NewFramed(out *os.File) *Framed {
	return &Framed{out: out, pending: []byte(protocol.Magic)}
}

func (f *Framed) send(kind byte, ts float64, data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gone {
		return nil
	}
	frame := protocol.AppendFrame(append(f.frame[:0], f.pending...), kind, ts, data)
	f.pending = nil
	if cap(frame) <= keptFrameBytes {
		f.frame = frame
	}
	if _, err := f.out.Write(frame); err != nil {
		f.gone = true
		return errGone
	}
	return nil
}

// Stream sends script output.
func (f *Framed) Stream(kind byte, ts float64, data []byte) error { return f.send(kind, ts, data) }

// Frame sends one frame as it is (a detached run's spooled frames, relayed).
func (f *Framed) Frame(kind byte, ts float64, payload []byte) error { return f.send(kind, ts, payload) }

// Message sends a JSON message.
func (f *Framed) Message(message *pyjson.Object) error {
	return f.send(protocol.Message, Now(), pyjson.Compact(message))
}

// Text is the local testing mode: script output passes straight through; the result goes to
// stderr as a summary, and in full to a report file when one is named.
type Text struct {
	ReportPath string
}

// Stream passes output through.
func (t *Text) Stream(kind byte, _ float64, data []byte) error {
	out := os.Stdout
	if kind != protocol.Stdout {
		out = os.Stderr
	}
	_, err := out.Write(data)
	return err
}

// Message prints the result.
func (t *Text) Message(message *pyjson.Object) error {
	if kind, _ := message.Get("type"); kind != "result" {
		return nil
	}
	if t.ReportPath != "" {
		text := pyjson.Dumps(message, pyjson.Options{Indent: 1, SortKeys: true})
		if err := os.WriteFile(t.ReportPath, append(text, '\n'), 0o666); err != nil {
			return err
		}
	}
	summary := pyjson.NewObject()
	for _, k := range []string{"exit_code", "timed_out", "stop_reason", "outputs", "variables"} {
		v, _ := message.Get(k)
		summary.Set(k, v)
	}
	if v, _ := message.Get("runner_error"); v != nil {
		summary.Set("runner_error", v)
	}
	line := append([]byte("cronium-runner: "), pyjson.Dumps(summary, pyjson.Options{SortKeys: true})...)
	_, err := os.Stderr.Write(append(line, '\n'))
	return err
}
