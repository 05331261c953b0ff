package detach

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cronium/runner/internal/execute"
	"cronium/runner/internal/helpers"
	"cronium/runner/internal/payload"
	"cronium/runner/internal/protocol"
	"cronium/runner/internal/pyjson"
)

// TestMain lets the test binary stand in for the runner's keeper (Start runs /proc/self/exe
// keeper ...), and for the helpers the script calls.
func TestMain(m *testing.M) {
	if verb, ok := helpers.Shell[filepath.Base(os.Args[0])]; ok { // the script's cronium.* helpers
		os.Exit(helpers.Run(verb, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == "keeper" {
		values := map[string]string{}
		for i := 2; i+1 < len(os.Args); i += 2 {
			values[os.Args[i]] = os.Args[i+1]
		}
		spool, _ := strconv.ParseInt(values["--spool-max-bytes"], 10, 64)
		os.Exit(Keep(KeeperConfig{JobDir: values["--job"], Workroot: values["--workroot"],
			Executable: values["--executable"], SpoolBytes: spool, Mark: values["--mark"]}))
	}
	os.Exit(m.Run())
}

// bound is how long a test waits for what must happen; reaching it is the failure.
const bound = 60 * time.Second

func archive(t *testing.T, script string, timeout float64) []byte {
	t.Helper()
	manifest := fmt.Sprintf(`{"version": 1, "name": "detached", "type": "bash", "entrypoint": "script.sh", "timeout": %g, "grace_period": 1}`, timeout)
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, f := range [][2]string{{"manifest.yaml", manifest}, {"script.sh", script}} {
		tw.WriteHeader(&tar.Header{Name: f[0], Typeflag: tar.TypeReg, Mode: 0o600, Size: int64(len(f[1]))})
		tw.Write([]byte(f[1]))
	}
	tw.Close()
	var out bytes.Buffer
	gz := gzip.NewWriter(&out)
	gz.Write(raw.Bytes())
	gz.Close()
	return out.Bytes()
}

// follower is the orchestrator's end of one session: its input, and the frames it receives.
type follower struct {
	in       *os.File // write control lines here; close it to leave
	frames   chan protocol.Frame
	finished chan struct{} // the session's detach or attach call returned
}

func newFollower(t *testing.T) (*follower, *execute.Input, *execute.Framed) {
	t.Helper()
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	f := &follower{in: inW, frames: make(chan protocol.Frame, 100000), finished: make(chan struct{})}
	t.Cleanup(func() { inW.Close(); outR.Close(); inR.Close() })
	go func() {
		var decoder protocol.Decoder
		buf := make([]byte, 65536)
		for {
			n, err := outR.Read(buf)
			frames, _ := decoder.Feed(buf[:n])
			for _, frame := range frames {
				f.frames <- frame
			}
			if err != nil {
				close(f.frames)
				return
			}
		}
	}()
	out := execute.NewFramed(outW)
	go func() {
		<-f.finished
		outW.Close()
	}()
	return f, execute.NewInput(inR), out
}

// collect reads frames until the result (or the end): stdout, the messages by type, the result.
func (f *follower) collect(t *testing.T) (string, map[string]map[string]any) {
	t.Helper()
	var stdout strings.Builder
	messages := map[string]map[string]any{}
	deadline := time.After(bound)
	for {
		select {
		case frame, ok := <-f.frames:
			if !ok {
				return stdout.String(), messages
			}
			if frame.Kind == protocol.Stdout {
				stdout.Write(frame.Payload)
				continue
			}
			if frame.Kind == protocol.Message {
				var m map[string]any
				json.Unmarshal(frame.Payload, &m)
				messages[m["type"].(string)] = m
				if m["type"] == "result" {
					return stdout.String(), messages
				}
			}
		case <-deadline:
			t.Fatalf("no result within %s; stdout so far %q", bound, stdout.String())
		}
	}
}

// waitFor waits for the frame that satisfies ok (bounded).
func (f *follower) waitFor(t *testing.T, what string, ok func(protocol.Frame) bool) {
	t.Helper()
	deadline := time.After(bound)
	for {
		select {
		case frame := <-f.frames:
			if ok(frame) {
				return
			}
		case <-deadline:
			t.Fatalf("no %s within %s", what, bound)
		}
	}
}

func request(t *testing.T, job string, data []byte, extra string) ([]byte, *pyjson.Object) {
	t.Helper()
	line := []byte(fmt.Sprintf(`{"op": "detach", "job": %q, "sha256": %q, "payload_size": %d, "execution_id": "x1", "server": "s1", "env": {"SECRET_TOKEN": "hunter2"}%s}`,
		job, payload.SHA256Hex(data), len(data), extra))
	parsed, err := pyjson.Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	return line, parsed.(*pyjson.Object)
}

func testConfig(t *testing.T) Config {
	exe, _ := os.Executable()
	return Config{Workroot: filepath.Join(t.TempDir(), "runs"), Executable: exe}
}

// start sends a detach request on a new session; the session follows until its input closes.
func detachJob(t *testing.T, c Config, job, script string, timeout float64, extra string) *follower {
	t.Helper()
	data := archive(t, script, timeout)
	line, req := request(t, job, data, extra)
	f, in, out := newFollower(t)
	go func() {
		defer close(f.finished)
		Start(line, req, data, in, out, c)
	}()
	return f
}

func attach(t *testing.T, c Config, job string) *follower {
	t.Helper()
	f, in, out := newFollower(t)
	req, _ := pyjson.Parse([]byte(fmt.Sprintf(`{"op": "attach", "job": %q}`, job)))
	go func() {
		defer close(f.finished)
		Attach(req.(*pyjson.Object), in, out, c)
	}()
	return f
}

func stateOfJob(c Config, job string) State {
	for _, s := range List(c.Workroot) {
		if s.Job == job {
			return s
		}
	}
	return State{State: "absent"}
}

func waitState(t *testing.T, c Config, job, want string) State {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		s := stateOfJob(c, job)
		if s.State == want {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s is %s, not %s, after %s", job, s.State, want, bound)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRunOutlivesItsFollowerAndAttachGetsEveryLine(t *testing.T) {
	c := testConfig(t)
	const lines = 300
	f := detachJob(t, c, "job1", fmt.Sprintf(`for i in $(seq 1 %d); do echo "line $i"; if [ $i = 5 ]; then sleep 1; fi; done; cronium.output '{"n": 300}'`, lines), 60, "")
	f.waitFor(t, "line 1", func(fr protocol.Frame) bool { return bytes.Contains(fr.Payload, []byte("line 1\n")) })
	f.in.Close() // the orchestrator goes away mid-run
	<-f.finished
	if s := stateOfJob(c, "job1"); s.State != "running" && s.State != "finished" {
		t.Fatalf("after the follower left the run is %s", s.State)
	}
	if listed := waitState(t, c, "job1", "finished"); bytes.Contains(listed.Result, []byte("outputs")) ||
		!bytes.Contains(listed.Result, []byte(`"exit_code":0`)) {
		t.Fatalf("the listing's result is not the summary: %s", listed.Result)
	}

	stdout, messages := attach(t, c, "job1").collect(t)
	var want strings.Builder
	for i := 1; i <= lines; i++ {
		fmt.Fprintf(&want, "line %d\n", i)
	}
	if stdout != want.String() {
		t.Fatalf("attach gave %d bytes, not every line in order:\n%q", len(stdout), stdout)
	}
	result := messages["result"]
	if result["exit_code"] != float64(0) || fmt.Sprint(result["outputs"]) != "map[n:300]" {
		t.Fatalf("result %v", result)
	}
	if _, ok := messages["attached"]; !ok {
		t.Fatalf("no attached message: %v", messages)
	}
	spool, _ := os.ReadFile(filepath.Join(c.Workroot, JobsDir, "job1", SpoolFile))
	if bytes.Contains(spool, []byte("hunter2")) {
		t.Fatal("the run's secret env reached the spool")
	}
	for _, name := range []string{"", SpoolFile, ResultFile, InfoFile, ControlFile} {
		st, err := os.Lstat(filepath.Join(c.Workroot, JobsDir, "job1", name))
		if err != nil || st.Mode().Perm()&0o077 != 0 {
			t.Fatalf("%s: %v, mode %v: not private", name, err, st.Mode())
		}
	}

	f2, _, out := newFollower(t)
	req, _ := pyjson.Parse([]byte(`{"op": "release", "job": "job1"}`))
	Release(req.(*pyjson.Object), out, c)
	close(f2.finished)
	_, released := f2.collect(t)
	if released["released"]["removed"] != true {
		t.Fatalf("release: %v", released)
	}
	if _, err := os.Lstat(filepath.Join(c.Workroot, JobsDir, "job1")); !os.IsNotExist(err) {
		t.Fatalf("the job dir is still there after release: %v", err)
	}
	_, gone := attach(t, c, "job1").collect(t)
	if code := gone["result"]["runner_error"].(map[string]any)["code"]; code != NoJob {
		t.Fatalf("attach after release: %v", gone)
	}
}

func TestStopLineReachesTheKeeper(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job2", "echo started; sleep 60", 120, "")
	f.waitFor(t, "the script's first line", func(fr protocol.Frame) bool { return bytes.Contains(fr.Payload, []byte("started")) })
	running := stateOfJob(c, "job2")
	if running.State != "running" || running.PID == 0 {
		t.Fatalf("running job: %+v", running)
	}
	release := func() map[string]any {
		f2, _, out := newFollower(t)
		req, _ := pyjson.Parse([]byte(`{"op": "release", "job": "job2"}`))
		Release(req.(*pyjson.Object), out, c)
		close(f2.finished)
		_, m := f2.collect(t)
		return m["released"]
	}
	if r := release(); r["removed"] != false {
		t.Fatalf("a running job was released: %v", r)
	}
	f.in.Write([]byte(`{"op": "stop", "reason": "cancel"}` + "\n"))
	_, messages := f.collect(t)
	if messages["result"]["stop_reason"] != "cancel" {
		t.Fatalf("result %v", messages["result"])
	}
	waitState(t, c, "job2", "finished")
	if syscall.Kill(running.PID, 0) == nil {
		waitGone(t, running.PID)
	}
	if r := release(); r["removed"] != true {
		t.Fatalf("release: %v", r)
	}
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for syscall.Kill(pid, 0) == nil {
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if fields := strings.Fields(string(stat)); len(fields) > 2 && fields[2] == "Z" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d still alive", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestTimeoutAppliesWhileNobodyFollows(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job3", "echo begin; sleep 30; echo never", 1, "")
	f.waitFor(t, "detached", func(fr protocol.Frame) bool { return bytes.Contains(fr.Payload, []byte(`"detached"`)) })
	f.in.Close()
	<-f.finished
	s := waitState(t, c, "job3", "finished")
	var result map[string]any
	json.Unmarshal(s.Result, &result)
	if _, listed := result["outputs"]; listed || result["timed_out"] != true || result["stop_reason"] != "timeout" {
		t.Fatalf("result %v", result)
	}
	stdout, _ := attach(t, c, "job3").collect(t)
	if stdout != "begin\n" {
		t.Fatalf("stdout %q", stdout)
	}
}

func TestSpoolIsBoundedAndSaysWhatItDropped(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job4", `for i in $(seq 1 2000); do echo "line $i"; done`, 60, `, "spool_max_bytes": 1000`)
	stdout, messages := f.collect(t)
	if len(stdout) > 1000 || !strings.HasPrefix(stdout, "line 1\nline 2\n") {
		t.Fatalf("spooled %d bytes: %q", len(stdout), stdout)
	}
	dropped := messages["spool_dropped"]
	lines := int(dropped["lines"].(float64))
	if lines < 1800 || lines > 2000 || dropped["limit"] != float64(1000) {
		t.Fatalf("marker %v", dropped)
	}
	if messages["result"]["exit_code"] != float64(0) {
		t.Fatalf("result %v", messages["result"])
	}
}

func TestLostKeeperIsReported(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job5", "echo up; sleep 60", 120, "")
	var scriptPID int
	f.waitFor(t, "started", func(fr protocol.Frame) bool {
		var m map[string]any
		if fr.Kind == protocol.Message && json.Unmarshal(fr.Payload, &m) == nil && m["type"] == "started" {
			scriptPID = int(m["pid"].(float64))
			return true
		}
		return false
	})
	f.in.Close()
	<-f.finished
	keeper := stateOfJob(c, "job5").PID
	syscall.Kill(keeper, syscall.SIGKILL)
	syscall.Kill(-scriptPID, syscall.SIGKILL)
	waitState(t, c, "job5", "lost")
	stdout, messages := attach(t, c, "job5").collect(t)
	if stdout != "up\n" || messages["result"]["runner_error"].(map[string]any)["code"] != Lost {
		t.Fatalf("stdout %q, messages %v", stdout, messages)
	}
}

// A spool write that fails after result.json was written (a full disk) leaves no result frame:
// a follower that finds the keeper gone sends result.json rather than calling the run lost.
func TestResultFileStandsInForAMissingResultFrame(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job7", "echo up", 120, "")
	f.collect(t)
	waitState(t, c, "job7", "finished")
	if err := os.Truncate(filepath.Join(c.Workroot, JobsDir, "job7", SpoolFile), int64(len(protocol.Magic))); err != nil {
		t.Fatal(err)
	}
	_, messages := attach(t, c, "job7").collect(t)
	if result := messages["result"]; result == nil || result["exit_code"] != float64(0) || result["runner_error"] != nil {
		t.Fatalf("messages %v", messages)
	}
}

func TestRefusedRequests(t *testing.T) {
	c := testConfig(t)
	for name, extra := range map[string]string{"../escape": "", "ok": `, "spool_max_bytes": -1`} {
		f := detachJob(t, c, name, "echo hi", 10, extra)
		_, messages := f.collect(t)
		if messages["result"]["exit_code"] != float64(64) {
			t.Fatalf("%s: %v", name, messages)
		}
	}
	f := detachJob(t, c, "dup", "echo hi", 10, "")
	f.collect(t)
	again := detachJob(t, c, "dup", "echo hi", 10, "")
	_, messages := again.collect(t)
	if msg := messages["result"]["runner_error"].(map[string]any)["message"]; !strings.Contains(msg.(string), "exists already") {
		t.Fatalf("a second detach of one job: %v", messages)
	}
	data := archive(t, "echo hi", 10)
	line, req := request(t, "badsum", data, "")
	req.Set("sha256", strings.Repeat("0", 64))
	fb, in, out := newFollower(t)
	go func() { defer close(fb.finished); Start(line, req, data, in, out, c) }()
	_, messages = fb.collect(t)
	if messages["result"]["exit_code"] != float64(67) {
		t.Fatalf("checksum: %v", messages)
	}
	if _, err := os.Lstat(filepath.Join(c.Workroot, JobsDir, "badsum")); !os.IsNotExist(err) {
		t.Fatal("a refused payload left a job dir")
	}
}

func TestSecretsNeverReachTheSpool(t *testing.T) {
	c := testConfig(t)
	script := `echo "token $SECRET_TOKEN here"; printf 'last %s' "$SECRET_TOKEN" >&2; cronium.output "$SECRET_TOKEN"`
	stdout, messages := detachJob(t, c, "job6", script, 60, "").collect(t)
	if stdout != "token *** here\n" || messages["result"]["outputs"] != "***" {
		t.Fatalf("stdout %q, result %v", stdout, messages["result"])
	}
	spool, _ := os.ReadFile(filepath.Join(c.Workroot, JobsDir, "job6", SpoolFile))
	result, _ := os.ReadFile(filepath.Join(c.Workroot, JobsDir, "job6", ResultFile))
	if bytes.Contains(spool, []byte("hunter2")) || bytes.Contains(result, []byte("hunter2")) {
		t.Fatalf("a secret reached the job dir:\n%q\n%q", spool, result)
	}
	if !bytes.Contains(spool, []byte("last ***")) {
		t.Fatalf("the unfinished last line was not spooled at the end: %q", spool)
	}
}

func TestStreamRedactionAcrossChunks(t *testing.T) {
	env := pyjson.NewObject().Set("K", "hunter2").Set("PEM", "-----BEGIN KEY-----\nabcdefgh\n}\n")
	s := &streamRedactor{r: NewRedactor(env)}
	var out []byte
	for _, piece := range []string{"a hun", "ter2 b\nx abcd", "efgh y } z\n", "no end hunt"} {
		out = append(out, s.feed([]byte(piece))...)
	}
	out = append(out, s.flush()...)
	if string(out) != "a *** b\nx *** y } z\nno end hunt" {
		t.Fatalf("%q", out)
	}
	long := strings.Repeat("x", maxHeldLine) + "hunter2" + strings.Repeat("y", 10)
	s = &streamRedactor{r: NewRedactor(env)}
	out = nil
	for i := 0; i < len(long); i += 1000 { // no newline: spooled before the line ends, still redacted
		out = append(out, s.feed([]byte(long[i:min(i+1000, len(long))]))...)
	}
	out = append(out, s.flush()...)
	if bytes.Contains(out, []byte("hunter")) || len(out) != len(long)-4 {
		t.Fatalf("long line: %d bytes, redacted: %v", len(out), !bytes.Contains(out, []byte("hunter")))
	}
}

// newSpool is a keeper's spool in a fresh file (the magic written, as launch writes it).
func newSpool(t *testing.T, limit int64) (*Spool, string) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, SpoolFile)
	file, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { file.Close() })
	file.WriteString(protocol.Magic)
	return &Spool{File: file, Limit: limit, ResultPath: filepath.Join(dir, ResultFile)}, path
}

// decodeSpool decodes a spool file whole: its stdout, and its messages by type.
func decodeSpool(t *testing.T, path string) (string, map[string]map[string]any) {
	t.Helper()
	data, _ := os.ReadFile(path)
	var decoder protocol.Decoder
	frames, err := decoder.Feed(data)
	if err != nil {
		t.Fatalf("the spool does not decode: %v", err)
	}
	var stdout strings.Builder
	messages := map[string]map[string]any{}
	for _, frame := range frames {
		if frame.Kind == protocol.Stdout {
			stdout.Write(frame.Payload)
		} else if frame.Kind == protocol.Message {
			var m map[string]any
			json.Unmarshal(frame.Payload, &m)
			messages[m["type"].(string)] = m
		}
	}
	return stdout.String(), messages
}

// The limit bounds the spool file, not only the output bytes in it: a script that flushes
// every short line makes one frame (13 bytes of header) per line.
func TestSpoolLimitBoundsTheFileWithItsFrameHeaders(t *testing.T) {
	const limit = 1000
	spool, path := newSpool(t, limit)
	for i := 0; i < 2000; i++ {
		spool.Stream(protocol.Stdout, execute.Now(), []byte("x\n"))
	}
	spool.Message(pyjson.NewObject().Set("type", "result").Set("exit_code", 0))
	st, _ := os.Stat(path)
	// The magic, the marker and the result frame may come on top of the limit.
	if overhead := st.Size() - limit; overhead > 200 {
		t.Fatalf("a spool limited to %d bytes holds %d", limit, st.Size())
	}
	stdout, messages := decodeSpool(t, path)
	dropped := messages["spool_dropped"]
	if kept := int64(strings.Count(stdout, "x\n")); dropped == nil || kept+int64(dropped["lines"].(float64)) != 2000 {
		t.Fatalf("%d lines kept, marker %v: not every line accounted for", kept, dropped)
	}
}

// A follower relays the result as soon as its frame is in the spool, and the orchestrator's
// release follows at once: by then result.json must be in place, or the release finds the run
// going on and leaves its job dir. Here result.json's temporary file is a FIFO and the result
// is larger than a pipe holds, so the keeper's write of it waits for this test to read it.
func TestResultFileIsWrittenBeforeTheResultFrame(t *testing.T) {
	spool, path := newSpool(t, DefaultSpoolBytes)
	temporary := fmt.Sprintf("%s.tmp-%d", spool.ResultPath, os.Getpid()) // writeRaw's name
	if err := syscall.Mkfifo(temporary, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		result := pyjson.NewObject().Set("type", "result").Set("exit_code", 0).Set("error", strings.Repeat("x", 256*1024))
		done <- spool.Message(result)
	}()
	fifo, err := os.Open(temporary) // returns once the keeper's side has opened it for writing
	if err != nil {
		t.Fatal(err)
	}
	defer fifo.Close()
	head := make([]byte, 1024)
	if _, err := io.ReadFull(fifo, head); err != nil { // the write has begun and cannot end yet
		t.Fatal(err)
	}
	if _, messages := decodeSpool(t, path); messages["result"] != nil {
		t.Fatal("the result frame reached the spool before result.json was written")
	}
	if _, err := io.Copy(io.Discard, fifo); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, messages := decodeSpool(t, path); messages["result"] == nil {
		t.Fatal("no result frame in the spool once result.json was written")
	}
}

// A full disk (here: the file size limit) cuts a frame write short; the spool must still
// decode, so that a follower gets what was written and the result, not "corrupt".
func TestSpoolStaysWholeWhenAWriteIsCutShort(t *testing.T) {
	spool, path := newSpool(t, DefaultSpoolBytes)
	spool.Stream(protocol.Stdout, execute.Now(), []byte("first line\n"))
	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &saved); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	full := syscall.Rlimit{Cur: uint64(st.Size()) + 20, Max: saved.Max} // room for part of a frame
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &full); err != nil {
		t.Skipf("cannot limit the file size: %v", err)
	}
	spool.Stream(protocol.Stdout, execute.Now(), []byte(strings.Repeat("y", 100)+"\n"))
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &saved); err != nil {
		t.Fatal(err)
	}
	spool.Stream(protocol.Stdout, execute.Now(), []byte("after the disk had room again\n"))
	spool.Message(pyjson.NewObject().Set("type", "result").Set("exit_code", 0))
	stdout, messages := decodeSpool(t, path)
	if stdout != "first line\n" || messages["result"] == nil || messages["spool_dropped"]["lines"] != float64(2) {
		t.Fatalf("stdout %q, messages %v", stdout, messages)
	}
}

// A keeper killed with SIGKILL (the OOM killer, kill -9) cannot enforce the run's timeout: the
// run's processes, a background child included, must not go on for ever. The first runner
// request that finds the run lost (here: an attach) stops them.
func TestLostKeeperLeavesNoProcessBehind(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job7", `sleep 300 & echo "child $!"; echo up; wait`, 600, "")
	var scriptPID, childPID int
	f.waitFor(t, "the child's pid", func(fr protocol.Frame) bool {
		var m map[string]any
		if fr.Kind == protocol.Message && json.Unmarshal(fr.Payload, &m) == nil && m["type"] == "started" {
			scriptPID = int(m["pid"].(float64))
		}
		if fr.Kind == protocol.Stdout {
			fmt.Sscanf(string(fr.Payload), "child %d", &childPID)
		}
		return childPID != 0
	})
	f.in.Close()
	<-f.finished
	syscall.Kill(stateOfJob(c, "job7").PID, syscall.SIGKILL)
	waitState(t, c, "job7", "lost")
	_, messages := attach(t, c, "job7").collect(t)
	if messages["result"]["runner_error"].(map[string]any)["code"] != Lost {
		t.Fatalf("messages %v", messages)
	}
	for _, pid := range []int{scriptPID, childPID} {
		waitGone(t, pid)
	}
}

// A keeper whose start failed after it was started (info.json not written: a full disk) is
// abandoned with its job dir; the script it may have started must not go on unseen.
func TestAbandonedKeeperStopsItsRun(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job8", `sleep 300 & echo "child $!"; wait`, 600, "")
	var scriptPID, childPID int
	f.waitFor(t, "the child's pid", func(fr protocol.Frame) bool {
		var m map[string]any
		if fr.Kind == protocol.Message && json.Unmarshal(fr.Payload, &m) == nil && m["type"] == "started" {
			scriptPID = int(m["pid"].(float64))
		}
		if fr.Kind == protocol.Stdout {
			fmt.Sscanf(string(fr.Payload), "child %d", &childPID)
		}
		return childPID != 0
	})
	f.in.Close() // start() does not follow a run it abandons
	<-f.finished
	keeper, err := os.FindProcess(stateOfJob(c, "job8").PID)
	if err != nil {
		t.Fatal(err)
	}
	abandon(keeper)
	os.RemoveAll(filepath.Join(c.Workroot, JobsDir, "job8")) // as start() does next
	for _, pid := range []int{scriptPID, childPID} {
		waitGone(t, pid)
	}
}

// A stop line reaches the keeper whole, whatever else the orchestrator's line carried: the
// FIFO takes one write whole only up to PIPE_BUF, and a line cut short swallows the next.
func TestOversizedStopLineStillStops(t *testing.T) {
	c := testConfig(t)
	f := detachJob(t, c, "job9", "echo started; sleep 60", 120, "")
	f.waitFor(t, "the script's first line", func(fr protocol.Frame) bool { return bytes.Contains(fr.Payload, []byte("started")) })
	f.in.Write([]byte(`{"op": "stop", "reason": "cancel", "note": "` + strings.Repeat("x", 100000) + `"}` + "\n"))
	_, messages := f.collect(t)
	if messages["result"]["stop_reason"] != "cancel" {
		t.Fatalf("result %v", messages["result"])
	}
}

func TestJobNames(t *testing.T) {
	good := []string{"a", "job-1_X", strings.Repeat("z", 64)}
	bad := []string{"", "../escape", "a/b", ".", "..", "a b", "é", "a\x00", strings.Repeat("z", 65)}
	for _, name := range good {
		if !validJobName(name) {
			t.Errorf("%q refused", name)
		}
	}
	for _, name := range bad {
		if validJobName(name) {
			t.Errorf("%q accepted", name)
		}
	}
}
