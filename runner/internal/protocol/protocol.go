// Package protocol owns the runner's framed output protocol (see runner/PROTOCOL.md): the
// magic line, frame encoding, and an incremental decoder (used by the tests; the orchestrator
// keeps its own Python decoder of the same format).
//
//	MAGIC                                       once, first
//	kind:1  ts:float64  len:uint32  payload     repeated, big-endian
//
// kind is 'O' (script stdout bytes), 'E' (script stderr bytes) or 'M' (a JSON message).
package protocol

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
)

// Magic starts every runner stream.
const Magic = "CRONIUM-RUNNER/2\n"

// Frame kinds.
const (
	Stdout  byte = 'O'
	Stderr  byte = 'E'
	Message byte = 'M'
)

// HeaderSize is the size of a frame header: kind, timestamp, length.
const HeaderSize = 1 + 8 + 4

// MaxFrame is the largest payload a decoder accepts; more means corruption.
const MaxFrame = 16 * 1024 * 1024

// Version is the protocol's name as the hello message gives it.
const Version = "CRONIUM-RUNNER/2"

// AppendFrame appends one encoded frame to dst.
func AppendFrame(dst []byte, kind byte, ts float64, payload []byte) []byte {
	var header [HeaderSize]byte
	header[0] = kind
	binary.BigEndian.PutUint64(header[1:9], math.Float64bits(ts))
	binary.BigEndian.PutUint32(header[9:13], uint32(len(payload)))
	dst = append(dst, header[:]...)
	return append(dst, payload...)
}

// Encode returns one encoded frame.
func Encode(kind byte, ts float64, payload []byte) []byte {
	return AppendFrame(make([]byte, 0, HeaderSize+len(payload)), kind, ts, payload)
}

// Frame is one decoded frame.
type Frame struct {
	Kind    byte
	TS      float64
	Payload []byte
}

// Decoder decodes a runner stream incrementally.
type Decoder struct {
	buf       []byte
	seenMagic bool
}

// Feed adds bytes and returns the frames now complete.
func (d *Decoder) Feed(data []byte) ([]Frame, error) {
	d.buf = append(d.buf, data...)
	if !d.seenMagic {
		if len(d.buf) < len(Magic) {
			if !bytes.HasPrefix([]byte(Magic), d.buf) {
				return nil, fmt.Errorf("not a runner stream: %q", head(d.buf))
			}
			return nil, nil
		}
		if !bytes.HasPrefix(d.buf, []byte(Magic)) {
			return nil, fmt.Errorf("not a runner stream: %q", head(d.buf))
		}
		d.buf = d.buf[len(Magic):]
		d.seenMagic = true
	}
	var frames []Frame
	for len(d.buf) >= HeaderSize {
		kind := d.buf[0]
		length := binary.BigEndian.Uint32(d.buf[9:13])
		if (kind != Stdout && kind != Stderr && kind != Message) || length > MaxFrame {
			return frames, fmt.Errorf("corrupt frame header (kind %q, length %d)", kind, length)
		}
		end := HeaderSize + int(length)
		if end > len(d.buf) {
			break
		}
		ts := math.Float64frombits(binary.BigEndian.Uint64(d.buf[1:9]))
		frames = append(frames, Frame{kind, ts, append([]byte(nil), d.buf[HeaderSize:end]...)})
		d.buf = d.buf[end:]
	}
	return frames, nil
}

// Pending is the number of bytes received but not yet part of a complete frame.
func (d *Decoder) Pending() int { return len(d.buf) }

func head(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}

// RunnerVersion is the runner's version: in hello, `version`, and cronium.event runner_version.
// It must equal the Python runner's __version__ while both exist (a test checks it).
const RunnerVersion = "0.1.0"

// CacheDir is the runner's directory on a server, relative to the login user's home (the
// orchestrator's CACHE_DIR, cronium_nb/ssh/deploy.py): the deployed binaries and the runner
// daemon's socket under runner/, the forward sockets of API mode there too, work dirs under runs/.
const CacheDir = ".cache/cronium"
