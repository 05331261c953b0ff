package manifest

import (
	"strings"
	"testing"
)

const good = `{"version": 1, "name": "ev", "type": "bash", "entrypoint": "script.sh"`

func TestValid(t *testing.T) {
	m, err := Parse([]byte(good + `, "timeout": 30.0, "grace_period": 2, "env": {"A_1": "x"}, "input": {"b": 1, "a": [2]}, "event": {"id": 7}}`))
	if err != nil {
		t.Fatal(err)
	}
	if m.Timeout != 30 || m.GracePeriod != 2 || m.Interpreter() != "bash" || len(m.Env) != 1 {
		t.Fatalf("%+v", m)
	}
	m, err = Parse([]byte(good + "}"))
	if err != nil || m.Timeout != DefaultTimeout || m.GracePeriod != DefaultGrace {
		t.Fatalf("%+v %v", m, err)
	}
}

func TestRefused(t *testing.T) {
	cases := map[string]string{
		`[1]`:                      "manifest must be a mapping",
		good + `, "x": 1, "b": 2}`: "unknown manifest field(s): b, x",
		`{"version": 1, "name": "n", "type": "sh"}`:                                      "manifest field 'entrypoint' is missing",
		strings.Replace(good, `"version": 1`, `"version": 2`, 1) + "}":                   "manifest version 2 is not supported (this runner reads 1)",
		strings.Replace(good, `"ev"`, `"  "`, 1) + "}":                                   "manifest field 'name' must be a non-empty string",
		strings.Replace(good, `"bash"`, `"cobol"`, 1) + "}":                              "manifest field 'type' must be one of bash, sh, python, node, got 'cobol'",
		strings.Replace(good, `"script.sh"`, `"../x"`, 1) + "}":                          "manifest field 'entrypoint' must be a plain file name, got '../x'",
		strings.Replace(good, `"script.sh"`, `".."`, 1) + "}":                            "must be a plain file name",
		good + `, "timeout": 0}`:                                                         "manifest field 'timeout' must be a positive number of seconds, got 0",
		good + `, "timeout": true}`:                                                      "got True",
		good + `, "timeout": 1e999}`:                                                     "must be a positive number of seconds, got inf",
		good + `, "grace_period": "5"}`:                                                  "manifest field 'grace_period' must be a positive number of seconds, got '5'",
		good + `, "env": ["A"]}`:                                                         "manifest field 'env' must be a mapping of names to strings",
		good + `, "env": {"1A": "x"}}`:                                                   "env name '1A' is not a valid variable name",
		good + `, "env": {"CRONIUM_X": "x"}}`:                                            "env name 'CRONIUM_X' uses the reserved prefix CRONIUM_",
		good + `, "env": {"A": 1}}`:                                                      "env value of 'A' must be a string without NUL bytes",
		good + `, "env": {"A": "a\u0000b"}}`:                                             "env value of 'A' must be a string without NUL bytes",
		good + `, "event": 3}`:                                                           "manifest field 'event' must be a mapping",
		"version: 1\nname: x\n":                                                          "manifest is not JSON",
		"base: &a {x: 1}\nother: *a\n":                                                   "anchors or aliases is refused",
		good + `, "input": ` + strings.Repeat("[", 600) + strings.Repeat("]", 600) + "}": "nested too deeply",
		good + `} trailing`:                                                              "manifest is not JSON",
		"\xff\xfe":                                                                       "not valid UTF-8",
	}
	for text, want := range cases {
		_, err := Parse([]byte(text))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%.60q: got %v, want %q", text, err, want)
		}
	}
}
