// The JavaScript tool: runs an agent's code in a fresh SpiderMonkey (one
// instance per call), packaged by componentize-js as a component exporting
// the tool world (guest-sdk/wit/tool.wit). Built by scripts/build-interpreters.
//
// Input:  {"code": "...", "args": {...}}: the code sees `args` as a global,
//         and `require` for `fs` (over /data and /tmp) and the baked packages.
// Output: {"stdout": what console.log printed, "result": the global `result`
//         if the code set one, else the code's completion value (the value of
//         its last expression statement, as in a REPL)}.
// An exception is a tool_error whose message is its stack.
//
// One instance serves one call, or every step of a session: the code's
// top-level declarations are made globals (below), so that a session's next
// step sees them.

import { parse } from "acorn";
import { PACKAGES } from "imagentx:packages";
import * as fs from "./fs.js";

const BUILT_IN = { fs, "node:fs": fs };

// `require(name)` gives `fs` (over /data and /tmp) and the packages baked in
// at build time (package.json's dependencies).
function require(name) {
  if (Object.hasOwn(BUILT_IN, name)) return BUILT_IN[name];
  const ns = Object.hasOwn(PACKAGES, name) ? PACKAGES[name] : undefined;
  if (ns === undefined) {
    const known = ["fs", ...Object.keys(PACKAGES)].join(", ");
    const error = new Error(`Cannot find module '${name}': this interpreter has only ${known}`);
    error.code = "MODULE_NOT_FOUND";
    throw error;
  }
  return ns.default ?? ns;
}

// Printed output kept per call; the rest is counted and dropped, so that a
// flood cannot crowd out `result` (the sandbox's default output cap is 1 MiB).
const STDOUT_CAP = 512 * 1024;
// The largest answer handed back (see the end of `call`).
const ANSWER_CAP = 4 * 1024 * 1024;

const SCHEMA = {
  type: "object",
  properties: {
    code: {
      type: "string",
      description:
        "JavaScript source to run (a script; `args` is a global). The value of the last expression statement " +
        "is the result (as in a REPL: `rows.length` as the last line), unless the code sets `result`. " +
        "console.log output comes back as `stdout`. In a session, top-level variables, functions and classes " +
        "persist between steps (`let` and `const` become `var`).",
    },
    args: { type: "object", description: "available to the code as `args`" },
  },
  required: ["code"],
};

export function describe() {
  return JSON.stringify({
    name: "javascript",
    version: "0.1.0",
    description:
      "Runs JavaScript code in a fresh interpreter (or a session's live one); console output and the last " +
      "expression's value (or `result`) come back.",
    input_schema: SCHEMA,
  });
}

function show(value) {
  if (typeof value === "string") return value;
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  } catch {
    return String(value);
  }
}

// The interpreter was built without an HTTP client ("http" disabled), but
// StarlingMonkey still defines `fetch`, which would trap. Refuse it plainly.
globalThis.fetch = () => Promise.reject(new TypeError("fetch: this sandbox has no network"));

// An exception's stack, as frames of the agent's code only, at most 20.
function frames(e) {
  const lines = String(e.stack ?? "").split("\n").filter((l) => l.includes("> eval:"));
  const shown = lines.slice(0, 20).map((l) => "  at " + l.replace(/^(.*?)@.* > eval:/, (_, fn) => `${fn ? fn + " " : ""}<code>:`));
  if (lines.length > 20) shown.push(`  ... ${lines.length - 20} more frames`);
  return shown.join("\n");
}

// The code with its top-level `let`, `const` and `class` declarations turned
// into `var`s. An indirect eval keeps those three to itself, so without this
// a session's `const rows = ...` would be gone at the next step, and `let
// result = ...` would not be seen as the result.
function globalise(code) {
  if (!/\b(let|const|class)\b/.test(code)) return code;
  let program;
  try {
    program = parse(code, { ecmaVersion: "latest", sourceType: "script" });
  } catch {
    return code; // eval reports the syntax error in its own words
  }
  let out = "";
  let at = 0;
  for (const node of program.body) {
    if (node.type === "VariableDeclaration" && node.kind !== "var") {
      out += code.slice(at, node.start) + "var";
      at = node.start + node.kind.length;
    } else if (node.type === "ClassDeclaration") {
      out += `${code.slice(at, node.start)}var ${node.id.name} = ${code.slice(node.start, node.end)};`;
      at = node.end;
    }
  }
  return out + code.slice(at);
}

// Compiled into the pre-initialised image rather than at the first call.
globalise("let a = 1; const { b } = {}; class C {}");

function fail(code, message, stdout) {
  return JSON.stringify({ code, message, stdout });
}

export async function call(input) {
  let request;
  try {
    request = JSON.parse(input);
    if (typeof request.code !== "string") throw new TypeError("`code` must be a string");
  } catch (e) {
    throw fail("invalid_input", `expected {"code": ...}: ${e.message}`, "");
  }
  let stdout = "";
  let dropped = 0;
  const print = (...values) => {
    const line = values.map(show).join(" ") + "\n";
    const room = STDOUT_CAP - stdout.length;
    if (line.length > room) dropped += line.length - Math.max(room, 0);
    stdout += room > 0 ? line.slice(0, room) : "";
  };
  for (const level of ["log", "info", "warn", "error", "debug"]) {
    console[level] = print;
  }
  globalThis.args = request.args ?? {};
  globalThis.require = require;
  let result;
  try {
    // A result is this step's: one left by an earlier step of a session is not.
    delete globalThis.result;
    const completion = (0, eval)(globalise(request.code));
    result = Object.hasOwn(globalThis, "result") ? globalThis.result : completion;
    if (result && typeof result.then === "function") result = await result;
  } catch (e) {
    const message = e instanceof Error ? `${e.name}: ${e.message}\n${frames(e)}` : `uncaught: ${show(e)}`;
    throw fail("tool_error", message, stdout);
  }
  const answer = { stdout };
  if (dropped > 0) answer.stdout_truncated = true;
  if (result !== undefined) {
    try {
      answer.result = JSON.parse(JSON.stringify(result));
    } catch {
      answer.result = String(result);
    }
  }
  const text = JSON.stringify(answer);
  // Handing a string to the host costs about 0.25 µs per character in the
  // bindings componentize-js generates (a JavaScript loop, interpreted): refuse
  // what the host would cut anyway rather than spend seconds on it.
  if (text.length > ANSWER_CAP) {
    throw fail("tool_error", `the answer is ${text.length} characters, over ${ANSWER_CAP}: write big results to /data`, "");
  }
  return text;
}
