// Package manifest owns the payload manifest (manifest.yaml): its fields, its validation, and
// the script types with their interpreters. The orchestrator writes it as JSON, which is also
// YAML; this runner reads only that JSON subset and refuses anything else with a clear error.
package manifest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"unicode/utf8"

	"cronium/runner/internal/pyjson"
)

// Version is the manifest version this runner reads.
const Version = 1

// Name is the manifest's file name in a payload.
const Name = "manifest.yaml"

// Defaults for the optional fields.
const (
	DefaultTimeout = 3600.0
	DefaultGrace   = 5.0
)

// ReservedEnvPrefix may not start a name in a manifest's or run context's env.
const ReservedEnvPrefix = "CRONIUM_"

// ScriptType is a script type's entrypoint extension and interpreter command.
type ScriptType struct{ Extension, Interpreter string }

// ScriptTypes in the order error messages list them.
var ScriptTypes = []string{"bash", "sh", "python", "node"}

// Types maps a script type to its extension and interpreter.
var Types = map[string]ScriptType{
	"bash":   {".sh", "bash"},
	"sh":     {".sh", "sh"},
	"python": {".py", "python3"},
	"node":   {".js", "node"},
}

// Manifest is what a payload asks the runner to do.
type Manifest struct {
	Name        string
	Type        string
	Entrypoint  string
	Timeout     float64
	GracePeriod float64
	Env         [][2]string
	Input       any            // any JSON value (nil: null or absent)
	Event       *pyjson.Object // extra event context
}

// Interpreter is the command that runs the entrypoint.
func (m *Manifest) Interpreter() string { return Types[m.Type].Interpreter }

// Error says which field is wrong.
type Error struct{ Message string }

func (e *Error) Error() string { return e.Message }

func fail(format string, args ...any) error { return &Error{fmt.Sprintf(format, args...)} }

// Parse reads a manifest's text: JSON only (the JSON subset of YAML that the orchestrator
// writes), then validates it.
func Parse(text []byte) (*Manifest, error) {
	if !utf8.Valid(text) {
		return nil, fail("manifest is not valid UTF-8")
	}
	data, err := pyjson.Parse(text)
	if err != nil {
		if errors.Is(err, pyjson.ErrTooDeep) {
			return nil, fail("manifest is nested too deeply: %v", err)
		}
		return nil, fail("manifest is not JSON (this runner reads only the JSON subset of YAML that "+
			"the orchestrator writes; YAML syntax such as block mappings, anchors or aliases is refused): %v", err)
	}
	return FromValue(data)
}

// FromValue validates a parsed manifest and returns it.
func FromValue(data any) (*Manifest, error) {
	if err := Validate(data); err != nil {
		return nil, err
	}
	obj := data.(*pyjson.Object)
	m := &Manifest{Timeout: DefaultTimeout, GracePeriod: DefaultGrace, Event: pyjson.NewObject()}
	get := func(k string) any { v, _ := obj.Get(k); return v }
	m.Name, m.Type, m.Entrypoint = get("name").(string), get("type").(string), get("entrypoint").(string)
	if v, ok := obj.Get("timeout"); ok {
		m.Timeout, _ = pyjson.Float(v)
	}
	if v, ok := obj.Get("grace_period"); ok {
		m.GracePeriod, _ = pyjson.Float(v)
	}
	if v, ok := obj.Get("env"); ok {
		env := v.(*pyjson.Object)
		for _, k := range env.Keys() {
			value, _ := env.Get(k)
			m.Env = append(m.Env, [2]string{k, value.(string)})
		}
	}
	m.Input = get("input")
	if v, ok := obj.Get("event"); ok {
		m.Event = v.(*pyjson.Object)
	}
	return m, nil
}

var known = map[string]bool{"version": true, "name": true, "type": true, "entrypoint": true,
	"timeout": true, "grace_period": true, "env": true, "input": true, "event": true}

// Validate returns an *Error naming the first field that is wrong.
func Validate(data any) error {
	obj, ok := data.(*pyjson.Object)
	if !ok {
		return fail("manifest must be a mapping")
	}
	var unknown []string
	for _, k := range obj.Keys() {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fail("unknown manifest field(s): %s", strings.Join(unknown, ", "))
	}
	for _, required := range []string{"version", "name", "type", "entrypoint"} {
		if _, ok := obj.Get(required); !ok {
			return fail("manifest field %s is missing", pyjson.ReprString(required))
		}
	}
	version, _ := obj.Get("version")
	if f, ok := pyjson.Float(version); !(ok && f == Version) && version != true {
		return fail("manifest version %s is not supported (this runner reads %d)", pyjson.Repr(version), Version)
	}
	if name, ok := obj.Get("name"); !ok || !isString(name) || strings.TrimSpace(name.(string)) == "" {
		return fail("manifest field 'name' must be a non-empty string")
	}
	typ, _ := obj.Get("type")
	if s, ok := typ.(string); !ok || Types[s] == (ScriptType{}) {
		return fail("manifest field 'type' must be one of %s, got %s", strings.Join(ScriptTypes, ", "), pyjson.Repr(typ))
	}
	entry, _ := obj.Get("entrypoint")
	if s, ok := entry.(string); !ok || !plainName(s) || s == "." || s == ".." {
		return fail("manifest field 'entrypoint' must be a plain file name, got %s", pyjson.Repr(entry))
	}
	for _, field := range []string{"timeout", "grace_period"} {
		value, present := obj.Get(field)
		if !present {
			continue
		}
		f, ok := pyjson.Float(value)
		if !ok || f <= 0 || math.IsNaN(f) || math.IsInf(f, 0) {
			return fail("manifest field %s must be a positive number of seconds, got %s",
				pyjson.ReprString(field), pyjson.Repr(value))
		}
	}
	if env, ok := obj.Get("env"); ok {
		if err := ValidateEnv(env); err != nil {
			return err
		}
	}
	if event, ok := obj.Get("event"); ok {
		if _, isObj := event.(*pyjson.Object); !isObj {
			return fail("manifest field 'event' must be a mapping")
		}
	}
	return nil
}

// ValidateEnv checks an environment for the script (the manifest's, or a run context's).
func ValidateEnv(env any) error {
	obj, ok := env.(*pyjson.Object)
	if !ok {
		return fail("manifest field 'env' must be a mapping of names to strings")
	}
	for _, key := range obj.Keys() {
		if !envName(key) {
			return fail("env name %s is not a valid variable name", pyjson.ReprString(key))
		}
		if strings.HasPrefix(key, ReservedEnvPrefix) {
			return fail("env name %s uses the reserved prefix %s", pyjson.ReprString(key), ReservedEnvPrefix)
		}
		value, _ := obj.Get(key)
		if s, ok := value.(string); !ok || strings.Contains(s, "\x00") {
			return fail("env value of %s must be a string without NUL bytes", pyjson.ReprString(key))
		}
	}
	return nil
}

func isString(v any) bool { _, ok := v.(string); return ok }

func envName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range []byte(s) {
		letter := c == '_' || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
		if !letter && (i == 0 || c < '0' || c > '9') {
			return false
		}
	}
	return true
}

func plainName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if !(c == '.' || c == '_' || c == '-' || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) {
			return false
		}
	}
	return true
}

// Number is a manifest number as it appears in JSON.
type Number = json.Number
