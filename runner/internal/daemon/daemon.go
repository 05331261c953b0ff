// Package daemon owns `cronium-runner daemon`: runner sessions without a runner start per SSH
// connection. The daemon listens on a Unix socket in the runner's private directory (0600
// socket, 0700 directory) and starts one session process per connection (the runner binary
// again, its input and output the connection), which serves it exactly as `serve` does.
//
// Starting is race-free: under a lock beside the socket, a daemon that already answers is
// left alone ("ready (already running)"); otherwise the new socket is bound under a short
// temporary name in the same directory and renamed over the old path, so two daemons starting
// at once never unlink each other's live socket. The daemon exits after its idle timeout, and
// within 5 s once its socket or its runner binary is removed or replaced.
package daemon

import (
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"cronium/runner/internal/apisocket"
	"cronium/runner/internal/lockfile"
	"cronium/runner/internal/session"
)

// CheckInterval is how often an idle daemon checks its socket and its binary.
const CheckInterval = 5 * time.Second

func fileIdentity(path string) (uint64, uint64, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, 0, false
	}
	return st.Ino, st.Dev, true
}

func unixSocket() (int, error) {
	return syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
}

// answers says whether a live daemon accepts connections at path.
func answers(path string) bool {
	fd, err := unixSocket()
	if err != nil {
		return false
	}
	defer syscall.Close(fd)
	tv := syscall.Timeval{Sec: 2}
	syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv) // bounds connect
	return syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}) == nil
}

// MaxSocketPath is the longest path a Unix socket address holds (sun_path's 108 bytes, one of
// them the NUL).
const MaxSocketPath = 107

func checkLength(what, path string) error {
	if len(path) > MaxSocketPath {
		return fmt.Errorf("%s is %d bytes, over the %d-byte limit of a Unix socket address", what, len(path), MaxSocketPath)
	}
	return nil
}

// TemporaryName is the name a new socket for path is bound under before it is renamed over
// path: in path's directory, short (".d" + 8 hex digits of the hash of path's file name +
// ".tmp", 14 bytes) so that it fits wherever a socket path of the orchestrator's does, and one
// per socket path, so that the start holding path's lock may remove one a killed start left.
func TemporaryName(path string) string {
	dir, name := filepath.Split(path)
	h := fnv.New32a()
	h.Write([]byte(name))
	return fmt.Sprintf("%s.d%08x.tmp", dir, h.Sum32())
}

// Bind returns a listening socket's fd at path, or -1 when a live daemon already answers there.
// Under a lock beside the socket, a new socket is bound under TemporaryName and renamed over
// path: a daemon starting at the same time never unlinks this one's socket, nor this one its.
func Bind(path string) (int, error) {
	temporary := TemporaryName(path)
	if err := checkLength("the path", path); err != nil {
		return -1, err
	}
	if err := checkLength("its temporary name "+temporary, temporary); err != nil {
		return -1, err
	}
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	lock, err := lockfile.Exclusive(path+".lock", 0o600)
	if err != nil {
		return -1, err
	}
	defer lock.Close()
	if answers(path) {
		return -1, nil
	}
	os.Remove(temporary) // one a killed start left: only the lock's holder uses this name
	fd, err := unixSocket()
	if err != nil {
		return -1, err
	}
	err = syscall.Bind(fd, &syscall.SockaddrUnix{Name: temporary})
	if err == nil {
		err = os.Chmod(temporary, 0o600)
	}
	if err == nil {
		err = syscall.Listen(fd, 64)
	}
	if err == nil {
		err = os.Rename(temporary, path)
	}
	if err != nil {
		syscall.Close(fd)
		os.Remove(temporary)
		return -1, err
	}
	return fd, nil
}

// Config is what the daemon needs.
type Config struct {
	Socket         string
	IdleTimeout    time.Duration
	Workroot       string
	Identity       session.Identity
	MaxResultBytes int64
	Argv0          string
}

// Start binds the socket and starts the detached daemon process that serves it (the runner
// binary again, in its own session, given the listening socket), then says "ready".
func Start(c Config) int {
	apisocket.SweepHome()
	fd, err := Bind(c.Socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cronium-runner: cannot bind the daemon socket %s: %v\n", c.Socket, err)
		return 1
	}
	if fd < 0 {
		fmt.Println("ready (already running)")
		return 0
	}
	file := os.NewFile(uintptr(fd), "daemon.sock")
	defer file.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cronium-runner: %v\n", err)
		return 1
	}
	cmd := exec.Command("/proc/self/exe", c.args("--listen-fd", "3")...)
	cmd.Args[0] = c.Argv0
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull // the SSH channel must be able to close
	cmd.ExtraFiles = []*os.File{file}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		os.Remove(c.Socket)
		fmt.Fprintf(os.Stderr, "cronium-runner: cannot start the daemon: %v\n", err)
		return 1
	}
	fmt.Println("ready")
	return 0
}

func (c Config) args(extra ...string) []string {
	args := []string{"daemon", "--socket", c.Socket, "--idle-timeout", fmt.Sprint(c.IdleTimeout.Seconds()),
		"--workroot", c.Workroot, "--executable", c.Identity.Path, "--identity", c.Identity.String()}
	if c.MaxResultBytes > 0 {
		args = append(args, "--max-result-bytes", fmt.Sprint(c.MaxResultBytes))
	}
	return append(args, extra...)
}

// Serve is the detached daemon: it accepts connections on the inherited listener until idle.
func Serve(c Config, listenFD int) int {
	tv := syscall.NsecToTimeval(CheckInterval.Nanoseconds())
	syscall.SetsockoptTimeval(listenFD, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv) // bounds accept
	ino, dev, _ := fileIdentity(c.Socket)
	ours := func() bool {
		i, d, ok := fileIdentity(c.Socket)
		return ok && i == ino && d == dev
	}
	helperDir := session.HelperDir(c.Workroot, c.Identity.Path)
	if helperDir != "" {
		defer os.RemoveAll(filepath.Dir(helperDir))
	}
	lastConnection := time.Now()
	for {
		conn, _, err := syscall.Accept4(listenFD, syscall.SOCK_CLOEXEC)
		if err == nil {
			lastConnection = time.Now()
			startSession(c, conn, helperDir)
			continue
		}
		if err == syscall.EINTR || err == syscall.ECONNABORTED {
			continue
		}
		if err != syscall.EAGAIN {
			time.Sleep(100 * time.Millisecond) // e.g. out of file descriptors: try again soon
		}
		idle := time.Since(lastConnection) > c.IdleTimeout
		if idle || !ours() || !c.Identity.Current() {
			if ours() {
				os.Remove(c.Socket)
			}
			return 0
		}
	}
}

// startSession starts a session process for one connection: its stdin and stdout are the
// connection. The session's command line is the daemon's (plus --session), so that it is
// seen as the daemon's child.
func startSession(c Config, conn int, helperDir string) {
	file := os.NewFile(uintptr(conn), "connection")
	defer file.Close()
	args := c.args("--session")
	if helperDir != "" {
		args = append(args, "--helper-dir", helperDir)
	}
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Args[0] = c.Argv0
	cmd.Stdin, cmd.Stdout = file, file
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return
	}
	go cmd.Wait() // reaped when it ends
}
