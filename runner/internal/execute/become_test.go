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
