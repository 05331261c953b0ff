package detach

import (
	"bytes"
	"sort"
	"strings"

	"cronium/runner/internal/pyjson"
)

// Redaction of the run's secret values (the run context's env) before anything is spooled:
// the spool is a file on the server, and no secret is ever written to one. The rules are the
// orchestrator's (cronium_nb/redaction.py): a one-line secret is replaced wherever it appears,
// a multi-line one (a PEM key) by each of its lines of MinSecretLine bytes or more.
const (
	Redacted      = "***"
	MinSecretLine = 6
	// maxHeldLine bounds how much of an unfinished line waits for its end before it is
	// redacted and spooled anyway (keeping the last bytes a secret could still span).
	maxHeldLine = 64 * 1024
)

// Redactor replaces secret values by Redacted.
type Redactor struct {
	needles [][]byte // the longest first, where one holds another
	longest int
}

// NewRedactor is the redactor of a run context's secret env values (nil when there are none).
func NewRedactor(env *pyjson.Object) *Redactor {
	set := map[string]bool{}
	for _, key := range env.Keys() {
		value, _ := env.Get(key)
		text, _ := value.(string)
		if text == "" {
			continue
		}
		var lines []string
		for _, line := range strings.FieldsFunc(text, func(r rune) bool { return r == '\n' || r == '\r' }) {
			if line = strings.TrimSpace(line); line != "" {
				lines = append(lines, line)
			}
		}
		if len(lines) > 1 {
			for _, line := range lines {
				if len(line) >= MinSecretLine {
					set[line] = true
				}
			}
			continue
		}
		set[text] = true // one line, perhaps read from a file with its newline
		for _, line := range lines {
			set[line] = true
		}
	}
	if len(set) == 0 {
		return nil
	}
	r := &Redactor{}
	for needle := range set {
		r.needles = append(r.needles, []byte(needle))
		r.longest = max(r.longest, len(needle))
	}
	sort.Slice(r.needles, func(i, j int) bool {
		if len(r.needles[i]) != len(r.needles[j]) {
			return len(r.needles[i]) > len(r.needles[j])
		}
		return bytes.Compare(r.needles[i], r.needles[j]) < 0
	})
	return r
}

// Bytes is data with every secret replaced.
func (r *Redactor) Bytes(data []byte) []byte {
	if r == nil {
		return data
	}
	for _, needle := range r.needles {
		data = bytes.ReplaceAll(data, needle, []byte(Redacted))
	}
	return data
}

// Value is a JSON value with every string in it (object keys too) redacted.
func (r *Redactor) Value(v any) any {
	if r == nil {
		return v
	}
	switch t := v.(type) {
	case string:
		return string(r.Bytes([]byte(t)))
	case []any:
		out := make([]any, len(t))
		for i, item := range t {
			out[i] = r.Value(item)
		}
		return out
	case *pyjson.Object:
		out := pyjson.NewObject()
		for _, key := range t.Keys() {
			item, _ := t.Get(key)
			out.Set(string(r.Bytes([]byte(key))), r.Value(item))
		}
		return out
	}
	return v
}

// streamRedactor redacts one output stream as it comes: whole lines at once, an unfinished
// line once it ends (or, past maxHeldLine, all but the bytes a secret could still span).
type streamRedactor struct {
	r       *Redactor
	partial []byte
}

// feed returns what can be spooled now, redacted.
func (s *streamRedactor) feed(data []byte) []byte {
	buf := append(s.partial, data...)
	cut := bytes.LastIndexByte(buf, '\n') + 1
	if len(buf)-cut > maxHeldLine+s.r.longest {
		buf = s.r.Bytes(buf)
		cut = len(buf) - s.r.longest
	}
	out := s.r.Bytes(buf[:cut])
	s.partial = append([]byte(nil), buf[cut:]...)
	return out
}

// flush returns the rest (at the end of the run), redacted.
func (s *streamRedactor) flush() []byte {
	rest := s.r.Bytes(s.partial)
	s.partial = nil
	return rest
}
