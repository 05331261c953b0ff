// Package hostid owns the names that tell one host's (and one boot's) runner files from
// another's: a shared NFS home holds the work dirs and sessions of runners on several hosts
// (cloned VMs and containers among them, which may share a host name, a boot id or a pid
// namespace's numbers), and a runner may delete only what a dead runner of its own host left.
package hostid

import (
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"cronium/runner/internal/sha256"
)

var (
	once     sync.Once
	host     string    // 8 hex digits: the hash of the machine id and the host name
	boot     string    // 8 hex digits: the hash of the boot id and the pid namespace
	bootTime time.Time // this boot's start (zero when unknown)
)

// machineIDFiles are read in turn for the machine id (systemd's, then D-Bus's).
var machineIDFiles = []string{"/etc/machine-id", "/var/lib/dbus/machine-id"}

func load() {
	host = hostPart(machineID(machineIDFiles), hostname())
	boot = bootPart(readTrimmed("/proc/sys/kernel/random/boot_id"), pidNamespace())
	bootTime = readBootTime()
}

func readTrimmed(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// machineID is the first non-empty one of files; "" when none is readable.
func machineID(files []string) string {
	for _, path := range files {
		if id := readTrimmed(path); id != "" {
			return id
		}
	}
	return ""
}

func hostname() string {
	name, _ := os.Hostname()
	return name
}

// pidNamespace names this process's pid namespace ("pid:[4026531836]"): containers on one
// kernel share its boot id, but a pid means something only in its own namespace.
func pidNamespace() string {
	ns, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return ""
	}
	return ns
}

func hash8(text string) string {
	h := sha256.Sum256([]byte(text))
	return hex.EncodeToString(h[:4])
}

// hostPart hashes the machine id (when there is one) with the host name: clones of one VM
// image, and containers, often share one of them but seldom both.
func hostPart(machineID, hostname string) string {
	if machineID == "" {
		return hash8(hostname)
	}
	return hash8(machineID + "\x00" + hostname)
}

// bootPart hashes the boot id with the pid namespace, so that a match means "pids here are
// pids of this kernel boot as this process sees them".
func bootPart(bootID, pidNS string) string {
	if bootID == "" {
		bootID = "unknown"
	}
	if pidNS == "" {
		return hash8(bootID)
	}
	return hash8(bootID + "\x00" + pidNS)
}

// readBootTime is /proc/stat's btime (the Unix time this kernel booted); zero when unknown.
func readBootTime() time.Time {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}
	}
	for _, line := range strings.Split(string(data), "\n") {
		if value, ok := strings.CutPrefix(line, "btime "); ok {
			if secs, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64); err == nil && secs > 0 {
				return time.Unix(secs, 0)
			}
		}
	}
	return time.Time{}
}

// ID is "h" + this host's 8 hex digits + this boot's 8 hex digits (short: it goes into paths
// that may hold Unix sockets).
func ID() string {
	once.Do(load)
	return "h" + host + boot
}

// BootTime is when this boot started (zero when /proc/stat is unreadable).
func BootTime() time.Time {
	once.Do(load)
	return bootTime
}

// Stale says whether a name that follows a prefix (run-, session-), "<ID>-<pid>-...", whose
// directory was last modified at mtime, belongs to a runner of this host that is gone:
//
//   - its host part must be this host's (names of other hosts are never stale);
//   - of this boot (and pid namespace): its pid must not be alive;
//   - of another boot (or pid namespace): it must not have been modified since this boot
//     started, so it cannot be a live dir of a clone or a container that shares our host part.
//
// Names not in this form are never stale.
func Stale(rest string, mtime time.Time) bool {
	once.Do(load)
	return stale(rest, mtime, host, boot, bootTime, Alive)
}

func stale(rest string, mtime time.Time, host, boot string, bootTime time.Time, alive func(int) bool) bool {
	id, after, ok := strings.Cut(rest, "-")
	if !ok || len(id) != 17 || id[0] != 'h' || id[1:9] != host {
		return false
	}
	if id[9:] != boot {
		return !bootTime.IsZero() && !mtime.IsZero() && mtime.Before(bootTime)
	}
	pidText, _, _ := strings.Cut(after, "-")
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return false
	}
	return !alive(pid)
}

// Alive says whether a process exists (one of another user counts).
func Alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || err == syscall.EPERM
}
