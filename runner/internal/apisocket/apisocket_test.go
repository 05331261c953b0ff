package apisocket

import (
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bind makes a Unix socket file at path; listening, or (closed at once) one nobody listens on.
func bind(t *testing.T, path string, listen bool) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		t.Fatalf("bind %s: %v", path, err)
	}
	if !listen {
		syscall.Close(fd)
		return
	}
	if err := syscall.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func withMinAge(t *testing.T, age time.Duration) {
	old := minAge
	minAge = age
	t.Cleanup(func() { minAge = old })
}

func TestForwardNames(t *testing.T) {
	for name, want := range map[string]bool{
		"api-0123456789abcdef.sock": true,
		"api-ab.sock":               true,
		"api-.sock":                 false,
		"api-0123456789ABCDEF.sock": false,
		"api-xyz.sock":              false,
		"api-ab.sock.lock":          false,
		"daemon-web1.sock":          false,
		"api-ab/..sock":             false,
	} {
		if got := IsForwardName(name); got != want {
			t.Errorf("IsForwardName(%q) = %v", name, got)
		}
	}
}

func TestSweepRemovesOnlyDeadForwardSockets(t *testing.T) {
	withMinAge(t, 0)
	root := t.TempDir()
	dir := filepath.Join(root, "runner")
	os.Mkdir(dir, 0o700)
	outside := filepath.Join(root, "outside")
	os.Mkdir(outside, 0o700)
	at := func(name string) string { return filepath.Join(dir, name) }

	bind(t, at("api-0000000000000001.sock"), false) // dead: removed
	bind(t, at("api-0000000000000002.sock"), false) // dead: removed
	bind(t, at("api-00000000000000aa.sock"), true)  // live: stays
	bind(t, at("daemon-web1.sock"), false)          // dead, but not a forward's name
	bind(t, at("api-zz.sock"), false)               // nor this
	os.WriteFile(at("api-0000000000000003.sock"), nil, 0o600)
	os.Mkdir(at("api-0000000000000004.sock"), 0o700)
	bind(t, filepath.Join(outside, "api-0000000000000005.sock"), false)
	os.Symlink(filepath.Join(outside, "api-0000000000000005.sock"), at("api-0000000000000005.sock"))

	// Through /proc, as Sweep connects: the live one accepts.
	dirfd, _ := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if fd, _, ok := socketAt(dirfd, "api-00000000000000aa.sock", uint32(os.Geteuid())); ok {
		conn, _ := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err := syscall.Connect(conn, &syscall.SockaddrUnix{Name: "/proc/self/fd/" + strconv.Itoa(fd)}); err != nil {
			t.Errorf("connect to a live socket through /proc: %v", err)
		}
		syscall.Close(conn)
		syscall.Close(fd)
	} else {
		t.Errorf("socketAt: the live socket is not seen")
	}
	syscall.Close(dirfd)

	removed := Sweep(dir)
	sort.Strings(removed)
	if strings.Join(removed, " ") != "api-0000000000000001.sock api-0000000000000002.sock" {
		t.Errorf("removed %v", removed)
	}
	for name, want := range map[string]bool{
		"api-0000000000000001.sock": false,
		"api-0000000000000002.sock": false,
		"api-00000000000000aa.sock": true,
		"daemon-web1.sock":          true,
		"api-zz.sock":               true,
		"api-0000000000000003.sock": true,
		"api-0000000000000004.sock": true,
		"api-0000000000000005.sock": true,
	} {
		if exists(at(name)) != want {
			t.Errorf("%s: exists=%v, want %v", name, !want, want)
		}
	}
	if !exists(filepath.Join(outside, "api-0000000000000005.sock")) {
		t.Errorf("a symlink was followed")
	}

	// The directory itself is never reached through a symlink.
	link := filepath.Join(root, "link")
	os.Symlink(outside, link)
	bind(t, filepath.Join(outside, "api-0000000000000006.sock"), false)
	if removed := Sweep(link); len(removed) != 0 || !exists(filepath.Join(outside, "api-0000000000000006.sock")) {
		t.Errorf("swept through a symlinked dir: %v", removed)
	}
	// A missing directory is no error.
	if removed := Sweep(filepath.Join(root, "absent")); len(removed) != 0 {
		t.Errorf("absent: %v", removed)
	}
}

func TestSweepLeavesYoungSockets(t *testing.T) {
	withMinAge(t, time.Hour)
	dir := t.TempDir()
	path := filepath.Join(dir, "api-0000000000000001.sock")
	bind(t, path, false) // sshd binds before it listens: refused, but only for a moment
	if removed := Sweep(dir); len(removed) != 0 || !exists(path) {
		t.Errorf("a young socket was swept: %v", removed)
	}
}

func TestSweepReachesSocketsPastTheAddressLimit(t *testing.T) {
	withMinAge(t, 0)
	dir := t.TempDir()
	for len(dir) < 120 {
		dir = filepath.Join(dir, strings.Repeat("d", 30))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	dirfd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(dirfd)
	const name = "api-0000000000000001.sock"
	short := "/proc/self/fd/" + strconv.Itoa(dirfd) + "/" + name
	fd, _ := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	err = syscall.Bind(fd, &syscall.SockaddrUnix{Name: short})
	syscall.Close(fd)
	if err != nil {
		t.Skipf("cannot bind through /proc: %v", err)
	}
	if removed := Sweep(dir); len(removed) != 1 || exists(filepath.Join(dir, name)) {
		t.Errorf("a dead socket at a %d-byte path stayed: %v", len(dir)+1+len(name), removed)
	}
}

func TestDirIsInHome(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	if got := Dir(); got != "/home/u/.cache/cronium/runner" {
		t.Errorf("Dir() = %q", got)
	}
	t.Setenv("HOME", "")
	if got := Dir(); got != "" || SweepHome() != nil {
		t.Errorf("no HOME: %q", got)
	}
}
