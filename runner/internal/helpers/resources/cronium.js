// The `cronium` global for Node scripts (loaded with `node --require`):
//   cronium.input(key, fallback), cronium.output(value) / cronium.output(key, value),
//   cronium.getVariable(name), cronium.setVariable(name, value), cronium.event(field),
//   cronium.tool(name, args) (API mode only), and snake_case aliases.
// Bundled mode: JSON files in $CRONIUM_DIR, the same ones the Python and shell helpers use.
// API mode ($CRONIUM_API_SOCKET set): each call goes through the shell helper commands, which speak
// to the orchestrator's runtime service, so that the calls stay synchronous here. Values travel
// on the helper's stdin, never on its command line (which every user of the server can read,
// and which the kernel caps in size).
"use strict";
const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");

const EVENT_FIELDS = ["id", "name", "type", "execution_id", "server", "payload_version", "runner_version", "timeout"];
const TOOLS_NEED_API = "tool actions need API mode (run the event with api=True, or %%cronium --api)";

function json(value) {
  return JSON.stringify(value === undefined ? null : value);
}

// Runs a shell helper in its envelope form: {"value": V}, or {} when the key or variable is missing.
function viaHelper(command, args, stdin) {
  let printed;
  try {
    printed = execFileSync(command, ["--json", ...args], {
      encoding: "utf8",
      input: stdin === undefined ? "" : stdin,
      stdio: ["pipe", "pipe", "pipe"],
    });
  } catch (error) {
    const message = String(error.stderr || "").trim() || error.message;
    throw new Error(message);
  }
  return printed.trim() === "" ? {} : JSON.parse(printed);
}

function directory() {
  const dir = process.env.CRONIUM_DIR;
  if (!dir) throw new Error("cronium helpers need CRONIUM_DIR (they run inside cronium-runner)");
  return dir;
}

function read(name, fallback) {
  try {
    return JSON.parse(fs.readFileSync(path.join(directory(), name), "utf8"));
  } catch (error) {
    if (error.code === "ENOENT") return fallback;
    throw error;
  }
}

function write(name, value) {
  const target = path.join(directory(), name);
  const temporary = `${target}.tmp-${process.pid}`;
  fs.writeFileSync(temporary, json(value));
  fs.renameSync(temporary, target);
}

function checkName(kind, name) {
  if (typeof name !== "string" || !name) throw new Error(`${kind} must be a non-empty string`);
}

function mergeOutputKey(current, key, value) {
  if (current === null || current === undefined) current = {};
  if (typeof current !== "object" || Array.isArray(current)) {
    throw new Error(`the output is already set to a non-object value: cannot set key '${key}'`);
  }
  current[key] = value === undefined ? null : value;
  return current;
}

const apiCronium = {
  input(key, fallback = null) {
    if (key === undefined) return viaHelper("cronium.input", []).value;
    const found = viaHelper("cronium.input", [String(key)]);
    return "value" in found ? found.value : fallback;
  },
  output(...args) {
    if (args.length === 2) {
      checkName("output key", args[0]);
      viaHelper("cronium.output", [args[0], "-"], json(args[1]));
    } else {
      viaHelper("cronium.output", ["-"], json(args[0]));
    }
  },
  getVariable(name) {
    const found = viaHelper("cronium.getVariable", [String(name)]);
    return "value" in found ? found.value : null;
  },
  setVariable(name, value) {
    checkName("variable name", name);
    viaHelper("cronium.setVariable", [name, "-"], json(value));
  },
  tool(name, args = {}) {
    checkName("tool name", name);
    return viaHelper("cronium.tool", [name, "-"], json(args)).value;
  },
};

const fileCronium = {
  input(key, fallback = null) {
    const data = read("input.json", null);
    if (key === undefined) return data;
    return data !== null && typeof data === "object" && key in data ? data[key] : fallback;
  },
  output(...args) {
    if (args.length === 2) {
      checkName("output key", args[0]);
      write("output.json", mergeOutputKey(read("output.json", null), args[0], args[1]));
    } else {
      write("output.json", args[0]);
    }
  },
  getVariable(name) {
    const variables = read("variables.json", {});
    return name in variables ? variables[name] : null;
  },
  setVariable(name, value) {
    checkName("variable name", name);
    const variables = read("variables.json", {});
    variables[name] = value === undefined ? null : value;
    write("variables.json", variables);
  },
  tool() {
    throw new Error(TOOLS_NEED_API);
  },
};

const cronium = process.env.CRONIUM_API_SOCKET ? apiCronium : fileCronium;
// The event context is fixed for the run: read from event.json in both modes.
cronium.event = function event(field) {
  const data = read("event.json", {});
  if (field === undefined) return data;
  if (!EVENT_FIELDS.includes(field)) {
    throw new Error(`unknown event field '${field}'; known: ${EVENT_FIELDS.join(", ")}`);
  }
  return field in data ? data[field] : null;
};
cronium.get_variable = cronium.getVariable;
cronium.set_variable = cronium.setVariable;
globalThis.cronium = cronium;
