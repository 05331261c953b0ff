package payload

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/hostid"
)

const manifestText = `{"version": 1, "name": "t", "type": "sh", "entrypoint": "script.sh"}`

type entry struct {
	header tar.Header
	body   string
}

func file(name, body string) entry {
	return entry{tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}, body}
}

func archive(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, e := range append([]entry{file("manifest.yaml", manifestText), file("script.sh", "echo hi\n")}, entries...) {
		h := e.header
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(e.body))
	}
	tw.Close() // may complain of a member whose content was left out on purpose
	var out bytes.Buffer
	gz := gzip.NewWriter(&out)
	gz.Write(raw.Bytes())
	gz.Close()
	return out.Bytes()
}

func extract(t *testing.T, data []byte, sha string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	_, err := Extract(data, dir, sha)
	return dir, err
}

func wantBad(t *testing.T, err error, text string) {
	t.Helper()
	var runnerErr *exitcode.Error
	if !errors.As(err, &runnerErr) || runnerErr.Code != exitcode.BadPayload || !strings.Contains(err.Error(), text) {
		t.Fatalf("got %v, want bad_payload %q", err, text)
	}
}

func TestGoodPayloadExtractsAndCaches(t *testing.T) {
	data := archive(t, entry{tar.Header{Name: "sub/", Typeflag: tar.TypeDir, Mode: 0o755}, ""}, file("sub/data.txt", "x"))
	for _, sha := range []string{"", SHA256Hex(data), SHA256Hex(data)} { // uncached, cached, from cache
		dir, err := extract(t, data, sha)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(dir, "sub", "data.txt"))
		info, _ := os.Stat(filepath.Join(dir, "script.sh"))
		if string(got) != "x" || info.Mode().Perm() != 0o600 {
			t.Fatalf("extracted %q, mode %v", got, info.Mode())
		}
	}
}

func TestUnsafeMembersAreRefusedBeforeAnythingIsWritten(t *testing.T) {
	cases := map[string]entry{
		"unsafe path":                      file("/tmp/cronium-abs", "x"),
		"unsafe path in":                   file("../escaped", "x"),
		"unsafe path in payload":           file("./ok/../../escaped", "x"),
		"'passwd' is not a regular file":   {tar.Header{Name: "passwd", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}, ""},
		"'hard' is not a regular file":     {tar.Header{Name: "hard", Typeflag: tar.TypeLink, Linkname: "script.sh"}, ""},
		"'dev' is not a regular file":      {tar.Header{Name: "dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}, ""},
		"'blk' is not a regular file":      {tar.Header{Name: "blk", Typeflag: tar.TypeBlock}, ""},
		"'fifo' is not a regular file":     {tar.Header{Name: "fifo", Typeflag: tar.TypeFifo}, ""},
		"member 'script.sh' appears twice": file("./script.sh", "evil"),
	}
	for want, member := range cases {
		dir, err := extract(t, archive(t, member), "")
		wantBad(t, err, want)
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("%s: %d files written before the refusal", want, len(entries))
		}
	}
}

func TestCaps(t *testing.T) {
	many := make([]entry, MaxMembers)
	for i := range many {
		many[i] = file(fmt.Sprintf("f%d", i), "")
	}
	_, err := extract(t, archive(t, many...), "")
	wantBad(t, err, "more than 10000 members")
	huge := entry{tar.Header{Name: "huge", Typeflag: tar.TypeReg, Size: MaxExtractedBytes + 1}, ""} // content never sent
	_, err = extract(t, archive(t, huge), "")
	wantBad(t, err, "expands beyond the size limit")
	_, err = extract(t, []byte("definitely not gzip"), "")
	wantBad(t, err, "not a valid gzip tar archive")
}

func TestMissingManifestOrEntrypoint(t *testing.T) {
	var raw bytes.Buffer
	gz := gzip.NewWriter(&raw)
	tw := tar.NewWriter(gz)
	tw.Close()
	gz.Close()
	_, err := extract(t, raw.Bytes(), "")
	wantBad(t, err, "payload has no manifest.yaml")
	bad := archive(t, file("manifest.yaml", `{"version": 1, "name": "t", "type": "sh", "entrypoint": "other.sh"}`))
	_, err = extract(t, bad, "")
	wantBad(t, err, "appears twice") // the manifest twice; a single one naming other.sh:
	var b bytes.Buffer
	gz = gzip.NewWriter(&b)
	tw = tar.NewWriter(gz)
	text := `{"version": 1, "name": "t", "type": "sh", "entrypoint": "other.sh"}`
	tw.WriteHeader(&tar.Header{Name: "manifest.yaml", Typeflag: tar.TypeReg, Size: int64(len(text))})
	tw.Write([]byte(text))
	tw.Close()
	gz.Close()
	_, err = extract(t, b.Bytes(), "")
	wantBad(t, err, "payload has no entrypoint 'other.sh'")
}

func TestChecksum(t *testing.T) {
	if err := Verify([]byte("abc"), " BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD\n", true); err != nil {
		t.Fatal(err)
	}
	var runnerErr *exitcode.Error
	if err := Verify([]byte("abc"), strings.Repeat("0", 64), true); !errors.As(err, &runnerErr) || runnerErr.Code != exitcode.ChecksumMismatch {
		t.Fatalf("got %v", err)
	}
}

func TestPrivateDir(t *testing.T) {
	base := t.TempDir()
	if err := PrivateDir(filepath.Join(base, "a", "b")); err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(filepath.Join(base, "a")); info.Mode().Perm() != 0o700 {
		t.Errorf("parent made %v", info.Mode())
	}
	os.Symlink(filepath.Join(base, "a"), filepath.Join(base, "link"))
	if err := PrivateDir(filepath.Join(base, "link")); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlink: %v", err)
	}
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := PrivateDir(open); err == nil || !strings.Contains(err.Error(), "accessible by others") {
		t.Errorf("open dir: %v", err)
	}
}

func TestSweepRemovesOnlyDeadRunnersOfThisHostAndBoot(t *testing.T) {
	root := t.TempDir()
	id := hostid.ID()
	otherBoot := id[:9] + "00000000"
	names := map[string]bool{ // name -> should survive the sweep
		fmt.Sprintf("run-%s-%d-abc", id, os.Getpid()):                 true,  // ours, alive
		fmt.Sprintf("run-%s-%d-abc", id, 1<<22+12345):                 false, // dead pid
		fmt.Sprintf("session-%s-%d-x", id, 1<<22+12346):               false,
		fmt.Sprintf("run-%s-%d-old", otherBoot, 1):                    false, // an earlier boot, untouched since
		fmt.Sprintf("run-%s-%d-new", otherBoot, 1<<22+1):              true,  // other boot id or pid namespace, modified since we booted
		fmt.Sprintf("run-h%s%s-%d-abc", "ffffffff", id[9:], 1<<22+1):  true,  // another host
		fmt.Sprintf("run-h%s%s-%d-old", "ffffffff", otherBoot[9:], 1): true,  // another host, old
		"run-abcd1234":  true, // the Python runner's: not ours to judge
		"session-1-xyz": true,
	}
	if id[1:9] == "ffffffff" || id[9:] == "00000000" {
		t.Skip("host id collides with the test's other ones")
	}
	bootTime := hostid.BootTime()
	if bootTime.IsZero() {
		t.Skip("no boot time")
	}
	longAgo := bootTime.Add(-time.Hour)
	for name := range names {
		path := filepath.Join(root, name)
		os.Mkdir(path, 0o700)
		if strings.HasSuffix(name, "-old") {
			os.Chtimes(path, longAgo, longAgo)
		}
	}
	os.Symlink(root, filepath.Join(root, fmt.Sprintf("run-%s-%d-link", id, 1<<22+12347)))
	SweepStale(root)
	for name, survives := range names {
		_, err := os.Stat(filepath.Join(root, name))
		if (err == nil) != survives {
			t.Errorf("%s: survives=%v, want %v", name, err == nil, survives)
		}
	}
	if _, err := os.Stat(root); err != nil {
		t.Errorf("a symlink was followed: %v", err)
	}
}
