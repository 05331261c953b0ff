package helpers

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cronium/runner/internal/lockfile"
	"cronium/runner/internal/pyjson"
)

// helperError is a helper call the script got wrong, or that the orchestrator refused.
type helperError struct{ message string }

func (e *helperError) Error() string { return e.message }

func fail(format string, args ...any) error { return &helperError{fmt.Sprintf(format, args...)} }

// errNotFound: the runtime service has no such variable (404).
var errNotFound = errors.New("not found")

// missing marks an absent input key or unset variable in the --json envelope form.
type missingValue struct{}

var missing any = missingValue{}

type usage struct {
	low, high int
	text      string
}

var usages = map[string]usage{
	"input":       {0, 1, "cronium.input [KEY]"},
	"output":      {1, 2, "cronium.output VALUE|-  or  cronium.output KEY VALUE|-"},
	"getVariable": {1, 1, "cronium.getVariable NAME"},
	"setVariable": {2, 2, "cronium.setVariable NAME VALUE|-"},
	"event":       {0, 1, "cronium.event [FIELD]"},
	"tool":        {1, 2, "cronium.tool NAME [JSON|-]"},
}

// Run is `cronium-runner helper VERB ARGS` (or the runner called as cronium.VERB): the shell
// helpers. It returns the exit code: 0, 1 for a failed call (the reason on stderr), 64 for
// a wrong command line.
func Run(verb string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	envelope := len(args) > 0 && args[0] == "--json"
	if envelope {
		args = args[1:]
	}
	u, ok := usages[verb]
	if !ok {
		fmt.Fprintf(stderr, "cronium-runner: unknown helper %s\n", pyjson.ReprString(verb))
		return 64
	}
	if len(args) < u.low || len(args) > u.high {
		fmt.Fprintf(stderr, "usage: %s\n", u.text)
		return 64
	}
	c := &cronium{}
	var out []byte
	err := func() error {
		valueArgument := func(text string) (any, error) {
			if text == "-" {
				data, err := io.ReadAll(stdin)
				if err != nil {
					return nil, err
				}
				text = string(data)
			}
			return pyjson.ParseValue(text), nil
		}
		print := func(value any) { out = printValue(value, envelope) }
		switch verb {
		case "input":
			var value any
			var err error
			switch {
			case len(args) == 0:
				value, err = c.input()
			case envelope:
				value, err = c.inputKey(args[0], missing)
			default:
				value, err = c.inputKey(args[0], nil)
				if err == nil && value == missing {
					err = fail("key '%s' not found", args[0])
				}
			}
			if err != nil {
				return err
			}
			print(value)
		case "output":
			value, err := valueArgument(args[len(args)-1])
			if err != nil {
				return err
			}
			if len(args) == 1 {
				return c.output(value)
			}
			return c.outputKey(args[0], value)
		case "getVariable":
			value, err := c.variable(args[0])
			if err != nil {
				return err
			}
			if value == missing && !envelope {
				return fail("variable '%s' is not set", args[0])
			}
			print(value)
		case "setVariable":
			value, err := valueArgument(args[1])
			if err != nil {
				return err
			}
			return c.setVariable(args[0], value)
		case "event":
			value, err := c.event(args)
			if err != nil {
				return err
			}
			print(value)
		case "tool":
			var arguments any
			if len(args) > 1 {
				var err error
				if arguments, err = valueArgument(args[1]); err != nil {
					return err
				}
			}
			if _, isString := arguments.(string); isString {
				return fail("tool arguments must be a JSON object")
			}
			value, err := c.tool(args[0], arguments)
			if err != nil {
				return err
			}
			print(value)
		}
		return nil
	}()
	if err != nil {
		fmt.Fprintf(stderr, "cronium.%s: %s\n", verb, err)
		return 1
	}
	stdout.Write(out)
	return 0
}

// printValue: strings print as themselves (handy in shell), everything else as compact JSON;
// the envelope form (--json, for the Node helpers) is {"value": V}, or {} for a missing input
// key or an unset variable, so that the caller can tell them from an error.
func printValue(value any, envelope bool) []byte {
	if envelope {
		obj := pyjson.NewObject()
		if value != missing {
			obj.Set("value", value)
		}
		return append(pyjson.Compact(obj), '\n')
	}
	if s, ok := value.(string); ok {
		return []byte(s + "\n")
	}
	return append(pyjson.Compact(value), '\n')
}

// cronium is the helpers of one run, as resources/cronium.py's Cronium class.
type cronium struct {
	api     *apiClient
	apiDone bool
}

func (c *cronium) client() (*apiClient, error) {
	if !c.apiDone {
		c.apiDone = true
		if socket := os.Getenv(APISocketVar); socket != "" {
			token, err := os.ReadFile(os.Getenv(APITokenFileVar))
			if err != nil {
				return nil, osError(err)
			}
			c.api = &apiClient{
				socket: socket,
				base:   defaultAPIPrefix + quote(os.Getenv("CRONIUM_EXECUTION_ID")) + "/",
				token:  strings.TrimSpace(string(token)),
			}
		}
	}
	return c.api, nil
}

func (c *cronium) path(name string) (string, error) {
	dir := os.Getenv("CRONIUM_DIR")
	if dir == "" {
		return "", errors.New(needsCroniumDir)
	}
	return filepath.Join(dir, name), nil
}

func (c *cronium) read(name string, fallback any) (any, error) {
	p, err := c.path(name)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return fallback, nil
	}
	if err != nil {
		return nil, osError(err)
	}
	v, err := pyjson.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s is not valid JSON: %v", name, err)
	}
	return v, nil
}

func (c *cronium) write(name string, value any) error {
	p, err := c.path(name)
	if err != nil {
		return err
	}
	temporary := p + ".tmp-" + strconv.Itoa(os.Getpid())
	if err := os.WriteFile(temporary, pyjson.Dumps(value, pyjson.Options{}), 0o666); err != nil {
		return osError(err)
	}
	return osError(os.Rename(temporary, p))
}

// update does a read-modify-write of one data file under the run's helper lock (helpers may
// run at once).
func (c *cronium) update(name string, fallback any, change func(any) (any, error)) error {
	lockPath, err := c.path(LockFile)
	if err != nil {
		return err
	}
	lock, err := lockfile.Exclusive(lockPath, 0o666)
	if err != nil {
		return osError(err)
	}
	defer lock.Close()
	current, err := c.read(name, fallback)
	if err != nil {
		return err
	}
	changed, err := change(current)
	if err != nil {
		return err
	}
	return c.write(name, changed)
}

func (c *cronium) input() (any, error) {
	api, err := c.client()
	if err != nil {
		return nil, err
	}
	if api != nil {
		return api.call("GET", "input", nil, false, 60*time.Second)
	}
	return c.read(InputFile, nil)
}

// inputKey is one key of the input, or fallback when there is no such key.
func (c *cronium) inputKey(key string, fallback any) (any, error) {
	data, err := c.input()
	if err != nil {
		return nil, err
	}
	if obj, ok := data.(*pyjson.Object); ok {
		if v, ok := obj.Get(key); ok {
			return v, nil
		}
	}
	if fallback == nil {
		return missing, nil
	}
	return fallback, nil
}

func (c *cronium) output(value any) error {
	api, err := c.client()
	if err != nil {
		return err
	}
	if api != nil {
		_, err := api.call("PUT", "output", value, true, 60*time.Second)
		return err
	}
	return c.write(OutputFile, value)
}

func (c *cronium) outputKey(key string, value any) error {
	if key == "" {
		return fail("output key must be a non-empty string")
	}
	api, err := c.client()
	if err != nil {
		return err
	}
	if api != nil {
		_, err := api.call("PUT", "output/"+quote(key), value, true, 60*time.Second)
		return err
	}
	return c.update(OutputFile, nil, func(current any) (any, error) {
		if current == nil {
			current = pyjson.NewObject()
		}
		obj, ok := current.(*pyjson.Object)
		if !ok {
			return nil, fail("the output is already set to a non-object value: cannot set key '%s'", key)
		}
		return obj.Set(key, value), nil
	})
}

// variable is a variable's value, or missing when unset.
func (c *cronium) variable(name string) (any, error) {
	api, err := c.client()
	if err != nil {
		return nil, err
	}
	if api != nil {
		value, err := api.call("GET", "variables/"+quote(name), nil, false, 60*time.Second)
		if errors.Is(err, errNotFound) {
			return missing, nil
		}
		return value, err
	}
	data, err := c.read(VariablesFile, pyjson.NewObject())
	if err != nil {
		return nil, err
	}
	obj, ok := data.(*pyjson.Object)
	if !ok {
		return nil, fail("%s is not a JSON object", VariablesFile)
	}
	if v, ok := obj.Get(name); ok {
		return v, nil
	}
	return missing, nil
}

func (c *cronium) setVariable(name string, value any) error {
	if name == "" {
		return fail("variable name must be a non-empty string")
	}
	api, err := c.client()
	if err != nil {
		return err
	}
	if api != nil {
		_, err := api.call("PUT", "variables/"+quote(name), value, true, 60*time.Second)
		return err
	}
	return c.update(VariablesFile, pyjson.NewObject(), func(current any) (any, error) {
		obj, ok := current.(*pyjson.Object)
		if !ok {
			return nil, fail("%s is not a JSON object", VariablesFile)
		}
		return obj.Set(name, value), nil
	})
}

func (c *cronium) event(args []string) (any, error) {
	data, err := c.read(EventFile, pyjson.NewObject())
	if err != nil {
		return nil, err
	}
	if len(args) == 0 {
		return data, nil
	}
	field := args[0]
	if !slices.Contains(EventFields, field) {
		return nil, fail("unknown event field '%s'; known: %s", field, strings.Join(EventFields, ", "))
	}
	if obj, ok := data.(*pyjson.Object); ok {
		v, _ := obj.Get(field)
		return v, nil
	}
	return nil, fail("%s is not a JSON object", EventFile)
}

// tool calls the notebook's tool action name (API mode only). In API mode the runtime service
// judges the arguments (a non-object is its error, naming the tool).
func (c *cronium) tool(name string, arguments any) (any, error) {
	if name == "" {
		return nil, fail("tool name must be a non-empty string")
	}
	api, err := c.client()
	if err != nil {
		return nil, err
	}
	if api == nil {
		if _, isObject := arguments.(*pyjson.Object); arguments != nil && !isObject {
			return nil, fail("tool arguments must be a JSON object")
		}
		return nil, fail("%s", toolsNeedAPI)
	}
	if arguments == nil {
		arguments = pyjson.NewObject()
	}
	// No client deadline: the service ends a call at the tool's timeout, the runner the whole
	// run at the event's.
	return api.call("POST", "tools/"+quote(name), arguments, true, 0)
}

// apiClient speaks HTTP to the orchestrator's runtime service over the run's Unix socket, one
// connection per call (what the service expects).
type apiClient struct {
	socket, base, token string
}

func (a *apiClient) call(method, path string, body any, hasBody bool, timeout time.Duration) (any, error) {
	var payload []byte
	if hasBody {
		payload = pyjson.Dumps(body, pyjson.Options{})
	}
	status, reason, data, err := httpOverUnix(a.socket, method, a.base+path, a.token, payload, hasBody, timeout)
	if err != nil {
		return nil, err
	}
	if status < 300 {
		if len(bytes.TrimSpace(data)) == 0 {
			return nil, nil
		}
		v, err := pyjson.Parse(data)
		if err != nil {
			return nil, fmt.Errorf("the runtime service's answer is not JSON: %v", err)
		}
		return v, nil
	}
	message := strings.TrimSpace(string(data))
	if v, err := pyjson.Parse(data); err == nil {
		if obj, ok := v.(*pyjson.Object); ok {
			if text, ok := obj.Get("error"); ok {
				message = pyjson.Str(text)
			}
		}
	}
	if message == "" {
		message = reason
	}
	if status == 404 && strings.HasPrefix(path, "variables/") {
		return nil, errNotFound
	}
	return nil, &helperError{message}
}

// httpOverUnix makes one HTTP/1.1 request on a new connection to a Unix socket (the standard
// library's HTTP client would bring TLS and much else into the binary for this one use):
// status, reason phrase and body of the answer. timeout bounds each read and write (0: none),
// as a Python socket timeout does.
func httpOverUnix(socket, method, target, token string, body []byte, hasBody bool, timeout time.Duration) (int, string, []byte, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, "", nil, osError(err)
	}
	conn := os.NewFile(uintptr(fd), socket)
	defer conn.Close()
	if timeout > 0 {
		tv := syscall.NsecToTimeval(timeout.Nanoseconds())
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv)
	}
	for {
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: socket})
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return 0, "", nil, osError(err)
	}
	var request bytes.Buffer
	fmt.Fprintf(&request, "%s %s HTTP/1.1\r\nHost: cronium-api\r\nAccept-Encoding: identity\r\n", method, target)
	fmt.Fprintf(&request, "Authorization: Bearer %s\r\nContent-Type: application/json\r\nConnection: close\r\n", token)
	if hasBody {
		fmt.Fprintf(&request, "Content-Length: %d\r\n", len(body))
	}
	request.WriteString("\r\n")
	request.Write(body)
	if _, err := conn.Write(request.Bytes()); err != nil {
		return 0, "", nil, osError(err)
	}
	reader := bufio.NewReader(conn)
	statusLine, err := reader.ReadString('\n')
	if err != nil {
		return 0, "", nil, fmt.Errorf("the runtime service closed the connection: %v", osError(err))
	}
	parts := strings.SplitN(strings.TrimRight(statusLine, "\r\n"), " ", 3)
	if len(parts) < 2 || !strings.HasPrefix(parts[0], "HTTP/") {
		return 0, "", nil, fmt.Errorf("bad status line from the runtime service: %q", statusLine)
	}
	status, err := strconv.Atoi(parts[1])
	if err != nil {
		return 0, "", nil, fmt.Errorf("bad status line from the runtime service: %q", statusLine)
	}
	reason := ""
	if len(parts) == 3 {
		reason = parts[2]
	}
	length, chunked := int64(-1), false
	for {
		line, err := reader.ReadString('\n')
		if err != nil {
			return 0, "", nil, fmt.Errorf("the runtime service closed the connection: %v", osError(err))
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimSpace(value)
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "content-length":
			if length, err = strconv.ParseInt(value, 10, 64); err != nil || length < 0 {
				return 0, "", nil, fmt.Errorf("bad Content-Length from the runtime service: %q", value)
			}
		case "transfer-encoding":
			chunked = strings.Contains(strings.ToLower(value), "chunked")
		}
	}
	var data []byte
	switch {
	case method == "HEAD" || status == 204 || status == 304:
	case chunked:
		for {
			line, err := reader.ReadString('\n')
			if err != nil {
				return 0, "", nil, osError(err)
			}
			size, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(line, ";", 2)[0]), 16, 64)
			if err != nil || size < 0 {
				return 0, "", nil, fmt.Errorf("bad chunk from the runtime service: %q", line)
			}
			if size == 0 {
				break
			}
			chunk := make([]byte, size)
			if _, err := io.ReadFull(reader, chunk); err != nil {
				return 0, "", nil, osError(err)
			}
			data = append(data, chunk...)
			reader.ReadString('\n')
		}
	case length >= 0:
		data = make([]byte, length)
		if _, err := io.ReadFull(reader, data); err != nil {
			return 0, "", nil, osError(err)
		}
	default:
		if data, err = io.ReadAll(reader); err != nil {
			return 0, "", nil, osError(err)
		}
	}
	return status, reason, data, nil
}

// quote is Python's urllib.parse.quote(text, safe="").
func quote(text string) string {
	var b strings.Builder
	for _, c := range []byte(text) {
		if c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("_.-~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// osError renders an OS error as Python's OSError str() does: "[Errno 2] No such file or
// directory: 'path'".
func osError(err error) error {
	if err == nil {
		return nil
	}
	var pathErr *os.PathError
	var linkErr *os.LinkError
	var errno syscall.Errno
	switch {
	case errors.As(err, &pathErr) && errors.As(pathErr.Err, &errno):
		return fmt.Errorf("[Errno %d] %s: %s", int(errno), capitalise(errno.Error()), pyjson.ReprString(pathErr.Path))
	case errors.As(err, &linkErr) && errors.As(linkErr.Err, &errno):
		return fmt.Errorf("[Errno %d] %s: %s -> %s", int(errno), capitalise(errno.Error()),
			pyjson.ReprString(linkErr.Old), pyjson.ReprString(linkErr.New))
	case errors.As(err, &errno):
		return fmt.Errorf("[Errno %d] %s", int(errno), capitalise(errno.Error()))
	}
	return err
}

func capitalise(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
