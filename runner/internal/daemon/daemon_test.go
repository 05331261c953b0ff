package daemon

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cronium/runner/internal/session"
)

// TestMain lets the test binary stand in for the runner: `daemon --socket` starts (role
// "start" in the environment) and the detached daemon and its sessions they start again.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "daemon" { // started by Start or by the daemon
		os.Exit(fakeRunner(os.Args[2:]))
	}
	if os.Getenv("CRONIUM_TEST_DAEMON_ROLE") == "start" {
		exe, _ := os.Executable()
		identity, _ := session.IdentityOf(exe)
		os.Exit(Start(Config{Socket: os.Getenv("CRONIUM_TEST_SOCKET"), IdleTimeout: 500 * time.Millisecond,
			Workroot: os.Getenv("CRONIUM_TEST_WORKROOT"), Identity: identity, Argv0: os.Args[0]}))
	}
	os.Exit(m.Run())
}

func fakeRunner(args []string) int {
	values := map[string]string{}
	for i := 0; i < len(args); i++ {
		if args[i] == "--session" {
			return 0 // a connection's session: nothing to serve here
		}
		if i+1 < len(args) {
			values[args[i]] = args[i+1]
			i++
		}
	}
	idle, _ := strconv.ParseFloat(values["--idle-timeout"], 64)
	fd, err := strconv.Atoi(values["--listen-fd"])
	if err != nil {
		return 2
	}
	identity, err := session.ParseIdentity(values["--executable"], values["--identity"])
	if err != nil {
		return 2
	}
	return Serve(Config{Socket: values["--socket"], IdleTimeout: time.Duration(idle * float64(time.Second)),
		Workroot: values["--workroot"], Identity: identity, Argv0: "cronium-runner"}, fd)
}

// start runs `daemon --socket` (Start) in a process of its own; its stdout.
func start(t *testing.T, dir, socket string) (string, error) {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "CRONIUM_TEST_DAEMON_ROLE=start", "CRONIUM_TEST_SOCKET="+socket,
		"CRONIUM_TEST_WORKROOT="+filepath.Join(dir, "runs"), "HOME="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Logf("start: %v: %s", err, stderr.String())
	}
	return strings.TrimSpace(string(out)), err
}

func sessionDirs(workroot string) int {
	dirs, _ := filepath.Glob(filepath.Join(workroot, "session-*"))
	return len(dirs)
}

func waitFor(limit time.Duration, done func() bool) bool {
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if done() {
			return true
		}
	}
	return done()
}

// waitGone waits until the daemon serving workroot has left (it removes its session dir).
func waitGone(t *testing.T, workroot string) {
	if !waitFor(3*CheckInterval, func() bool { return sessionDirs(workroot) == 0 }) {
		t.Errorf("the daemon of %s did not exit", workroot)
	}
}

func TestTwoStartsAtOnceGiveOneDaemon(t *testing.T) {
	const rounds = 3 // in parallel, each in a directory of its own
	var wg sync.WaitGroup
	dirs := make([]string, rounds)
	outputs := make([][]string, rounds)
	var mu sync.Mutex
	for r := range rounds {
		dirs[r] = t.TempDir()
		socket := filepath.Join(dirs[r], "daemon-web1.sock")
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				out, _ := start(t, dirs[r], socket)
				mu.Lock()
				outputs[r] = append(outputs[r], out)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	for r, dir := range dirs {
		socket := filepath.Join(dir, "daemon-web1.sock")
		sort.Strings(outputs[r])
		if strings.Join(outputs[r], "|") != "ready|ready (already running)" {
			t.Errorf("round %d: outputs %q, want one ready and one ready (already running)", r, outputs[r])
		}
		if !answers(socket) {
			t.Errorf("round %d: no daemon answers", r)
		}
		if left, _ := filepath.Glob(filepath.Join(dir, ".d*.tmp")); len(left) != 0 {
			t.Errorf("round %d: temporary sockets left: %v", r, left)
		}
		if out, _ := start(t, dir, socket); out != "ready (already running)" {
			t.Errorf("round %d: a third start says %q", r, out)
		}
		if !waitFor(2*time.Second, func() bool { return sessionDirs(filepath.Join(dir, "runs")) == 1 }) {
			t.Errorf("round %d: the daemon made no session dir (or more than one)", r)
		}
		os.Remove(socket) // the daemon leaves within CheckInterval
	}
	for _, dir := range dirs {
		waitGone(t, filepath.Join(dir, "runs"))
	}
}

// pad returns a directory under base whose path is n bytes long.
func pad(t *testing.T, base string, n int) string {
	dir := base
	for len(dir) < n {
		part := min(n-len(dir)-1, 40)
		if part < 1 { // one byte short: lengthen the last part instead
			dir += "x"
			continue
		}
		dir = filepath.Join(dir, strings.Repeat("d", part))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if len(dir) != n {
		t.Fatalf("pad: %d bytes, want %d", len(dir), n)
	}
	return dir
}

func TestLongSocketPaths(t *testing.T) {
	base := t.TempDir()
	const name = "daemon-web1.sock"
	socket := filepath.Join(pad(t, base, 100-len(name)-1), name)
	if len(socket) != 100 {
		t.Fatalf("socket path is %d bytes", len(socket))
	}
	if tmp := TemporaryName(socket); filepath.Dir(tmp) != filepath.Dir(socket) || len(tmp) > len(socket) {
		t.Errorf("temporary name %s", tmp)
	}
	// A dead daemon's socket is replaced.
	dead, _ := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err := syscall.Bind(dead, &syscall.SockaddrUnix{Name: socket}); err != nil {
		t.Fatal(err)
	}
	syscall.Close(dead)
	fd, err := Bind(socket)
	if err != nil || fd < 0 {
		t.Fatalf("a 100-byte socket path: fd %d, %v", fd, err)
	}
	if !answers(socket) {
		t.Errorf("nothing answers at the 100-byte path")
	}
	var st syscall.Stat_t
	if syscall.Stat(socket, &st) != nil || st.Mode&0o777 != 0o600 {
		t.Errorf("socket mode %o", st.Mode&0o777)
	}
	if again, err := Bind(socket); again != -1 || err != nil {
		t.Errorf("a second bind: fd %d, %v; want -1 (already running)", again, err)
	}
	syscall.Close(fd)

	tooLong := filepath.Join(pad(t, base, 100), "daemon-web1.sock")
	if _, err := Bind(tooLong); err == nil || !strings.Contains(err.Error(), "the path is 117 bytes, over the 107-byte limit") {
		t.Errorf("a 117-byte path: %v", err)
	}
	// The path fits, its temporary name (14 bytes in the same directory) does not.
	shortName := filepath.Join(pad(t, base, 95), "s")
	if _, err := Bind(shortName); err == nil || !strings.Contains(err.Error(), "its temporary name") ||
		!strings.Contains(err.Error(), "is 110 bytes, over the 107-byte limit") {
		t.Errorf("a temporary name too long: %v", err)
	}
	if _, err := os.Stat(shortName); err == nil {
		t.Errorf("a socket was made anyway")
	}
}
