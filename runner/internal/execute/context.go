package execute

import (
	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/manifest"
	"cronium/runner/internal/pyjson"
)

// DefaultMaxResultBytes caps each result file (output.json, variables.json).
const DefaultMaxResultBytes = 16 * 1024 * 1024

// Context is the per-run data that travels beside the payload (so the payload stays cacheable).
type Context struct {
	ExecutionID    string
	Server         string
	Input          any
	HasInput       bool // false: use the manifest's input
	Variables      *pyjson.Object
	Env            *pyjson.Object // secret values: never in the manifest
	APISocket      string
	APIToken       string
	HasAPI         bool
	Event          *pyjson.Object // what only the orchestrator knows: id, payload_version
	MaxResultBytes int64          // 0: the runner's default
	Become         *Become        // nil: the script runs as the login user
}

// truthy is Python's bool() of a JSON value.
func truthy(v any) bool {
	switch t := v.(type) {
	case nil:
		return false
	case bool:
		return t
	case string:
		return t != ""
	case []any:
		return len(t) > 0
	case *pyjson.Object:
		return t.Len() > 0
	default:
		f, _ := pyjson.Float(v)
		return f != 0
	}
}

// ContextFrom reads a run context (a run request's fields, or the context line).
func ContextFrom(data any) (*Context, error) {
	obj, ok := data.(*pyjson.Object)
	if !ok {
		return nil, exitcode.New(exitcode.Usage, "the run context must be a JSON object")
	}
	c := &Context{ExecutionID: "local", Server: "local", Variables: pyjson.NewObject(),
		Env: pyjson.NewObject(), Event: pyjson.NewObject()}
	if v, ok := obj.Get("execution_id"); ok {
		c.ExecutionID = pyjson.Str(v)
	}
	if v, ok := obj.Get("server"); ok {
		c.Server = pyjson.Str(v)
	}
	if v, ok := obj.Get("input"); ok {
		c.Input, c.HasInput = v, true
	}
	if v, _ := obj.Get("variables"); truthy(v) {
		variables, ok := v.(*pyjson.Object)
		if !ok {
			return nil, exitcode.New(exitcode.Usage, "run context 'variables' must be a mapping")
		}
		c.Variables = variables
	}
	if v, _ := obj.Get("env"); truthy(v) {
		if err := manifest.ValidateEnv(v); err != nil {
			return nil, exitcode.New(exitcode.Usage, "run context: %v", err)
		}
		c.Env = v.(*pyjson.Object)
	}
	if v, ok := obj.Get("api"); ok && v != nil {
		api, isObj := v.(*pyjson.Object)
		var socket, token any
		if isObj {
			socket, _ = api.Get("socket")
			token, _ = api.Get("token")
		}
		s, okSocket := socket.(string)
		t, okToken := token.(string)
		if !okSocket || !okToken {
			return nil, exitcode.New(exitcode.Usage, "run context 'api' needs a socket and a token")
		}
		c.APISocket, c.APIToken, c.HasAPI = s, t, true
	}
	if v, _ := obj.Get("event"); truthy(v) {
		event, ok := v.(*pyjson.Object)
		if !ok {
			return nil, exitcode.New(exitcode.Usage, "run context 'event' must be a mapping")
		}
		c.Event = event
	}
	if v, ok := obj.Get("max_result_bytes"); ok && v != nil {
		f, isNumber := pyjson.Float(v)
		if !isNumber || !pyjson.IsInt(v) || f <= 0 || f > 1<<40 {
			return nil, exitcode.New(exitcode.Usage, "run context 'max_result_bytes' must be a positive whole number of bytes")
		}
		c.MaxResultBytes = int64(f)
	}
	if v, ok := obj.Get("become"); ok && v != nil {
		become, err := BecomeFrom(v)
		if err != nil {
			return nil, err
		}
		c.Become = become
	}
	return c, nil
}
