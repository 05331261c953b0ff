// Package hostid owns the names that tell one host's (and one boot's) runner files from
// another's: a shared NFS home holds the work dirs and sessions of runners on several hosts,
// and a runner may delete only what a dead runner of its own host and boot left.
package hostid

import (
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"cronium/runner/internal/sha256"
)

var (
	once sync.Once
	host string // 8 hex digits of the host name's hash
	boot string // 8 hex digits of the boot id's hash
)

func load() {
	name, _ := os.Hostname()
	h := sha256.Sum256([]byte(name))
	host = hex.EncodeToString(h[:4])
	id, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		id = []byte("unknown")
	}
	b := sha256.Sum256([]byte(strings.TrimSpace(string(id))))
	boot = hex.EncodeToString(b[:4])
}

// ID is "h" + this host's 8 hex digits + this boot's 8 hex digits.
func ID() string {
	once.Do(load)
	return "h" + host + boot
}

// Stale says whether a name that follows a prefix (run-, session-), "<ID>-<pid>-...", belongs
// to a runner of this host that is gone: one of an earlier boot, or whose pid is not alive.
// Names of other hosts, and names not in this form, are never stale.
func Stale(rest string) bool {
	once.Do(load)
	id, after, ok := strings.Cut(rest, "-")
	if !ok || len(id) != 17 || id[0] != 'h' || id[1:9] != host {
		return false
	}
	if id[9:] != boot {
		return true
	}
	pidText, _, _ := strings.Cut(after, "-")
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return false
	}
	return !Alive(pid)
}

// Alive says whether a process exists (one of another user counts).
func Alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || err == syscall.EPERM
}
