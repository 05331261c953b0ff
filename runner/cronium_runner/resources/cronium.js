// The `cronium` global for Node scripts (loaded with `node --require`). Bundled mode: JSON
// files in $CRONIUM_DIR, the same ones the Python and shell helpers use. API mode
// ($CRONIUM_API_URL set): each call goes through the shell helper commands, which speak to the
// orchestrator's runtime service, so that the calls stay synchronous here.
"use strict";
const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");

function viaHelper(command, args) {
  const printed = execFileSync(command, ["--json", ...args], { encoding: "utf8" });
  return printed.trim() === "" ? null : JSON.parse(printed);
}

const apiMode = Boolean(process.env.CRONIUM_API_URL);

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
  fs.writeFileSync(temporary, JSON.stringify(value === undefined ? null : value));
  fs.renameSync(temporary, target);
}

const apiCronium = {
  input(key) {
    return viaHelper("cronium.input", key === undefined ? [] : [String(key)]);
  },
  output(value) {
    viaHelper("cronium.output", [JSON.stringify(value === undefined ? null : value)]);
  },
  getVariable(name) {
    return viaHelper("cronium.getVariable", [String(name)]);
  },
  setVariable(name, value) {
    if (typeof name !== "string" || !name) throw new Error("variable name must be a non-empty string");
    viaHelper("cronium.setVariable", [name, JSON.stringify(value === undefined ? null : value)]);
  },
  event(field) {
    return viaHelper("cronium.event", field === undefined ? [] : [String(field)]);
  },
};

const fileCronium = {
  input(key) {
    const data = read("input.json", null);
    if (key === undefined) return data;
    return data !== null && typeof data === "object" && key in data ? data[key] : null;
  },
  output(value) {
    write("output.json", value);
  },
  getVariable(name) {
    const variables = read("variables.json", {});
    return name in variables ? variables[name] : null;
  },
  setVariable(name, value) {
    if (typeof name !== "string" || !name) throw new Error("variable name must be a non-empty string");
    const variables = read("variables.json", {});
    variables[name] = value === undefined ? null : value;
    write("variables.json", variables);
  },
  event(field) {
    const data = read("event.json", {});
    return field === undefined ? data : field in data ? data[field] : null;
  },
};
const cronium = apiMode ? apiCronium : fileCronium;
cronium.get_variable = cronium.getVariable;
cronium.set_variable = cronium.setVariable;
globalThis.cronium = cronium;
