package helpers

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"cronium/runner/internal/pyjson"
)

type call struct {
	code           int
	stdout, stderr string
}

func helper(t *testing.T, stdin, verb string, args ...string) call {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Run(verb, args, strings.NewReader(stdin), &out, &errOut)
	return call{code, out.String(), errOut.String()}
}

func expect(t *testing.T, got call, want call) {
	t.Helper()
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func bundled(t *testing.T) string {
	dir := t.TempDir()
	input := `{"name": "Ada Lovelace", "n": 3, "tags": ["a", "b"], "nested": {"unicode": "zürich ✓"}}`
	os.WriteFile(filepath.Join(dir, InputFile), []byte(input), 0o600)
	os.WriteFile(filepath.Join(dir, VariablesFile), []byte(`{"seeded": true}`), 0o600)
	os.WriteFile(filepath.Join(dir, EventFile), []byte(`{"id": 4, "name": "ev", "timeout": 120, "payload_version": null}`), 0o600)
	t.Setenv("CRONIUM_DIR", dir)
	t.Setenv(APISocketVar, "")
	return dir
}

func TestBundledContract(t *testing.T) {
	dir := bundled(t)
	expect(t, helper(t, "", "input", "name"), call{0, "Ada Lovelace\n", ""})
	expect(t, helper(t, "", "input", "tags"), call{0, `["a","b"]` + "\n", ""})
	expect(t, helper(t, "", "input", "nested"), call{0, `{"unicode":"z\u00fcrich \u2713"}` + "\n", ""})
	expect(t, helper(t, "", "input", "nope"), call{1, "", "cronium.input: key 'nope' not found\n"})
	expect(t, helper(t, "", "input", "--json", "nope"), call{0, "{}\n", ""})
	expect(t, helper(t, "", "input", "--json", "n"), call{0, `{"value":3}` + "\n", ""})
	expect(t, helper(t, "", "output", "result", "success"), call{0, "", ""})
	expect(t, helper(t, `{"deep": true}`, "output", "data", "-"), call{0, "", ""})
	got, _ := os.ReadFile(filepath.Join(dir, OutputFile))
	if v, _ := pyjson.Parse(got); string(pyjson.Compact(v)) != `{"result":"success","data":{"deep":true}}` {
		t.Errorf("output.json %s", got)
	}
	expect(t, helper(t, "", "output", "5"), call{0, "", ""})
	expect(t, helper(t, "", "output", "k", "v"), call{1, "", "cronium.output: the output is already set to a non-object value: cannot set key 'k'\n"})
	expect(t, helper(t, "", "output", "not json {"), call{0, "", ""})
	expect(t, helper(t, "", "setVariable", "color", "blue"), call{0, "", ""})
	expect(t, helper(t, `{"a": [1]}`, "setVariable", "cfg", "-"), call{0, "", ""})
	expect(t, helper(t, "", "getVariable", "cfg"), call{0, `{"a":[1]}` + "\n", ""})
	expect(t, helper(t, "", "getVariable", "color"), call{0, "blue\n", ""})
	expect(t, helper(t, "", "getVariable", "nope"), call{1, "", "cronium.getVariable: variable 'nope' is not set\n"})
	expect(t, helper(t, "", "getVariable", "--json", "nope"), call{0, "{}\n", ""})
	expect(t, helper(t, "", "event", "timeout"), call{0, "120\n", ""})
	expect(t, helper(t, "", "event", "payload_version"), call{0, "null\n", ""})
	expect(t, helper(t, "", "event", "bogus"), call{1, "", "cronium.event: unknown event field 'bogus'; known: " + strings.Join(EventFields, ", ") + "\n"})
	expect(t, helper(t, "", "tool", "shout", `{"msg": "x"}`), call{1, "", "cronium.tool: " + toolsNeedAPI + "\n"})
	expect(t, helper(t, "", "tool", "shout", "not json"), call{1, "", "cronium.tool: tool arguments must be a JSON object\n"})
	expect(t, helper(t, "", "output"), call{64, "", "usage: cronium.output VALUE|-  or  cronium.output KEY VALUE|-\n"})
	expect(t, helper(t, "", "bogus"), call{64, "", "cronium-runner: unknown helper 'bogus'\n"})
	t.Setenv("CRONIUM_DIR", "")
	expect(t, helper(t, "", "input"), call{1, "", "cronium.input: cronium helpers need CRONIUM_DIR (they run inside cronium-runner)\n"})
}

// Helpers run at once (a script's background jobs) must not lose each other's keys.
func TestBundledUpdatesAreLocked(t *testing.T) {
	dir := bundled(t)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			helper(t, "", "setVariable", "v"+string(rune('a'+i)), "1")
		}(i)
	}
	wg.Wait()
	data, _ := os.ReadFile(filepath.Join(dir, VariablesFile))
	v, _ := pyjson.Parse(data)
	if v.(*pyjson.Object).Len() != 21 {
		t.Fatalf("variables.json %s", data)
	}
}

func TestAPIContract(t *testing.T) {
	bundled(t)
	variables := map[string]any{}
	var seen []string
	server := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = append(seen, r.Method+" "+r.URL.EscapedPath())
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			w.WriteHeader(401)
			return
		}
		body, _ := io.ReadAll(r.Body)
		var value any
		json.Unmarshal(body, &value)
		name := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
		switch {
		case r.Method == "GET" && strings.HasSuffix(r.URL.Path, "/input"):
			w.Write([]byte(`{"k": "v"}`))
		case r.Method == "GET":
			if found, ok := variables[name]; ok {
				json.NewEncoder(w).Encode(found)
				return
			}
			w.WriteHeader(404)
			w.Write([]byte(`{"error": "variable 'x' is not set"}`))
		case r.Method == "PUT" && strings.Contains(r.URL.Path, "/variables/"):
			variables[name] = value
			w.Write([]byte(`{"ok": true}`))
		case r.Method == "POST":
			if _, ok := value.(map[string]any); !ok {
				w.WriteHeader(400)
				w.Write([]byte(`{"error": "tool 'shout': arguments must be a JSON object"}`))
				return
			}
			w.Write([]byte(`{"upper": "X"}`))
		default:
			w.Write([]byte(`{"ok": true}`))
		}
	}))
	socket := filepath.Join(t.TempDir(), "api.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	server.Listener = listener
	server.Start()
	defer server.Close()
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("s3cret\n"), 0o600)
	t.Setenv(APISocketVar, socket)
	t.Setenv(APITokenFileVar, token)
	t.Setenv("CRONIUM_EXECUTION_ID", "e 1/2")
	expect(t, helper(t, "", "input", "k"), call{0, "v\n", ""})
	expect(t, helper(t, "", "setVariable", "a b", `{"x": 1}`), call{0, "", ""})
	expect(t, helper(t, "", "getVariable", "a b"), call{0, `{"x":1}` + "\n", ""})
	expect(t, helper(t, "", "getVariable", "nope"), call{1, "", "cronium.getVariable: variable 'nope' is not set\n"})
	expect(t, helper(t, "", "getVariable", "--json", "nope"), call{0, "{}\n", ""})
	expect(t, helper(t, "", "tool", "shout", `{"msg": "x"}`), call{0, `{"upper":"X"}` + "\n", ""})
	expect(t, helper(t, "", "tool", "shout", "[1, 2]"), call{1, "", "cronium.tool: tool 'shout': arguments must be a JSON object\n"})
	expect(t, helper(t, "", "output", "k", "v"), call{0, "", ""})
	if seen[1] != "PUT /v1/executions/e%201%2F2/variables/a%20b" || seen[len(seen)-1] != "PUT /v1/executions/e%201%2F2/output/k" {
		t.Errorf("requests %v", seen)
	}
}

// The embedded helper objects are the Python runner's, byte for byte, while both exist.
func TestResourcesMatchThePythonRunner(t *testing.T) {
	for _, name := range Resources {
		python, err := os.ReadFile(filepath.Join("../../cronium_runner/resources", name))
		if err != nil {
			t.Skip("no Python runner beside this module")
		}
		if !bytes.Equal(python, Resource(name)) {
			t.Errorf("%s differs from the Python runner's", name)
		}
	}
}

func TestInstallPrograms(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "helpers")
	bin, err := InstallPrograms(dir, "/path/to/cronium-runner")
	if err != nil {
		t.Fatal(err)
	}
	for name := range Shell {
		if target, _ := os.Readlink(filepath.Join(bin, name)); target != "/path/to/cronium-runner" {
			t.Errorf("%s -> %q", name, target)
		}
	}
	if argv := InterpreterArgv("node", "/usr/bin/node", dir, "s.js"); strings.Join(argv, " ") != "/usr/bin/node --require "+dir+"/cronium.js s.js" {
		t.Errorf("%v", argv)
	}
}
