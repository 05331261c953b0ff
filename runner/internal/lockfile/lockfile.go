// Package lockfile owns the runner's advisory file locks: an exclusive flock on a lock file,
// waited for again when a signal interrupts the wait.
package lockfile

import (
	"os"
	"syscall"
)

// Exclusive opens the lock file at path (creating it with perm) and returns it holding an
// exclusive flock, which lasts until the file is closed.
func Exclusive(path string, perm os.FileMode) (*os.File, error) {
	lock, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, perm)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(lock.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		lock.Close()
		return nil, err
	}
	return lock, nil
}
