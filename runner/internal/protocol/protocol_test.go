package protocol

import (
	"bytes"
	"os"
	"regexp"
	"testing"
)

func TestRoundTripInPieces(t *testing.T) {
	stream := []byte(Magic)
	stream = AppendFrame(stream, Stdout, 1.5, []byte("hello\n"))
	stream = AppendFrame(stream, Stderr, 2.25, bytes.Repeat([]byte{0, 255}, 40000))
	stream = AppendFrame(stream, Message, 3, []byte(`{"type":"result"}`))
	stream = AppendFrame(stream, Stdout, 4, nil)
	var d Decoder
	var frames []Frame
	for i := 0; i < len(stream); i += 7 { // byte by byte would do too; 7 splits headers
		got, err := d.Feed(stream[i:min(i+7, len(stream))])
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, got...)
	}
	if len(frames) != 4 || d.Pending() != 0 {
		t.Fatalf("got %d frames, %d pending", len(frames), d.Pending())
	}
	if frames[0].Kind != Stdout || frames[0].TS != 1.5 || string(frames[0].Payload) != "hello\n" {
		t.Errorf("frame 0: %+v", frames[0])
	}
	if len(frames[1].Payload) != 80000 || frames[2].Kind != Message || len(frames[3].Payload) != 0 {
		t.Errorf("frames: %+v", frames[1:])
	}
}

func TestHeaderLayout(t *testing.T) {
	got := Encode(Message, 1.0, []byte("x"))
	want := []byte{'M', 0x3f, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 'x'} // big-endian float64 1.0, uint32 1
	if !bytes.Equal(got, want) {
		t.Fatalf("got % x, want % x", got, want)
	}
}

func TestCorruptStreams(t *testing.T) {
	var d Decoder
	if _, err := d.Feed([]byte("hello world, not a runner")); err == nil {
		t.Error("a stream without the magic line was accepted")
	}
	d = Decoder{}
	if _, err := d.Feed(append([]byte(Magic), Encode('X', 0, nil)...)); err == nil {
		t.Error("an unknown frame kind was accepted")
	}
	d = Decoder{}
	huge := Encode(Stdout, 0, nil)
	huge[9] = 0x7f // length far over MaxFrame
	if _, err := d.Feed(append([]byte(Magic), huge...)); err == nil {
		t.Error("an oversized frame was accepted")
	}
}

// The runner's version must be the Python runner's while both exist.
func TestVersionMatchesPythonRunner(t *testing.T) {
	text, err := os.ReadFile("../../cronium_runner/__init__.py")
	if err != nil {
		t.Skip("no Python runner beside this module")
	}
	m := regexp.MustCompile(`__version__ = "([^"]+)"`).FindSubmatch(text)
	if m == nil || string(m[1]) != RunnerVersion {
		t.Fatalf("Python runner version %q, Go runner %q", m, RunnerVersion)
	}
}
