package hostid

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

func TestIDIsShortAndStable(t *testing.T) {
	id := ID()
	if len(id) != 17 || id[0] != 'h' {
		t.Fatalf("ID %q: want h + 16 hex digits", id)
	}
	if ID() != id {
		t.Errorf("ID changed")
	}
}

func TestMachineIDFallsBackInTurn(t *testing.T) {
	dir := t.TempDir()
	first, second := filepath.Join(dir, "machine-id"), filepath.Join(dir, "dbus-machine-id")
	files := []string{first, second}
	if got := machineID(files); got != "" {
		t.Errorf("no files: %q", got)
	}
	os.WriteFile(second, []byte("bbbb\n"), 0o600)
	if got := machineID(files); got != "bbbb" {
		t.Errorf("D-Bus's only: %q", got)
	}
	os.WriteFile(first, []byte("\n"), 0o600) // empty (a template image's): skipped
	if got := machineID(files); got != "bbbb" {
		t.Errorf("empty first: %q", got)
	}
	os.WriteFile(first, []byte("aaaa\n"), 0o600)
	if got := machineID(files); got != "aaaa" {
		t.Errorf("both: %q", got)
	}
}

func TestHostPartTellsClonesApart(t *testing.T) {
	parts := map[string]bool{}
	for _, p := range []string{
		hostPart("", "web1"),      // no machine id: the host name alone
		hostPart("m1", "web1"),    // a clone with the same host name ...
		hostPart("m2", "web1"),    // ... and another machine id
		hostPart("m1", "web2"),    // same (copied) machine id, another host name
		bootPart("b1", ""),        //
		bootPart("b1", "pid:[1]"), // containers on one kernel: one boot id ...
		bootPart("b1", "pid:[2]"), // ... another pid namespace
		bootPart("", "pid:[1]"),   //
		bootPart("b2", "pid:[1]"), //
	} {
		if len(p) != 8 {
			t.Errorf("part %q: want 8 hex digits", p)
		}
		if parts[p] {
			t.Errorf("part %q repeats", p)
		}
		parts[p] = true
	}
	if hostPart("m1", "web1") != hostPart("m1", "web1") {
		t.Errorf("hostPart is not stable")
	}
}

func TestStale(t *testing.T) {
	const host, boot = "11111111", "22222222"
	bootTime := time.Unix(1_700_000_000, 0)
	before, after := bootTime.Add(-time.Hour), bootTime.Add(time.Minute)
	alive := func(pid int) bool { return pid == 100 }
	name := func(h, b string, pid int) string { return "h" + h + b + "-" + strconv.Itoa(pid) + "-x1y2" }
	cases := []struct {
		rest     string
		mtime    time.Time
		bootTime time.Time
		want     bool
	}{
		{name(host, boot, 100), before, bootTime, false},      // ours, alive
		{name(host, boot, 101), after, bootTime, true},        // ours, dead
		{name(host, boot, 101), before, bootTime, true},       // ours, dead (an old mtime too)
		{name(host, "33333333", 100), before, bootTime, true}, // an earlier boot, untouched since
		{name(host, "33333333", 101), after, bootTime, false}, // other boot id or pid ns, modified since we booted: maybe live
		{name(host, "33333333", 101), before, time.Time{}, false},
		{name(host, "33333333", 101), time.Time{}, bootTime, false},
		{name("44444444", boot, 101), before, bootTime, false},       // another host: never, dead pid or not
		{name("44444444", "33333333", 101), before, bootTime, false}, // another host of an old boot: never
		{"h" + host + boot + "-x-y", before, bootTime, false},        // no pid
		{"h" + host + boot + "-0-y", before, bootTime, false},
		{"h" + host + boot, before, bootTime, false},
		{"abcd1234", before, bootTime, false}, // the Python runner's
		{"1-xyz", before, bootTime, false},
	}
	for _, c := range cases {
		if got := stale(c.rest, c.mtime, host, boot, c.bootTime, alive); got != c.want {
			t.Errorf("stale(%q, mtime %v, boot %v) = %v, want %v", c.rest, c.mtime.Unix(), c.bootTime.Unix(), got, c.want)
		}
	}
}

func TestBootTime(t *testing.T) {
	if _, err := os.Stat("/proc/stat"); err != nil {
		t.Skip("no /proc/stat")
	}
	bt := BootTime()
	if bt.IsZero() || bt.After(time.Now()) {
		t.Errorf("boot time %v", bt)
	}
}
