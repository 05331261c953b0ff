package lockfile

import (
	"path/filepath"
	"syscall"
	"testing"
)

func TestExclusiveHoldsTheLockUntilClosed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	lock, err := Exclusive(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	other, err := Exclusive(path+".other", 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	second, err := syscall.Open(path, syscall.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(second)
	if err := syscall.Flock(second, syscall.LOCK_EX|syscall.LOCK_NB); err != syscall.EWOULDBLOCK {
		t.Fatalf("a second exclusive lock succeeded while the first was held: %v", err)
	}
	lock.Close()
	if err := syscall.Flock(second, syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatalf("the lock was not released by Close: %v", err)
	}
}
