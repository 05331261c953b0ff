package detach

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"cronium/runner/internal/execute"
	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// KeeperConfig is what `cronium-runner keeper` is given (its command line).
type KeeperConfig struct {
	JobDir         string
	Workroot       string
	Executable     string
	SpoolBytes     int64
	MaxResultBytes int64
	Mark           string // the run mark of the script's processes (info.json has it too)
}

// Keep is the keeper: it reads the request line and the payload from stdin, then runs the
// payload as a session would, its frames going to the spool (fd 4) and its control lines
// coming from the control FIFO (fd 3, held open for reading and writing: it never ends, and
// its being held is what tells a follower that the run is alive).
func Keep(c KeeperConfig) int {
	// Inherited without close-on-exec: the script must not inherit them (it could write
	// control lines, or hold the FIFO and make a dead keeper look alive).
	syscall.CloseOnExec(3)
	syscall.CloseOnExec(4)
	control := os.NewFile(3, "control")
	spool := &Spool{File: os.NewFile(4, "spool"), Limit: c.SpoolBytes, ResultPath: filepath.Join(c.JobDir, ResultFile)}
	if control == nil || spool.File == nil {
		return int(exitcode.Usage)
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		spool.Message(execute.ErrorResult(exitcode.New(exitcode.NoPayload, "cannot read the request: %v", err)))
		return int(exitcode.NoPayload)
	}
	line, data, _ := bytes.Cut(stdin, []byte("\n"))
	parsed, err := pyjson.Parse(line)
	request, isObject := parsed.(*pyjson.Object)
	if err != nil || !isObject {
		spool.Message(execute.ErrorResult(exitcode.New(exitcode.Usage, "the detached run's request is not a JSON object")))
		return int(exitcode.Usage)
	}
	ctx, err := execute.ContextFrom(request)
	if err != nil {
		runnerErr := execute.AsRunnerError(err)
		spool.Message(execute.ErrorResult(runnerErr))
		return int(runnerErr.Code)
	}
	spool.Redact = NewRedactor(ctx.Env)
	sha, hasSHA := request.Get("sha256")
	shaText, _ := sha.(string)
	return execute.RunPayload(data, ctx, spool, execute.NewInput(control), execute.Options{
		SHA256: shaText, HasSHA256: hasSHA && sha != nil, Workroot: c.Workroot,
		Executable: c.Executable, MaxResultBytes: c.MaxResultBytes, Mark: c.Mark,
	})
}

// Spool is the keeper's reporter: frames appended to the spool file, the run's secret values
// redacted (output line by line as it comes, the result whole), output bounded by Limit bytes
// of the file (output frames, their headers included: the first Limit bytes are kept; what
// comes after is counted, and a spool_dropped message goes before the result). A write that a
// full disk cuts short is undone, so the spool always decodes. The result is also written to
// ResultPath.
type Spool struct {
	File       *os.File
	Limit      int64
	ResultPath string
	Redact     *Redactor // the run's secret values (nil: none)

	mu           sync.Mutex
	written      int64
	droppedBytes int64
	droppedLines int64
	streams      map[byte]*streamRedactor
}

// Stream appends script output (its secrets redacted), or counts it once the limit is reached.
func (s *Spool) Stream(kind byte, ts float64, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Redact != nil {
		if s.streams == nil {
			s.streams = map[byte]*streamRedactor{}
		}
		if s.streams[kind] == nil {
			s.streams[kind] = &streamRedactor{r: s.Redact}
		}
		data = s.streams[kind].feed(data)
	}
	s.output(kind, ts, data)
	return nil
}

// output appends output frames up to the limit and counts the rest (the caller holds mu).
func (s *Spool) output(kind byte, ts float64, data []byte) {
	if len(data) == 0 {
		return
	}
	room := s.Limit - s.written - protocol.HeaderSize // each frame's header counts too
	if s.droppedBytes > 0 || room <= 0 {
		s.drop(data)
		return // the run goes on: only the spool is full
	}
	kept := data
	if int64(len(kept)) > room {
		kept = data[:room] // the first Limit bytes are kept, whole or not
	}
	frame := protocol.Encode(kind, ts, kept)
	if s.append(frame) != nil {
		s.drop(data) // e.g. a full disk
		return
	}
	s.written += int64(len(frame))
	if len(kept) < len(data) {
		s.drop(data[len(kept):])
	}
}

// append writes one frame to the spool, whole or not at all: the part of a frame that a full
// disk cut short is truncated away, or every frame after it would be unreadable.
func (s *Spool) append(frame []byte) error {
	n, err := s.File.Write(frame)
	if err != nil && n > 0 {
		if st, statErr := s.File.Stat(); statErr == nil {
			s.File.Truncate(st.Size() - int64(n)) // only the keeper writes the spool
		}
	}
	return err
}

func (s *Spool) drop(data []byte) {
	s.droppedBytes += int64(len(data))
	s.droppedLines += int64(bytes.Count(data, []byte("\n")))
}

// Message appends a message; before the result, the dropped-output marker (when output was
// dropped) and result.json. result.json comes first so that a follower that has relayed the
// result finds the run ended: the orchestrator's release that follows must not find it going on.
func (s *Spool) Message(message *pyjson.Object) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	kind, _ := message.Get("type")
	if kind == "result" {
		for _, stream := range []byte{protocol.Stdout, protocol.Stderr} { // unfinished last lines
			if redactor := s.streams[stream]; redactor != nil {
				s.output(stream, execute.Now(), redactor.flush())
			}
		}
		message = s.Redact.Value(message).(*pyjson.Object) // outputs, variables, errors
	}
	if kind == "result" && s.droppedBytes > 0 {
		marker := pyjson.NewObject().Set("type", "spool_dropped").Set("lines", s.droppedLines).
			Set("bytes", s.droppedBytes).Set("limit", s.Limit)
		s.append(protocol.Encode(protocol.Message, execute.Now(), pyjson.Compact(marker)))
	}
	text := pyjson.Compact(message)
	var resultErr error
	if kind == "result" {
		resultErr = writeRaw(s.ResultPath, text) // the frame goes to the spool all the same
	}
	if err := s.append(protocol.Encode(protocol.Message, execute.Now(), text)); err != nil {
		return fmt.Errorf("cannot write to the spool: %w", err)
	}
	return resultErr
}

func writeRaw(path string, data []byte) error {
	if !json.Valid(data) {
		return fmt.Errorf("not JSON")
	}
	temporary := fmt.Sprintf("%s.tmp-%d", path, os.Getpid())
	if err := os.WriteFile(temporary, data, 0o600); err != nil {
		return err
	}
	return os.Rename(temporary, path)
}
