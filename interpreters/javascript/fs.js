// `require("fs")` for agents' code: a small synchronous subset of Node's fs
// over the WASI filesystem, that is over the sandbox's two directories,
// `/data` (the user's) and `/tmp` (this call's). The host resolves every path
// inside its directory: `..` and symlinks cannot leave it.
import { getDirectories } from "wasi:filesystem/preopens@0.2.12";

const CODES = {
  "no-entry": ["ENOENT", "no such file or directory"],
  access: ["EACCES", "permission denied"],
  "not-permitted": ["EPERM", "operation not permitted"],
  exist: ["EEXIST", "file already exists"],
  "is-directory": ["EISDIR", "illegal operation on a directory"],
  "not-directory": ["ENOTDIR", "not a directory"],
  "not-empty": ["ENOTEMPTY", "directory not empty"],
  "read-only": ["EROFS", "read-only file system"],
  "insufficient-space": ["ENOSPC", "no space left on device"],
  quota: ["EDQUOT", "quota exceeded"],
  "file-too-large": ["EFBIG", "file too large"],
  "name-too-long": ["ENAMETOOLONG", "name too long"],
  invalid: ["EINVAL", "invalid argument"],
};

function fsError(e, syscall, path) {
  const payload = typeof e?.payload === "string" ? e.payload : String(e?.message ?? e);
  const [code, text] = CODES[payload] ?? ["EIO", payload];
  const error = new Error(`${code}: ${text}, ${syscall} '${path}'`);
  error.code = code;
  error.syscall = syscall;
  error.path = path;
  return error;
}

let roots;
function preopens() {
  roots ??= new Map(getDirectories().map(([descriptor, name]) => [name, descriptor]));
  return roots;
}

// "/data/a/../b.csv" -> [descriptor of /data, "b.csv"]. Relative paths are
// taken from /data.
function resolve(path, syscall) {
  if (typeof path !== "string") throw new TypeError(`${syscall}: the path must be a string`);
  const parts = [];
  for (const part of (path.startsWith("/") ? path : `/data/${path}`).split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") parts.pop();
    else parts.push(part);
  }
  const root = preopens().get(`/${parts[0] ?? ""}`);
  if (root === undefined) throw fsError({ payload: "no-entry" }, syscall, path);
  return [root, parts.slice(1).join("/") || "."];
}

function open(path, syscall, openFlags, flags) {
  const [root, rel] = resolve(path, syscall);
  try {
    return root.openAt({ symlinkFollow: true }, rel, openFlags, flags);
  } catch (e) {
    throw fsError(e, syscall, path);
  }
}

function bytesOf(data) {
  if (typeof data === "string") return new TextEncoder().encode(data);
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new TextEncoder().encode(String(data));
}

function encodingOf(options) {
  return typeof options === "string" ? options : options?.encoding;
}

export function readFileSync(path, options) {
  const file = open(path, "open", {}, { read: true });
  const chunks = [];
  let offset = 0n;
  try {
    for (;;) {
      const [chunk, end] = file.read(1n << 20n, offset);
      chunks.push(chunk);
      offset += BigInt(chunk.length);
      if (end || chunk.length === 0) break;
    }
  } catch (e) {
    throw fsError(e, "read", path);
  }
  const bytes = new Uint8Array(Number(offset));
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  return encodingOf(options) ? new TextDecoder().decode(bytes) : bytes;
}

function write(path, data, append) {
  const file = open(path, "open", { create: true, truncate: !append }, { write: true });
  const bytes = bytesOf(data);
  try {
    let offset = append ? file.stat().size : 0n;
    for (let at = 0; at < bytes.length; ) {
      const written = Number(file.write(bytes.subarray(at, at + (1 << 20)), offset));
      at += written;
      offset += BigInt(written);
    }
  } catch (e) {
    throw fsError(e, "write", path);
  }
}

export function writeFileSync(path, data) {
  write(path, data, false);
}

export function appendFileSync(path, data) {
  write(path, data, true);
}

export function readdirSync(path) {
  const dir = open(path, "scandir", { directory: true }, { read: true });
  const names = [];
  try {
    const entries = dir.readDirectory();
    for (let entry = entries.readDirectoryEntry(); entry; entry = entries.readDirectoryEntry()) {
      names.push(entry.name);
    }
  } catch (e) {
    throw fsError(e, "scandir", path);
  }
  return names.sort();
}

export function statSync(path) {
  const [root, rel] = resolve(path, "stat");
  let stat;
  try {
    stat = root.statAt({ symlinkFollow: true }, rel);
  } catch (e) {
    throw fsError(e, "stat", path);
  }
  return {
    size: Number(stat.size),
    isFile: () => stat.type === "regular-file",
    isDirectory: () => stat.type === "directory",
  };
}

export function existsSync(path) {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}

export function mkdirSync(path, options) {
  const [root, rel] = resolve(path, "mkdir");
  const steps = options?.recursive ? rel.split("/").map((_, i, all) => all.slice(0, i + 1).join("/")) : [rel];
  for (const step of steps) {
    try {
      root.createDirectoryAt(step);
    } catch (e) {
      if (!(options?.recursive && e?.payload === "exist")) throw fsError(e, "mkdir", path);
    }
  }
}

export function unlinkSync(path) {
  const [root, rel] = resolve(path, "unlink");
  try {
    root.unlinkFileAt(rel);
  } catch (e) {
    throw fsError(e, "unlink", path);
  }
}
