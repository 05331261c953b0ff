package execute

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cronium/runner/internal/proctree"
	"cronium/runner/internal/pyjson"
)

func TestResultFilesAreNotTrusted(t *testing.T) {
	dir := t.TempDir()
	const limit = 1024
	write := func(name, text string) { os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600) }
	check := func(name string, object bool, want string) {
		t.Helper()
		done := make(chan error, 1)
		go func() { _, err := ReadResultFile(dir, name, nil, limit, object); done <- err }()
		select {
		case err := <-done:
			if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
				t.Errorf("%s: got %v, want %q", name, err, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: reading blocked", name)
		}
	}
	check("absent.json", false, "")
	syscall.Mkfifo(filepath.Join(dir, "fifo.json"), 0o600) // nobody writes: a blocking open would hang
	check("fifo.json", false, "fifo.json is a FIFO, not a regular file")
	os.Symlink("/dev/zero", filepath.Join(dir, "zero.json"))
	check("zero.json", false, "zero.json is a symbolic link, not a regular file")
	os.Mkdir(filepath.Join(dir, "dir.json"), 0o700)
	check("dir.json", false, "dir.json is a directory")
	write("big.json", `"`+strings.Repeat("x", 2000)+`"`)
	check("big.json", false, "big.json is 2002 bytes, over the 1024 bytes limit")
	write("bad.json", "{nope")
	check("bad.json", false, "bad.json is not valid JSON")
	write("list.json", "[1, 2]")
	check("list.json", true, "list.json holds a list, not a JSON object")
	check("list.json", false, "")
	write("deep.json", strings.Repeat("[", 600))
	check("deep.json", false, "nested deeper than 512 levels")
	if got := humanSize(40 * 1000 * 1000); got != "40 MB" {
		t.Errorf("humanSize: %s", got)
	}
	if got := limitText(DefaultMaxResultBytes); got != "16 MiB" {
		t.Errorf("limitText: %s", got)
	}
}

type recorder struct {
	mu       sync.Mutex
	stdout   []byte
	messages []*pyjson.Object
}

func (r *recorder) Stream(kind byte, _ float64, data []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if kind == 'O' {
		r.stdout = append(r.stdout, data...)
	}
	return nil
}

func (r *recorder) Message(m *pyjson.Object) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.messages = append(r.messages, m)
	return nil
}

func alive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return fields[0] != "Z"
}

func pids(out []byte) []int {
	var found []int
	for _, line := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(line, "pid "); ok {
			pid, _ := strconv.Atoi(rest)
			found = append(found, pid)
		}
	}
	return found
}

// A timeout stops the whole tree: a child, a grandchild, and a setsid escapee.
func TestTimeoutStopsTheWholeTreeIncludingSetsidChildren(t *testing.T) {
	script := `sleep 4001 & echo "pid $!"
( sleep 4002 & echo "pid $!"; wait ) &
setsid sh -c 'sleep 4003 & echo "pid $!"; wait' &
sleep 0.3; echo ready; wait
`
	r := &recorder{}
	s := &Supervisor{Argv: []string{"/bin/sh", "-c", script}, Dir: t.TempDir(), Env: os.Environ(),
		Timeout: 1500 * time.Millisecond, Grace: time.Second, Reporter: r}
	outcome, err := s.Run()
	if err != nil {
		t.Fatal(err)
	}
	found := pids(r.stdout)
	if len(found) != 3 || !outcome.TimedOut || outcome.StopReason != "timeout" || outcome.ExitCode != 128+15 {
		t.Fatalf("pids %v, outcome %+v, output %q", found, outcome, r.stdout)
	}
	for _, pid := range found {
		if alive(pid) {
			t.Errorf("pid %d outlived the run", pid)
		}
	}
}

// The script ends but leaves a setsid child behind: the child goes too, the exit code stays.
func TestLeftoverChildrenAreStoppedAndExitCodeKept(t *testing.T) {
	r := &recorder{}
	s := &Supervisor{Argv: []string{"/bin/sh", "-c", `nohup setsid sleep 4004 >/dev/null 2>&1 & echo "pid $!"; exit 3`},
		Dir: t.TempDir(), Env: os.Environ(), Timeout: time.Minute, Grace: time.Second, Reporter: r}
	outcome, err := s.Run()
	if err != nil {
		t.Fatal(err)
	}
	if outcome.ExitCode != 3 || outcome.TimedOut {
		t.Fatalf("%+v", outcome)
	}
	for _, pid := range pids(r.stdout) {
		if alive(pid) {
			t.Errorf("pid %d outlived the run", pid)
		}
	}
}

// A script that traps SIGTERM is killed after the grace period; the signal is reported.
func TestTrappedTermIsKilledAfterGrace(t *testing.T) {
	r := &recorder{}
	s := &Supervisor{Argv: []string{"/bin/sh", "-c", `trap 'echo got TERM' TERM; while true; do sleep 0.05; done`},
		Dir: t.TempDir(), Env: os.Environ(), Timeout: 300 * time.Millisecond, Grace: 500 * time.Millisecond, Reporter: r}
	started := time.Now()
	outcome, _ := s.Run()
	if outcome.Signal != int(syscall.SIGKILL) || outcome.ExitCode != 137 || time.Since(started) < 800*time.Millisecond {
		t.Fatalf("%+v after %v", outcome, time.Since(started))
	}
	if !strings.Contains(string(r.stdout), "got TERM") {
		t.Errorf("output %q", r.stdout)
	}
}

func TestContext(t *testing.T) {
	parse := func(text string) (*Context, error) {
		v, err := pyjson.Parse([]byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return ContextFrom(v)
	}
	c, err := parse(`{"execution_id": 5, "server": null, "input": null, "variables": [], "env": {"A": "b"}, "api": {"socket": "/s", "token": "t"}, "max_result_bytes": 100}`)
	if err != nil || c.ExecutionID != "5" || c.Server != "None" || !c.HasInput || c.Variables.Len() != 0 || !c.HasAPI || c.MaxResultBytes != 100 {
		t.Fatalf("%+v %v", c, err)
	}
	for text, want := range map[string]string{
		`{"variables": [1]}`:         "run context 'variables' must be a mapping",
		`{"env": {"CRONIUM_X": ""}}`: "run context: env name 'CRONIUM_X' uses the reserved prefix",
		`{"api": {"url": "u"}}`:      "run context 'api' needs a socket and a token",
		`{"event": "x"}`:             "run context 'event' must be a mapping",
		`{"max_result_bytes": 1.5}`:  "max_result_bytes",
		`[]`:                         "must be a JSON object",
	} {
		if _, err := parse(text); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", text, err, want)
		}
	}
}

// forwardedPipe is a pipe whose read end readPipe forwards to out (until the test ends).
func forwardedPipe(t *testing.T) (*os.File, <-chan chunk) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	out, done := make(chan chunk, 1024), make(chan struct{})
	t.Cleanup(func() { close(done); r.Close() })
	go readPipe(r, 'O', out, done)
	return w, out
}

func TestPipeOutputIsForwardedWholeInOrderAndATrickleIsNotHeldBack(t *testing.T) {
	w, out := forwardedPipe(t)
	next := func() chunk {
		t.Helper()
		select {
		case c := <-out:
			return c
		case <-time.After(10 * time.Second):
			t.Fatal("no chunk: output was held back")
		}
		return chunk{}
	}
	// A lone write arrives while the writer waits: nothing waits for a fuller buffer.
	w.Write([]byte("first\n"))
	if c := next(); string(c.data) != "first\n" {
		t.Fatalf("got %q", c.data)
	}
	// Many small writes: every byte, in order, in chunks of at most readSize.
	var want strings.Builder
	for i := 0; i < 2000; i++ {
		line := strconv.Itoa(i) + strings.Repeat("x", 100) + "\n"
		want.WriteString(line)
		w.Write([]byte(line))
	}
	w.Close()
	var got []byte
	for {
		c := next()
		if c.data == nil {
			break
		}
		if len(c.data) > readSize {
			t.Fatalf("a chunk of %d bytes", len(c.data))
		}
		got = append(got, c.data...)
	}
	if string(got) != want.String() {
		t.Fatalf("got %d bytes, want %d, or out of order", len(got), want.Len())
	}
}

// A chunk's buffer is read into again once it is handed back (recycle), and never before: a
// chunk kept without handing it back keeps its bytes.
func TestReadBuffersAreReusedOnlyOnceHandedBack(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	out, done := make(chan chunk), make(chan struct{}) // as the supervisor: the reader waits for us
	t.Cleanup(func() { close(done); r.Close() })
	go readPipe(r, 'O', out, done)
	var want strings.Builder
	for i := 0; i < 20000; i++ {
		want.WriteString(strconv.Itoa(i) + strings.Repeat("y", 90) + "\n")
	}
	go func() {
		w.Write([]byte(want.String()))
		w.Close()
	}()
	var got []byte
	var kept []chunk
	var keptCopies []string
	buffers := map[*byte]bool{}
	for {
		var c chunk
		select {
		case c = <-out:
		case <-time.After(10 * time.Second):
			t.Fatal("no chunk")
		}
		if c.data == nil {
			break
		}
		got = append(got, c.data...)
		buffers[&c.data[:1][0]] = true
		if len(kept) < 3 {
			kept, keptCopies = append(kept, c), append(keptCopies, string(c.data))
		} else {
			c.recycle()
		}
	}
	if string(got) != want.String() {
		t.Fatalf("got %d bytes, want %d, or out of order", len(got), want.Len())
	}
	for i, c := range kept {
		if string(c.data) != keptCopies[i] {
			t.Fatalf("chunk %d was written over before it was handed back", i)
		}
	}
	if chunks := len(got) / readSize; len(buffers) > spareBuffers+len(kept)+2 {
		t.Fatalf("%d buffers for about %d chunks: handed-back buffers are not read into again", len(buffers), chunks)
	}
}

func TestASteadyTrickleIsSentWhileItFlows(t *testing.T) {
	w, out := forwardedPipe(t)
	// 8 bytes every 100 µs for half a second: 40 KB, under a full buffer. Reads must not keep
	// gathering for as long as the pipe keeps delivering.
	var writing sync.WaitGroup
	var finished atomic.Bool
	writing.Add(1)
	go func() {
		defer writing.Done()
		defer w.Close()
		for start := time.Now(); time.Since(start) < 500*time.Millisecond; {
			w.Write([]byte("0123456\n"))
			for wrote := time.Now(); time.Since(wrote) < 100*time.Microsecond; { // faster than a sleep can
			}
		}
		finished.Store(true)
	}()
	select {
	case c := <-out:
		if finished.Load() {
			t.Fatalf("the first %d bytes came only after the writer had finished", len(c.data))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no output at all")
	}
	writing.Wait()
}

// A child of the session kept apart (a detached run's keeper) survives the stop of the
// session's next run, which stops every other process of the run.
func TestAProcessKeptApartOutlivesTheNextRun(t *testing.T) {
	keeper := exec.Command("sleep", "4005")
	if err := keeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { keeper.Process.Kill(); keeper.Wait() }()
	proctree.KeepApart(keeper.Process.Pid)
	defer proctree.Rejoin(keeper.Process.Pid)
	r := &recorder{}
	s := &Supervisor{Argv: []string{"/bin/sh", "-c", `sleep 4006 & echo "pid $!"; exit 0`},
		Dir: t.TempDir(), Env: os.Environ(), Timeout: time.Minute, Grace: time.Second, Reporter: r}
	if _, err := s.Run(); err != nil {
		t.Fatal(err)
	}
	for _, pid := range pids(r.stdout) {
		if alive(pid) {
			t.Errorf("the run's own pid %d outlived it", pid)
		}
	}
	if !alive(keeper.Process.Pid) {
		t.Fatal("the process kept apart was stopped with the run")
	}
}
