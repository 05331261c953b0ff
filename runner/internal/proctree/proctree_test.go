package proctree

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// The walk down the children lists finds what the scan of every process finds: a child, its
// child, and an orphan that left by setsid and a double fork (adopted by us, the subreaper);
// a process kept apart is left out, with its descendants.
func TestDescendantsAreWhatTheFullScanFinds(t *testing.T) {
	BecomeSubreaper()
	if !subreaper.Load() {
		t.Skip("the kernel gives no child subreaper here")
	}
	self := os.Getpid()
	if _, ok := descendants(self); !ok {
		t.Skip("the kernel keeps no children lists here")
	}
	if hasChildren() {
		t.Fatal("children before any was started")
	}
	mark := []byte(MarkVariable + "=proctree-test")
	script := exec.Command("sh", "-c", "sleep 60 & setsid sh -c 'sleep 60 &'; sleep 60; wait")
	script.Env = append(os.Environ(), string(mark))
	if err := script.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for pid := range scan(self, mark) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		for { // reap them all, the adopted ones too (all killed: this ends)
			if _, err := syscall.Wait4(-1, nil, 0, nil); err == syscall.ECHILD {
				return
			}
		}
	})
	adopted := func(found map[int]byte) int {
		buf := make([]byte, 1024)
		for pid := range found {
			if e, ok := statOf(pid, buf); ok && e.ppid == self && pid != script.Process.Pid {
				return pid
			}
		}
		return 0
	}
	var walked map[int]byte
	for limit := time.Now().Add(10 * time.Second); ; {
		walked, _ = descendants(self)
		if adopted(walked) != 0 && len(walked) >= 4 { // sh, two sleeps under it, the orphan
			break
		}
		if time.Now().After(limit) {
			t.Fatalf("the orphan was not adopted within 10 s: %v", walked)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !hasChildren() {
		t.Fatal("no children seen while the script runs")
	}
	scanned := scan(self, mark)
	if len(scanned) != len(walked) {
		t.Fatalf("the walk found %v, the scan %v", walked, scanned)
	}
	for pid := range scanned {
		if _, ok := walked[pid]; !ok {
			t.Fatalf("the walk missed %d: walked %v, scanned %v", pid, walked, scanned)
		}
	}

	KeepApart(script.Process.Pid)
	defer Rejoin(script.Process.Pid)
	apartWalk, _ := descendants(self)
	if len(apartWalk) != 1 || apartWalk[adopted(walked)] == 0 {
		t.Fatalf("with the script kept apart, only the adopted orphan should be left: %v", apartWalk)
	}
}
