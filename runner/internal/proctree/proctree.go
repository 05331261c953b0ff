// Package proctree owns finding a run's processes: the child-subreaper setting that keeps a
// script's double-forked and setsid descendants in the runner's process tree where the kernel
// gives one, and the per-run mark in every process's environment (CRONIUM_RUN_MARK) that finds
// them where it does not (qemu-user emulation), both read from /proc.
//
// With the subreaper confirmed, a run's processes are the runner's descendants, found by walking
// down from it (/proc/<pid>/task/<tid>/children): the cost follows the run's own tree. Without
// it, every process on the server is read (its stat, and its environment for the mark), which
// on a server with a few hundred processes cost a run more CPU than everything else it did
// (benchmarks/analysis.md).
package proctree

import (
	"bytes"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// apart holds the pids set apart from the runs of the process that started them (KeepApart).
var apart sync.Map

// KeepApart leaves pid and its descendants out of every Processes walk from here on: a detached
// run's keeper is a child of the session that started it, but no part of the session's next
// run, whose stop must not reach it. Rejoin undoes it once the keeper is gone.
func KeepApart(pid int) { apart.Store(pid, struct{}{}) }

// Rejoin ends KeepApart for pid (its number may be reused).
func Rejoin(pid int) { apart.Delete(pid) }

// MarkVariable is the environment variable that carries a run's mark.
const MarkVariable = "CRONIUM_RUN_MARK"

const (
	prSetChildSubreaper = 36
	prGetChildSubreaper = 37
)

// subreaper: this process is a child subreaper, as the kernel confirmed.
var subreaper atomic.Bool

// BecomeSubreaper makes this process a child subreaper: orphaned descendants are reparented
// to it instead of init. Where the kernel (or an emulator) does not confirm it, the mark still
// finds the escaped processes.
func BecomeSubreaper() {
	if _, _, errno := syscall.RawSyscall6(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0, 0, 0, 0); errno != 0 {
		return
	}
	var on int32
	_, _, errno := syscall.RawSyscall6(syscall.SYS_PRCTL, prGetChildSubreaper, uintptr(unsafe.Pointer(&on)), 0, 0, 0, 0)
	subreaper.Store(errno == 0 && on == 1)
}

type entry struct {
	ppid  int
	state byte
}

// table is pid -> (ppid, state) from /proc; empty where there is no /proc.
func table() map[int]entry {
	t := map[int]entry{}
	dir, err := os.Open("/proc")
	if err != nil {
		return t
	}
	names, _ := dir.Readdirnames(-1)
	dir.Close()
	buf := make([]byte, 1024)
	for _, name := range names {
		if name == "" || name[0] < '0' || name[0] > '9' {
			continue
		}
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		if e, ok := statOf(pid, buf); ok {
			t[pid] = e
		}
	}
	return t
}

// statOf is pid's parent and state from /proc/<pid>/stat; ok false when it is gone.
func statOf(pid int, buf []byte) (entry, bool) {
	n, err := readFile("/proc/"+strconv.Itoa(pid)+"/stat", buf)
	if err != nil {
		return entry{}, false
	}
	stat := buf[:n]
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 || end+2 >= len(stat) {
		return entry{}, false
	}
	fields := bytes.Fields(stat[end+2:])
	if len(fields) < 2 {
		return entry{}, false
	}
	ppid, _ := strconv.Atoi(string(fields[1]))
	return entry{ppid, fields[0][0]}, true
}

func readFile(path string, buf []byte) (int, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	total := 0
	for total < len(buf) {
		n, err := syscall.Read(fd, buf[total:])
		if n <= 0 || err != nil {
			break
		}
		total += n
	}
	return total, nil
}

func hasMark(pid int, mark []byte) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return false
	}
	for _, item := range bytes.Split(data, []byte{0}) {
		if bytes.Equal(item, mark) {
			return true
		}
	}
	return false
}

// Processes returns the processes of a run, pid -> state ('Z' for a zombie): every descendant
// of root, and every process whose environment carries mark ("CRONIUM_RUN_MARK=<hex>") with
// its descendants; processes kept apart (KeepApart) and theirs are left out.
func Processes(root int, mark []byte) map[int]byte {
	if root == os.Getpid() && subreaper.Load() {
		if !hasChildren() {
			return map[int]byte{} // the usual end of a run: nothing left, nothing to read
		}
		if found, ok := descendants(root); ok {
			return found // none can have left the tree: the mark would find nothing more
		}
	}
	return scan(root, mark)
}

// scan is Processes from every process on the server: their parents, and their environments
// for the mark.
func scan(root int, mark []byte) map[int]byte {
	t := table()
	children := map[int][]int{}
	for pid, e := range t {
		children[e.ppid] = append(children[e.ppid], pid)
	}
	found := map[int]byte{}
	pending := append([]int(nil), children[root]...)
	for pid := range t {
		if pid != root && hasMark(pid, mark) {
			pending = append(pending, pid)
		}
	}
	for len(pending) > 0 {
		pid := pending[len(pending)-1]
		pending = pending[:len(pending)-1]
		if _, seen := found[pid]; seen {
			continue
		}
		if _, kept := apart.Load(pid); kept {
			continue
		}
		e, ok := t[pid]
		if !ok {
			continue
		}
		found[pid] = e.state
		pending = append(pending, children[pid]...)
	}
	return found
}

// descendants returns root's descendants, pid -> state, walking down through each process's
// tasks' children lists (a child is listed under the thread that made it, an adopted orphan
// under one of the adopter's); those kept apart and theirs are left out. ok is false where the
// kernel keeps no children lists (CONFIG_PROC_CHILDREN).
func descendants(root int) (found map[int]byte, ok bool) {
	found = map[int]byte{}
	buf := make([]byte, 1024)
	pending := []int{root}
	for len(pending) > 0 {
		pid := pending[len(pending)-1]
		pending = pending[:len(pending)-1]
		taskDir := "/proc/" + strconv.Itoa(pid) + "/task/"
		dir, err := os.Open(taskDir)
		if err != nil {
			if pid == root {
				return nil, false
			}
			continue // gone meanwhile
		}
		tids, _ := dir.Readdirnames(-1)
		dir.Close()
		for _, tid := range tids {
			list, err := os.ReadFile(taskDir + tid + "/children")
			if err != nil {
				if pid == root && os.IsNotExist(err) {
					return nil, false
				}
				continue
			}
			for _, field := range bytes.Fields(list) {
				child, err := strconv.Atoi(string(field))
				if err != nil {
					continue
				}
				if _, seen := found[child]; seen {
					continue
				}
				if _, kept := apart.Load(child); kept {
					continue
				}
				e, alive := statOf(child, buf)
				if !alive {
					continue
				}
				found[child] = e.state
				pending = append(pending, child)
			}
		}
	}
	return found, true
}

// hasChildren says whether this process has a child, running or not yet waited for (a
// subreaper's descendants all are, or descend from, its children). It waits for none.
func hasChildren() bool {
	const pAll, wExited, wNoHang, wNoWait = 0, 4, 1, 0x1000000
	var info [128]byte // siginfo_t
	_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pAll, 0, uintptr(unsafe.Pointer(&info[0])), wExited|wNoHang|wNoWait, 0, 0)
	return errno != syscall.ECHILD
}
