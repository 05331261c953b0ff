// Package apisocket sweeps the API-mode forward sockets that dropped orchestrator connections
// left behind. While API runs use a connection, the orchestrator has sshd forward a Unix socket,
// ~/.cache/cronium/runner/api-<16 hex>.sock, and removes it afterwards; a connection that drops
// first cannot, and sshd leaves the file. A runner starting `serve` or `daemon` removes such a
// file when nothing listens on it any more.
package apisocket

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cronium/runner/internal/protocol"
)

// Subdir is the forward sockets' directory, relative to the home directory.
const Subdir = protocol.CacheDir + "/runner"

// MinAge is how long a socket file must have existed before it may be swept: sshd binds the
// socket before it listens, and a connection in between is refused too.
const MinAge = time.Minute

var minAge = MinAge // tests shorten it

const (
	oPath       = 0x200000 // O_PATH: the same value on every Linux architecture the runner builds for
	maxSockPath = 107      // sun_path holds 108 bytes, the last one a NUL
)

// networkFS are the f_type values of file systems that other hosts may share: there a socket
// whose listener is on another host refuses a connection from this one although it is live.
var networkFS = map[uint32]bool{
	0x6969:     true, // NFS
	0x517b:     true, // SMB
	0xff534d42: true, // CIFS
	0xfe534d42: true, // SMB2
	0x5346414f: true, // AFS
	0x73757245: true, // Coda
	0x00c36400: true, // Ceph
	0x65735546: true, // FUSE (sshfs, GlusterFS, ...)
	0x01021997: true, // 9P
	0x01161970: true, // GFS2
	0x7461636f: true, // OCFS2
	0x0bd00bd0: true, // Lustre
	0x564c:     true, // NCP
}

// Dir is the forward sockets' directory in $HOME; "" when HOME is not set.
func Dir() string {
	home := os.Getenv("HOME")
	if home == "" {
		return ""
	}
	return filepath.Join(home, Subdir)
}

// SweepHome sweeps Dir(); see Sweep.
func SweepHome() []string {
	dir := Dir()
	if dir == "" {
		return nil
	}
	return Sweep(dir)
}

// IsForwardName says whether name has the form api-<hex>.sock.
func IsForwardName(name string) bool {
	middle, ok := strings.CutPrefix(name, "api-")
	if !ok {
		return false
	}
	middle, ok = strings.CutSuffix(middle, ".sock")
	if !ok || middle == "" {
		return false
	}
	for i := 0; i < len(middle); i++ {
		if c := middle[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// Sweep removes the api-<hex>.sock files in dir that are sockets owned by this user, at least
// MinAge old, on which a connection is refused (ECONNREFUSED: nobody listens). It never
// follows a symlink (dir itself must not be one, and must be owned by this user), never
// removes anything else, and does nothing on a network file system. It returns the names
// removed.
func Sweep(dir string) []string {
	dirfd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	file := os.NewFile(uintptr(dirfd), dir)
	defer file.Close()
	uid := uint32(os.Geteuid())
	var st syscall.Stat_t
	if syscall.Fstat(dirfd, &st) != nil || st.Uid != uid {
		return nil
	}
	var fs syscall.Statfs_t
	if syscall.Fstatfs(dirfd, &fs) != nil || networkFS[uint32(fs.Type)] {
		return nil
	}
	names, _ := file.Readdirnames(-1)
	var removed []string
	for _, name := range names {
		if IsForwardName(name) && sweepOne(dir, dirfd, name, uid) {
			removed = append(removed, name)
		}
	}
	return removed
}

// socketAt stats name in dirfd without following a symlink: ok when it is a socket owned by
// uid. The fd (O_PATH) is returned open.
func socketAt(dirfd int, name string, uid uint32) (fd int, st syscall.Stat_t, ok bool) {
	fd, err := syscall.Openat(dirfd, name, oPath|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return -1, st, false
	}
	if syscall.Fstat(fd, &st) != nil || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK || st.Uid != uid {
		syscall.Close(fd)
		return -1, st, false
	}
	return fd, st, true
}

func sweepOne(dir string, dirfd int, name string, uid uint32) bool {
	fd, st, ok := socketAt(dirfd, name, uid)
	if !ok {
		return false
	}
	changed := time.Unix(st.Ctim.Unix())
	if modified := time.Unix(st.Mtim.Unix()); modified.After(changed) {
		changed = modified
	}
	if time.Since(changed) < minAge {
		syscall.Close(fd)
		return false
	}
	// Connect to the very inode just checked (through /proc), else by its path.
	target := "/proc/self/fd/" + strconv.Itoa(fd)
	if _, err := os.Lstat(target); err != nil {
		target = filepath.Join(dir, name)
	}
	dead := refused(target)
	syscall.Close(fd)
	if !dead {
		return false
	}
	again, now, ok := socketAt(dirfd, name, uid) // still the same file?
	if !ok {
		return false
	}
	syscall.Close(again)
	if now.Ino != st.Ino || now.Dev != st.Dev {
		return false
	}
	return syscall.Unlinkat(dirfd, name) == nil
}

// refused says whether connecting to the socket at path gives ECONNREFUSED. The connect is
// non-blocking: a live listener with a full backlog says EAGAIN, not refused.
func refused(path string) bool {
	if len(path) > maxSockPath {
		return false
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		return false
	}
	defer syscall.Close(fd)
	return syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}) == syscall.ECONNREFUSED
}
