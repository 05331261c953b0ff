package execute

import (
	"bufio"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"cronium/runner/internal/pyjson"
)

func TestBecomeFromValidates(t *testing.T) {
	parse := func(text string) (*Become, error) {
		v, err := pyjson.Parse([]byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return BecomeFrom(v)
	}
	b, err := parse(`{"user": "root", "password": "s3cret"}`)
	if err != nil || b.User != "root" || !b.HasPassword || b.Password != "s3cret" {
		t.Fatalf("got %+v, %v", b, err)
	}
	if b, err := parse(`{"user": "postgres", "password": null}`); err != nil || b.HasPassword {
		t.Fatalf("no password: got %+v, %v", b, err)
	}
	for _, bad := range []string{`[]`, `{}`, `{"user": "-u"}`, `{"user": "#0"}`, `{"user": "a b"}`,
		`{"user": "root", "password": "two\nlines"}`, `{"user": "root", "password": 5}`} {
		if _, err := parse(bad); err == nil || !strings.Contains(err.Error(), "become") {
			t.Errorf("%s: accepted (%v)", bad, err)
		}
	}
}

// fakeSudo plays sudo on the other ends of the handshake's pipes: script is what it does.
type fakeSudo struct {
	stderr *os.File      // sudo's stderr (we write)
	stdin  *bufio.Reader // sudo's stdin (we read)
}

func runHandshake(t *testing.T, b *Become, play func(s fakeSudo)) ([]byte, bool) {
	t.Helper()
	errR, errW, _ := os.Pipe()
	inR, inW, _ := os.Pipe()
	b.spec = []byte(`{"argv": ["bash", "script.sh"]}` + "\n")
	played := make(chan struct{})
	go func() {
		defer close(played)
		play(fakeSudo{errW, bufio.NewReader(inR)})
		errW.Close()
	}()
	type result struct {
		rest  []byte
		ready bool
	}
	done := make(chan result, 1)
	go func() {
		rest, ready := b.handshake(errR, inW)
		done <- result{rest, ready}
	}()
	select {
	case r := <-done:
		<-played
		return r.rest, r.ready
	case <-time.After(10 * time.Second):
		t.Fatal("the handshake hung")
	}
	return nil, false
}

func TestHandshakeAnswersThePromptOnceThenHandsOverTheSpec(t *testing.T) {
	b := &Become{User: "root", Password: "pw-1", HasPassword: true}
	var password, spec string
	rest, ready := runHandshake(t, b, func(s fakeSudo) {
		s.stderr.WriteString("We trust you have received the usual lecture.\n" + BecomePrompt)
		password, _ = s.stdin.ReadString('\n')
		s.stderr.WriteString(BecomeReady[:5]) // the ready line in two writes
		s.stderr.WriteString(BecomeReady[5:] + "script's first words")
		data, _ := io.ReadAll(s.stdin) // the spec, then the end of stdin
		spec = string(data)
	})
	if !ready || string(rest) != "script's first words" {
		t.Fatalf("ready %v, rest %q (failure %q)", ready, rest, b.Failure)
	}
	if password != "pw-1\n" || !strings.HasPrefix(spec, `{"argv"`) || strings.Contains(spec, "pw-1") {
		t.Fatalf("password line %q, spec %q", password, spec)
	}
}

func TestHandshakeWithoutAPromptNeverSendsThePassword(t *testing.T) {
	b := &Become{User: "root", Password: "pw-2", HasPassword: true}
	var stdin string
	_, ready := runHandshake(t, b, func(s fakeSudo) { // NOPASSWD: the command starts at once
		s.stderr.WriteString(BecomeReady)
		data, _ := io.ReadAll(s.stdin)
		stdin = string(data)
	})
	if !ready || strings.Contains(stdin, "pw-2") || !strings.HasPrefix(stdin, `{"argv"`) {
		t.Fatalf("ready %v, the command's stdin %q", ready, stdin)
	}
}

func TestHandshakeReportsSudosReason(t *testing.T) {
	cases := []struct {
		name     string
		become   Become
		play     func(s fakeSudo)
		contains []string
	}{
		{"wrong password", Become{User: "root", Password: "pw-3", HasPassword: true}, func(s fakeSudo) {
			s.stderr.WriteString(BecomePrompt)
			s.stdin.ReadString('\n')
			s.stderr.WriteString("Sorry, try again.\n" + BecomePrompt)
			if _, err := s.stdin.ReadString('\n'); err == io.EOF { // stdin closed: no second try
				s.stderr.WriteString("sudo: no password was provided\nsudo: 1 incorrect password attempt\n")
			}
		}, []string{"did not accept the password to run as root", "Sorry, try again.", "1 incorrect password attempt"}},
		{"not in sudoers", Become{User: "root", Password: "pw-4", HasPassword: true}, func(s fakeSudo) {
			s.stderr.WriteString(BecomePrompt)
			s.stdin.ReadString('\n')
			s.stderr.WriteString("intruder is not in the sudoers file.\n")
		}, []string{"sudo refused to run as root: intruder is not in the sudoers file."}},
		{"no password", Become{User: "root"}, func(s fakeSudo) {
			s.stderr.WriteString(BecomePrompt)
			if _, err := s.stdin.ReadString('\n'); err == io.EOF {
				s.stderr.WriteString("sudo: no password was provided\n")
			}
		}, []string{"needs a password to run as root and none was given"}},
		{"echoed password", Become{User: "root", Password: "pw-5", HasPassword: true}, func(s fakeSudo) {
			s.stderr.WriteString("sudo: odd pam module says pw-5\n")
		}, []string{"says ***"}},
	}
	for _, c := range cases {
		b := c.become
		rest, ready := runHandshake(t, &b, c.play)
		if ready || rest != nil {
			t.Errorf("%s: ready %v", c.name, ready)
		}
		for _, want := range c.contains {
			if !strings.Contains(b.Failure, want) {
				t.Errorf("%s: %q lacks %q", c.name, b.Failure, want)
			}
		}
		if b.HasPassword && strings.Contains(b.Failure, b.Password) || strings.Contains(b.Failure, BecomePrompt) {
			t.Errorf("%s: %q shows the password or the prompt", c.name, b.Failure)
		}
	}
}

func TestGiveBackChownsTheTreeAndFollowsNoLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	outside := filepath.Join(t.TempDir(), "outside")
	os.WriteFile(outside, []byte("x"), 0o600)
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "sub", "deeper"), 0o755)
	os.WriteFile(filepath.Join(dir, "output.json"), []byte("1"), 0o644)
	os.WriteFile(filepath.Join(dir, "sub", "deeper", "f"), []byte("1"), 0o644)
	os.Symlink(outside, filepath.Join(dir, "sub", "link"))
	owner := ids{4242, 4343}
	os.Chown(dir, owner.uid, owner.gid) // the login user's work dir; root made the rest
	if err := giveBack(dir, owner); err != nil {
		t.Fatal(err)
	}
	filepath.Walk(dir, func(path string, info os.FileInfo, _ error) error {
		st := info.Sys().(*syscall.Stat_t)
		if int(st.Uid) != owner.uid || int(st.Gid) != owner.gid {
			t.Errorf("%s still owned by %d:%d", path, st.Uid, st.Gid)
		}
		return nil
	})
	var st syscall.Stat_t
	syscall.Stat(outside, &st)
	if st.Uid != 0 {
		t.Errorf("the symlink's target was chowned to %d", st.Uid)
	}
	other := t.TempDir() // root's: not a dir of the user who ran sudo
	if err := giveBack(other, owner); err == nil {
		t.Error("gave back a directory that is not the user's")
	}
}

// A root script that hard-links a system file into the work dir (`ln /etc/passwd .`, `cp -al`,
// rsync --link-dest) must not have giveBack hand that file to the login user: the link is the
// file itself.
func TestGiveBackLeavesHardLinkedFilesAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	outside := filepath.Join(t.TempDir(), "system-file")
	if err := os.WriteFile(outside, []byte("root's"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Link(outside, filepath.Join(dir, "linked")); err != nil {
		t.Skip("cannot hard-link here:", err)
	}
	os.WriteFile(filepath.Join(dir, "made-by-root"), []byte("1"), 0o644)
	owner := ids{4242, 4343}
	os.Chown(dir, owner.uid, owner.gid)
	giveBack(dir, owner)
	var st syscall.Stat_t
	syscall.Stat(outside, &st)
	if st.Uid != 0 || st.Gid != 0 {
		t.Errorf("a file outside the work dir, hard-linked into it, was given to %d:%d", st.Uid, st.Gid)
	}
	syscall.Lstat(filepath.Join(dir, "made-by-root"), &st)
	if int(st.Uid) != owner.uid {
		t.Errorf("the script's own file was not given back (uid %d)", st.Uid)
	}
}

// A root script that mounts something inside the work dir (a bind mount of /, a disk image)
// and is stopped before it unmounts must not have giveBack chown that other filesystem.
func TestGiveBackStaysOnTheWorkDirsFilesystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mount and chown need root")
	}
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if err := syscall.Mount("cronium-test", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Skip("cannot mount a tmpfs here:", err)
	}
	defer syscall.Unmount(mnt, syscall.MNT_DETACH)
	os.MkdirAll(filepath.Join(mnt, "etc"), 0o755)
	os.WriteFile(filepath.Join(mnt, "etc", "shadow"), []byte("root's"), 0o600)
	os.WriteFile(filepath.Join(dir, "made-by-root"), []byte("1"), 0o644)
	owner := ids{4242, 4343}
	os.Chown(dir, owner.uid, owner.gid)
	giveBack(dir, owner)
	for _, path := range []string{mnt, filepath.Join(mnt, "etc"), filepath.Join(mnt, "etc", "shadow")} {
		var st syscall.Stat_t
		syscall.Lstat(path, &st)
		if st.Uid != 0 {
			t.Errorf("%s, on another filesystem mounted in the work dir, was given to uid %d", path, st.Uid)
		}
	}
	var st syscall.Stat_t
	syscall.Lstat(filepath.Join(dir, "made-by-root"), &st)
	if int(st.Uid) != owner.uid {
		t.Errorf("the script's own file was not given back (uid %d)", st.Uid)
	}
}

// The script's environment as root: the login session's loader and shell start-up variables
// are not passed (sudo's env_reset would have removed them), and PATH is sudo's own (its
// secure_path) after the helpers, not the login user's (which may start with ~/bin).
func TestTargetEnvDropsTheLoginSessionsDangerousVariables(t *testing.T) {
	t.Setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
	got := map[string]string{}
	for _, kv := range targetEnv([]string{"LD_PRELOAD=/home/u/evil.so", "LD_LIBRARY_PATH=/home/u/lib",
		"BASH_ENV=/home/u/.evil", "ENV=/home/u/.evil", "SHELLOPTS=xtrace", "PS4=$(id)", "IFS=x",
		"PYTHONSTARTUP=/home/u/s.py", "PERL5OPT=-Mevil", "GCONV_PATH=/home/u", "DB_PASSWORD=s3cret",
		"CRONIUM_DIR=/home/u/.cache/w", "PATH=/home/u/.cache/h/bin:/home/u/bin:/usr/bin"}, "/home/u/.cache/h") {
		k, v, _ := strings.Cut(kv, "=")
		got[k] = v
	}
	for _, name := range []string{"LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "SHELLOPTS", "PS4",
		"IFS", "PYTHONSTARTUP", "PERL5OPT", "GCONV_PATH"} {
		if v, ok := got[name]; ok {
			t.Errorf("%s=%s reaches the script as root", name, v)
		}
	}
	if got["DB_PASSWORD"] != "s3cret" || got["CRONIUM_DIR"] != "/home/u/.cache/w" {
		t.Errorf("the run's own variables were lost: %v", got)
	}
	if want := "/home/u/.cache/h/bin:/usr/sbin:/usr/bin:/sbin:/bin"; got["PATH"] != want {
		t.Errorf("PATH as root is %q, want %q", got["PATH"], want)
	}
}

// A setuid/setgid bit (or a file capability) that a root script put on a file in the work dir
// must not stay there for the login user: chowning clears them, even where the owner is right.
func TestGiveBackClearsSetIDBits(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	dir := t.TempDir()
	owner := ids{4242, 4343}
	os.Chown(dir, owner.uid, owner.gid)
	for name, uid := range map[string]int{"root-suid": 0, "user-suid": owner.uid} {
		path := filepath.Join(dir, name)
		os.WriteFile(path, []byte("#!/bin/sh\n"), 0o755)
		os.Chown(path, uid, owner.gid)
		if err := os.Chmod(path, 0o6755|os.ModeSetuid|os.ModeSetgid); err != nil {
			t.Fatal(err)
		}
	}
	giveBack(dir, owner)
	for _, name := range []string{"root-suid", "user-suid"} {
		var st syscall.Stat_t
		syscall.Lstat(filepath.Join(dir, name), &st)
		if st.Mode&(syscall.S_ISUID|syscall.S_ISGID) != 0 || int(st.Uid) != owner.uid {
			t.Errorf("%s: mode %o, uid %d after giving back", name, st.Mode&0o7777, st.Uid)
		}
	}
}

// A mount the root script left in the work dir (stopped before its umount) is detached before
// the work dir goes back: else the login side's clean-up would delete through it.
func TestUnmountUnderDetachesLeftMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mount needs root")
	}
	dir := t.TempDir()
	outside := t.TempDir()
	mnt := filepath.Join(dir, "a dir", "mnt")
	os.MkdirAll(filepath.Join(mnt), 0o755)
	if err := syscall.Mount("cronium-test", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Skip("cannot mount a tmpfs here:", err)
	}
	defer syscall.Unmount(mnt, syscall.MNT_DETACH)
	os.Mkdir(filepath.Join(mnt, "inner"), 0o755)
	if err := syscall.Mount("cronium-test", filepath.Join(mnt, "inner"), "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("cronium-test", outside, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(outside, syscall.MNT_DETACH)
	if err := unmountUnder(dir); err != nil {
		t.Fatal(err)
	}
	var top, st syscall.Stat_t
	syscall.Stat(dir, &top)
	syscall.Stat(mnt, &st)
	if st.Dev != top.Dev {
		t.Error("the mount in the work dir is still there")
	}
	syscall.Stat(outside, &st)
	if st.Dev == top.Dev {
		t.Error("a mount outside the work dir was detached")
	}
}

// sudo itself is started with a minimal environment: the run's environment (the event's
// secrets, the login session's loader variables) travels in the spec on stdin. sudo would
// otherwise hold the secrets in its environment and may log it (its JSON event log and log
// server record the submitting user's environment).
func TestSudoIsStartedWithoutTheRunsEnvironment(t *testing.T) {
	dir := t.TempDir()
	sudo := filepath.Join(dir, "sudo")
	os.WriteFile(sudo, []byte("#!/bin/sh\n"), 0o755)
	t.Setenv("PATH", dir)
	b := &Become{User: "root"}
	env := []string{"DB_PASSWORD=s3cret-value", "LD_PRELOAD=/home/u/x.so", "LANG=C.UTF-8",
		"PATH=/home/u/.cache/h/bin:/usr/bin", "CRONIUM_DIR=/w"}
	argv, sudoEnv, err := b.prepare([]string{"/bin/sh", "s.sh"}, "/w", "/w/h", env, time.Second, "/r/cronium-runner")
	if err != nil {
		t.Fatal(err)
	}
	if argv[0] != sudo || argv[len(argv)-1] != BecomeCommand {
		t.Errorf("sudo's argv: %v", argv)
	}
	for _, kv := range sudoEnv {
		if strings.Contains(kv, "s3cret-value") || strings.HasPrefix(kv, "LD_") || strings.HasPrefix(kv, "CRONIUM_DIR=") {
			t.Errorf("sudo's environment has %s", kv)
		}
	}
	if !strings.Contains(string(b.spec), "DB_PASSWORD=s3cret-value") {
		t.Error("the run's environment is not in the spec")
	}
}
