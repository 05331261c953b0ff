// Package payload owns reading a payload: the checksum first, then a safe extraction into a
// private work dir (relative paths of regular files and directories only, no duplicates, capped
// member count and size, members streamed rather than held in memory), and the private
// directories themselves: the work root, per-run work dirs named after their runner, and the
// sweep of work dirs that a killed runner left behind.
package payload

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/hostid"
	"cronium/runner/internal/manifest"
	"cronium/runner/internal/pyjson"
	"cronium/runner/internal/sha256"
)

// Limits of a payload.
const (
	MaxPayloadBytes   = 256 * 1024 * 1024
	MaxExtractedBytes = 1024 * 1024 * 1024
	MaxMembers        = 10000
)

// SHA256Hex is the hex SHA-256 of data.
func SHA256Hex(data []byte) string {
	return sha256.Hex(data)
}

// Verify checks data against the expected checksum ("" : none expected).
func Verify(data []byte, expected string, given bool) error {
	if !given {
		return nil
	}
	actual := SHA256Hex(data)
	if actual != strings.ToLower(strings.TrimSpace(expected)) {
		return exitcode.New(exitcode.ChecksumMismatch, "payload checksum mismatch: expected %s, got %s", expected, actual)
	}
	return nil
}

// Strerror is an OS error's text as C's strerror (and Python's strerror) gives it.
func Strerror(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		s := errno.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	var pathErr *os.PathError
	if errors.As(err, &pathErr) {
		return Strerror(pathErr.Err)
	}
	return err.Error()
}

// PrivateDir creates dir (and its missing parents) mode 0700 and refuses it unless it is a real
// directory that we own and nobody else can use: another user, or a symlink, could redirect
// our files.
func PrivateDir(dir string) error {
	var missing []string
	for p := dir; ; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil {
			break
		}
		missing = append(missing, p)
		if filepath.Dir(p) == p {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return exitcode.New(exitcode.Workdir, "cannot create work root %s: %s", dir, Strerror(err))
		}
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(dir, &st); err != nil {
		return exitcode.New(exitcode.Workdir, "cannot create work root %s: %s", dir, Strerror(err))
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return exitcode.New(exitcode.Workdir, "work root %s is not a directory (a symlink?)", dir)
	}
	if int(st.Uid) != os.Geteuid() {
		return exitcode.New(exitcode.Workdir, "work root %s is owned by uid %d, not by us", dir, st.Uid)
	}
	if st.Mode&0o077 != 0 {
		return exitcode.New(exitcode.Workdir, "work root %s is accessible by others (mode %o)", dir, st.Mode&0o777)
	}
	return nil
}

// RunDirPrefix starts the name of every run's work dir.
const RunDirPrefix = "run-"

var sweepOnce sync.Once

// MakeWorkdir creates a fresh 0700 per-run directory under the private root, named
// run-<host id>-<pid>-<random> so that a later runner on the same host can tell whether its
// runner is gone. The first call of a process also sweeps the work dirs of dead runners.
func MakeWorkdir(root string) (string, error) {
	if err := PrivateDir(root); err != nil {
		return "", err
	}
	sweepOnce.Do(func() { SweepStale(root) })
	dir, err := os.MkdirTemp(root, fmt.Sprintf("%s%s-%d-", RunDirPrefix, hostid.ID(), os.Getpid()))
	if err != nil {
		return "", exitcode.New(exitcode.Workdir, "cannot create a work dir in %s: %s", root, Strerror(err))
	}
	return dir, nil
}

// SweepStale removes the run-* and session-* dirs in root left by runners of this host that are
// gone (killed: they could not clean up): those of this boot whose pid is gone, and those of an
// earlier boot untouched since this boot started. Dirs of other hosts (a shared NFS home) and
// of live runners stay (see hostid.Stale).
func SweepStale(root string) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, entry := range entries {
		name := entry.Name()
		if !strings.HasPrefix(name, RunDirPrefix) && !strings.HasPrefix(name, "session-") {
			continue
		}
		info, err := entry.Info() // lstat
		if err != nil || !info.IsDir() {
			continue
		}
		if hostid.Stale(name[strings.IndexByte(name, '-')+1:], info.ModTime()) {
			os.RemoveAll(filepath.Join(root, name))
		}
	}
}

type member struct {
	path  string // cleaned, relative
	isDir bool
	size  int64
	data  []byte // the content, when cached
}

// recent holds small payloads' checked contents by checksum: a runner session sees the same
// payloads again and again, and a repeated run then skips gunzip and tar.
var recent = struct {
	sync.Mutex
	order   []string
	entries map[string][]member
}{entries: map[string][]member{}}

const (
	recentMaxEntries = 16
	recentMaxSize    = 1024 * 1024
)

func bad(format string, args ...any) error {
	return exitcode.New(exitcode.BadPayload, format, args...)
}

// checkMember returns a member's safe relative path.
func checkMember(h *tar.Header) (string, error) {
	name := h.Name
	if strings.HasPrefix(name, "/") {
		return "", bad("unsafe path in payload: %s", pyjson.ReprString(name))
	}
	var parts []string
	for _, part := range strings.Split(name, "/") {
		switch part {
		case "", ".":
		case "..":
			return "", bad("unsafe path in payload: %s", pyjson.ReprString(name))
		default:
			parts = append(parts, part)
		}
	}
	if len(parts) == 0 {
		return "", bad("unsafe path in payload: %s", pyjson.ReprString(name))
	}
	reported := strings.TrimRight(name, "/")
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeDir, tar.TypeCont, '\x00':
	default:
		return "", bad("payload member %s is not a regular file or directory", pyjson.ReprString(reported))
	}
	return path.Join(parts...), nil
}

// scan reads the archive's headers: every member checked, counted and sized before anything
// is written. The contents are kept while they total at most keepBudget bytes; cached says
// whether they all were.
func scan(data []byte, keepBudget int64) (members []member, cached bool, err error) {
	gz, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, false, bad("payload is not a valid gzip tar archive: %v", err)
	}
	archive := tar.NewReader(gz)
	seen := map[string]bool{}
	var total int64
	cached = true
	for {
		h, err := archive.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, false, bad("payload is not a valid gzip tar archive: %v", err)
		}
		if h.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		if len(members) >= MaxMembers {
			return nil, false, bad("payload has more than %d members", MaxMembers)
		}
		p, err := checkMember(h)
		if err != nil {
			return nil, false, err
		}
		if seen[p] {
			return nil, false, bad("payload member %s appears twice", pyjson.ReprString(p))
		}
		seen[p] = true
		m := member{path: p, isDir: h.Typeflag == tar.TypeDir}
		if !m.isDir {
			m.size = h.Size
			total += h.Size
			if h.Size < 0 || total > MaxExtractedBytes {
				return nil, false, bad("payload expands beyond the size limit")
			}
			cached = cached && total <= keepBudget
			if cached {
				if m.data, err = io.ReadAll(archive); err != nil {
					return nil, false, bad("payload is not a valid gzip tar archive: %v", err)
				}
			}
		}
		members = append(members, m)
	}
	if !cached {
		for i := range members {
			members[i].data = nil
		}
	}
	return members, cached, nil
}

func writeFile(target string, content io.Reader) error {
	if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
		return err
	}
	fd, err := syscall.Open(target, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return &os.PathError{Op: "open", Path: target, Err: err}
	}
	out := os.NewFile(uintptr(fd), target)
	_, err = io.Copy(out, content)
	if closeErr := out.Close(); err == nil {
		err = closeErr
	}
	return err
}

func writeMembers(members []member, workdir string) error {
	for _, m := range members {
		target := filepath.Join(workdir, filepath.FromSlash(m.path))
		if m.isDir {
			if err := os.MkdirAll(target, 0o700); err != nil {
				return err
			}
			continue
		}
		if err := writeFile(target, bytes.NewReader(m.data)); err != nil {
			return err
		}
	}
	return nil
}

// stream writes the members of the archive, read a second time, one after another.
func stream(data []byte, workdir string) error {
	gz, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return err
	}
	archive := tar.NewReader(gz)
	for {
		h, err := archive.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if h.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		p, err := checkMember(h)
		if err != nil {
			return err
		}
		target := filepath.Join(workdir, filepath.FromSlash(p))
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(target, 0o700); err != nil {
				return err
			}
			continue
		}
		if err := writeFile(target, io.LimitReader(archive, h.Size)); err != nil {
			return err
		}
	}
}

// Extract extracts the payload archive into workdir and returns its validated manifest.
// sha256: the payload's verified checksum, under which a small payload's contents are
// remembered for the next run ("" : not verified, not cached).
func Extract(data []byte, workdir, sha256 string) (*manifest.Manifest, error) {
	recent.Lock()
	cached, ok := recent.entries[sha256]
	recent.Unlock()
	var err error
	if ok && sha256 != "" {
		err = writeMembers(cached, workdir)
	} else {
		budget := int64(recentMaxSize)
		if sha256 == "" {
			budget = 0
		}
		members, fits, scanErr := scan(data, budget)
		if scanErr != nil {
			return nil, scanErr
		}
		if fits && sha256 != "" {
			remember(sha256, members)
		}
		if fits {
			err = writeMembers(members, workdir)
		} else {
			err = stream(data, workdir)
		}
	}
	if err != nil {
		var runnerErr *exitcode.Error
		if errors.As(err, &runnerErr) {
			return nil, err
		}
		return nil, bad("payload is not a valid gzip tar archive: %s", osMessage(err))
	}
	manifestPath := filepath.Join(workdir, manifest.Name)
	if st, err := os.Stat(manifestPath); err != nil || !st.Mode().IsRegular() {
		return nil, bad("payload has no %s", manifest.Name)
	}
	text, err := os.ReadFile(manifestPath)
	if err != nil {
		return nil, bad("payload has no %s", manifest.Name)
	}
	m, err := manifest.Parse(text)
	if err != nil {
		return nil, exitcode.New(exitcode.BadManifest, "invalid manifest: %v", err)
	}
	if st, err := os.Stat(filepath.Join(workdir, m.Entrypoint)); err != nil || !st.Mode().IsRegular() {
		return nil, bad("payload has no entrypoint %s", pyjson.ReprString(m.Entrypoint))
	}
	return m, nil
}

func osMessage(err error) string {
	var pathErr *os.PathError
	if errors.As(err, &pathErr) {
		return fmt.Sprintf("[Errno %d] %s: %s", errnoOf(pathErr.Err), Strerror(pathErr.Err), pyjson.ReprString(pathErr.Path))
	}
	return err.Error()
}

func errnoOf(err error) int {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return int(errno)
	}
	return 0
}

func remember(sha string, members []member) {
	recent.Lock()
	defer recent.Unlock()
	if _, ok := recent.entries[sha]; ok {
		return
	}
	if len(recent.order) >= recentMaxEntries {
		delete(recent.entries, recent.order[0])
		recent.order = recent.order[1:]
	}
	recent.order = append(recent.order, sha)
	recent.entries[sha] = members
}
