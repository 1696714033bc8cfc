// Builds the JavaScript tool: bundles app.js with the packages listed under
// `dependencies` in package.json (esbuild), then packages the bundle with
// SpiderMonkey into a component exporting the tool world (componentize-js).
// Run by scripts/build-interpreters from the directory npm installed into:
//   node build.mjs <repo> <out.wasm>
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { build } from "esbuild";
import { componentize } from "@bytecodealliance/componentize-js";

const [repo, out] = process.argv.slice(2);
const source = join(repo, "interpreters/javascript");
const manifest = JSON.parse(await readFile(join(source, "package.json"), "utf8"));
const names = Object.keys(manifest.dependencies ?? {});

// One module that imports every baked package, for app.js's `require`.
const packages = [
  ...names.map((name, i) => `import * as p${i} from ${JSON.stringify(name)};`),
  "export const PACKAGES = {",
  ...names.map((name, i) => `  ${JSON.stringify(name)}: p${i},`),
  "};",
].join("\n");

const bundle = await build({
  entryPoints: [join(source, "app.js")],
  bundle: true,
  write: false,
  format: "esm",
  platform: "neutral",
  target: "es2022",
  mainFields: ["module", "main"],
  // app.js's own imports (acorn) come from where npm installed, not from beside it.
  nodePaths: [join(process.cwd(), "node_modules")],
  // Node's built-ins do not exist here: a package's Node-only branch (papaparse's
  // stream support) throws "Dynamic require ... is not supported" if reached.
  // Component imports, resolved by componentize-js against the world.
  external: ["wasi:*", "stream", "fs", "path", "os", "crypto", "util", "buffer", "events", "child_process"],
  plugins: [
    {
      name: "baked-packages",
      setup(b) {
        b.onResolve({ filter: /^imagentx:packages$/ }, () => ({ path: "packages", namespace: "baked" }));
        b.onLoad({ filter: /.*/, namespace: "baked" }, () => ({ contents: packages, resolveDir: process.cwd() }));
      },
    },
  ],
  logLevel: "warning",
});

// The world (wit/world.wit) and its dependencies: the tool world, and the WASI
// 0.2.12 interfaces the interpreter itself imports, from jco's copy.
const wit = await mkdtemp(join(tmpdir(), "imagentx-js-wit-"));
const wasi = "node_modules/@bytecodealliance/jco/lib/wit/builtin/0.2.12";
await cp(join(source, "wit/world.wit"), join(wit, "world.wit"));
await cp(join(repo, "guest-sdk/wit/tool.wit"), join(wit, "deps/tool/tool.wit"));
for (const dep of ["filesystem", "io", "clocks"]) {
  await cp(join(wasi, `wasi-${dep}`), join(wit, `deps/${dep}`), { recursive: true });
}

const { component } = await componentize(bundle.outputFiles[0].text, {
  witPath: wit,
  worldName: "javascript-tool",
  // No fetch: the sandbox has no network, and the interpreter has no HTTP client.
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
await rm(wit, { recursive: true });
