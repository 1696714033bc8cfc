//! Limits across tenants (SECURITY.md, "Disk", "Descriptors", "Host memory"):
//! disk and descriptors held at every write and open, and the host's memory
//! budget over all calls. Hostile agents' code in the real Python tool and a
//! Rust guest, with the host's disk measured afterwards.
//! Every case: the user's usage never passes the quota, the tool gets an
//! error it can catch and carry on from, `limits_hit` says what happened, and
//! the next call works.
//!
//! Which error: EDQUOT (`/data`) or ENOSPC (`/tmp`) wherever WASI 0.2 can
//! carry an error code (open, truncate, `pwrite`, mkdir, a file's first write
//! when nothing is left); EIO for a write refused in the middle of a stream,
//! because wasi-libc turns every stream error into EIO (`src/engine/fs.rs`).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use imagentx_sandbox::data_dir::DataDir;
use imagentx_sandbox::engine::{DescriptorPool, Engine, EngineConfig};
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::report::{ExecutionReport, Status};
use imagentx_sandbox::runner::Sandbox;
use serde_json::{Value, json};

use common::interpreters::{Lang, assert_ok, run_code};

const MIB: u64 = 1 << 20;
/// The test tier: small caps, so that filling them takes milliseconds.
const QUOTA: u64 = 8 * MIB;
const FILES: u64 = 200;
const TMP: u64 = 4 * MIB;
const NOFILE: u64 = 64;

fn tiny_policy() -> Policy {
    let mut policy = Policy::default();
    let mut tiny = policy.tiers["free"].clone();
    tiny.data_quota_bytes = QUOTA;
    tiny.data_files = FILES;
    tiny.tmp_bytes = TMP;
    tiny.nofile_soft = NOFILE;
    tiny.concurrent_calls = 8;
    policy.tiers.insert("tiny".into(), tiny);
    policy
}

/// Python helpers every snippet below starts with: write until refused, and
/// answer how far it got and which errno stopped it.
const PRELUDE: &str = r#"
import errno, os
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
def fill(path, chunk, total):
    n = 0
    try:
        with open(path, 'ab') as f:
            while n < total:
                f.write(bytes(chunk))
                n += chunk
    except OSError as e:
        return err(e)
    return None
"#;

async fn py(sandbox: &Sandbox, user: &str, tier: &str, code: &str) -> ExecutionReport {
    run_code(sandbox, Lang::Python, user, tier, &format!("{PRELUDE}\n{code}"), json!({})).await
}

fn result(r: &ExecutionReport) -> Value {
    assert_ok(r, "the tool caught the refusal and answered");
    r.output.as_ref().unwrap()["result"].clone()
}

/// Apparent bytes and disk blocks (in bytes) under `dir`, as `du` counts them.
fn on_disk(dir: &Path) -> (u64, u64) {
    let (mut apparent, mut blocks) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let meta = entry.as_ref().unwrap().metadata().unwrap();
        if meta.is_dir() {
            let (a, b) = on_disk(&entry.unwrap().path());
            apparent += a;
            blocks += b;
        } else {
            apparent += meta.len();
            blocks += meta.blocks() * 512;
        }
    }
    (apparent, blocks)
}

fn user_dir(sandbox: &Sandbox, user: &str) -> std::path::PathBuf {
    sandbox.data_dir.user_dir(&UserId::new(user).unwrap()).unwrap()
}

fn assert_within_quota(sandbox: &Sandbox, user: &str) {
    let (apparent, blocks) = on_disk(&user_dir(sandbox, user));
    assert!(apparent <= QUOTA && blocks <= QUOTA + MIB, "{user} holds {apparent} bytes ({blocks} on disk)");
}

#[tokio::test]
async fn one_big_file_stops_at_the_quota_with_edquot_and_the_tool_carries_on() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "result = [fill('/data/big', 1 << 20, 64 << 20), os.path.getsize('/data/big'), fill('/data/big', 1, 1)]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    let (first, size, again) = (result(&r)[0].clone(), result(&r)[1].as_u64().unwrap(), result(&r)[2].clone());
    assert_eq!((first, again), (json!("EIO"), json!("EDQUOT")), "{r:?}");
    assert!((QUOTA - MIB..=QUOTA).contains(&size), "the file is {size} bytes");
    assert_eq!(r.usage.limits_hit, ["data_quota"]);
    assert_eq!(r.usage.bytes_written, Some(size));
    assert_within_quota(&sandbox, "mallory");
    // Deleting gives the room back; the next call writes again.
    let r =
        py(&sandbox, "mallory", "tiny", "os.remove('/data/big')\nresult = fill('/data/small', 1 << 20, 1 << 20)").await;
    assert_eq!(result(&r), Value::Null, "{r:?}");
    assert!(r.usage.limits_hit.is_empty(), "{:?}", r.usage.limits_hit);
    assert_eq!(sandbox.data_dir.usage(&UserId::new("mallory").unwrap()).await, Some(MIB));
}

#[tokio::test]
async fn many_files_of_a_megabyte_share_one_quota() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
done = 0
for i in range(100):
    e = fill('/data/f%d' % i, 1 << 20, 1 << 20)
    if e: break
    done += 1
result = [done, e]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    assert_eq!(result(&r), json!([8, "EDQUOT"]), "{r:?}");
    assert_within_quota(&sandbox, "mallory");
}

#[tokio::test]
async fn a_million_empty_files_stop_at_the_file_cap() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
n = 0
try:
    for i in range(1000000):
        open('/data/e%d' % i, 'w').close()
        n += 1
except OSError as e:
    result = [n, err(e)]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    assert_eq!(result(&r), json!([FILES, "EDQUOT"]), "{r:?}");
    assert_eq!(r.usage.limits_hit, ["data_files"]);
    assert_eq!(std::fs::read_dir(user_dir(&sandbox, "mallory")).unwrap().count() as u64, FILES);
    // Directories count too.
    let r = py(&sandbox, "mallory", "tiny", "try:\n    os.mkdir('/data/d')\nexcept OSError as e:\n    result = err(e)")
        .await;
    assert_eq!(result(&r), "EDQUOT");
}

#[tokio::test]
async fn a_sparse_write_at_100_gib_and_a_set_size_to_100_gib_are_refused() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
out = []
with open('/data/sparse', 'wb', buffering=0) as f:
    f.seek(100 << 30)
    try:
        f.write(b'x')
        out.append('written')
    except OSError as e:
        out.append(err(e))
    try:
        f.truncate(100 << 30)
        out.append('truncated')
    except OSError as e:
        out.append(err(e))
try:
    os.truncate('/data/sparse', 100 << 30)
    out.append('truncated')
except OSError as e:
    out.append(err(e))
fd = os.open('/data/sparse', os.O_WRONLY)
try:
    os.pwrite(fd, b'x', 100 << 30)
    out.append('written')
except OSError as e:
    out.append(err(e))
os.close(fd)
out.append(os.path.getsize('/data/sparse'))
# Within the quota, growing a file by set-size is fine.
os.truncate('/data/sparse', 1 << 20)
out.append(os.path.getsize('/data/sparse'))
result = out";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    assert_eq!(result(&r), json!(["EDQUOT", "EDQUOT", "EDQUOT", "EDQUOT", 0, MIB]), "{r:?}");
    assert_eq!(r.usage.limits_hit, ["data_quota"]);
    assert_within_quota(&sandbox, "mallory");
}

/// A stream that keeps writing after another handle cut its file short must
/// pay for the hole it leaves, not only for its own bytes.
#[tokio::test]
async fn writing_on_after_a_truncate_pays_for_the_hole() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
def write_all(f, b):
    b = memoryview(b)
    while b:
        b = b[f.write(b):]
f = open('/data/s', 'wb', buffering=0)
write_all(f, bytes(6 << 20))
os.truncate('/data/s', 0)
try:
    write_all(f, bytes(4 << 20))
    out = 'written'
except OSError as e:
    out = err(e)
f.close()
result = [out, os.path.getsize('/data/s')]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    // Unpaid for, the hole would have let the file reach 10 MiB; paid for,
    // the writes stop when the file, hole and all, fills the quota.
    let out = result(&r);
    assert_eq!(out[0], "EIO", "{r:?}");
    assert!(out[1].as_u64().unwrap() <= QUOTA, "{out}");
    assert_eq!(r.usage.limits_hit, ["data_quota"]);
    assert_within_quota(&sandbox, "mallory");
}

/// Renaming a file onto itself, or onto another link of it, frees nothing:
/// it must not give room back (else a loop of renames grows the quota).
#[tokio::test]
async fn renaming_a_file_onto_itself_gives_no_room_back() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
fill('/data/x', 1 << 20, 1 << 20)
for _ in range(20):
    os.rename('/data/x', '/data/x')
os.link('/data/x', '/data/y')
for _ in range(20):
    os.rename('/data/x', '/data/y')
os.rename('/data/y', '/data/z')
result = sorted(os.listdir('/data'))";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    let names = result(&r);
    let alice = UserId::new("mallory").unwrap();
    let (bytes, files) = sandbox.data_dir.ledger(&alice).await.unwrap().used();
    assert_eq!(bytes, MIB, "{names}: the renames gave room back");
    assert!(files >= 2, "{names}: {files} entries");
}

#[tokio::test]
async fn two_concurrent_calls_of_one_user_split_the_quota_between_them() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let writer = |name: &'static str| {
        let code = format!("result = fill('/data/{name}', 64 << 10, 64 << 20)");
        let sandbox = &sandbox;
        async move { py(sandbox, "mallory", "tiny", &code).await }
    };
    let (a, b) = tokio::join!(writer("a"), writer("b"));
    for r in [&a, &b] {
        assert!(["EIO", "EDQUOT"].contains(&result(r).as_str().unwrap()), "{r:?}");
        assert_eq!(r.usage.limits_hit, ["data_quota"]);
    }
    let (apparent, _) = on_disk(&user_dir(&sandbox, "mallory"));
    assert!(apparent <= QUOTA && apparent > QUOTA - 2 * 64 * 1024, "together they hold {apparent} bytes");
    let written = a.usage.bytes_written.unwrap() + b.usage.bytes_written.unwrap();
    assert_eq!(written, apparent, "bytes_written of the two calls");
    // Another user's quota is their own.
    let r = py(&sandbox, "bob", "tiny", "result = fill('/data/x', 1 << 20, 4 << 20)").await;
    assert_eq!(result(&r), Value::Null);
}

#[tokio::test]
async fn a_tool_may_write_exactly_up_to_the_quota() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = format!("result = [fill('/data/exact', 64 << 10, {QUOTA}), fill('/data/exact', 1, 1)]");
    let r = py(&sandbox, "alice", "tiny", &code).await;
    assert_eq!(result(&r), json!([null, "EDQUOT"]), "{r:?}");
    assert_eq!(std::fs::metadata(user_dir(&sandbox, "alice").join("exact")).unwrap().len(), QUOTA);
    // Truncating on open gives the room back: the file can be written whole again.
    let code = format!("open('/data/exact', 'wb').close()\nresult = fill('/data/exact', 1 << 20, {QUOTA})");
    let r = py(&sandbox, "alice", "tiny", &code).await;
    assert_eq!(result(&r), Value::Null, "{r:?}");
    assert_eq!(sandbox.data_dir.usage(&UserId::new("alice").unwrap()).await, Some(QUOTA));
}

#[tokio::test]
async fn tmp_is_capped_per_call_with_enospc_and_data_is_untouched() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "result = [fill('/tmp/big', 1 << 20, 64 << 20), os.path.getsize('/tmp/big'), \
                fill('/data/after', 1 << 20, 1 << 20)]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    let out = result(&r);
    assert_eq!((&out[0], &out[2]), (&json!("EIO"), &Value::Null), "{r:?}");
    assert!(out[1].as_u64().unwrap() <= TMP, "{out}");
    assert_eq!(r.usage.limits_hit, ["tmp"]);
    // A new call has all of its /tmp again.
    let code = "result = [fill('/tmp/big', 1 << 20, 4 << 20), fill('/tmp/big', 1, 1)]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    assert_eq!(result(&r), json!([null, "ENOSPC"]));
    // Files cannot change budgets by moving between /tmp and /data.
    let r = py(
        &sandbox,
        "mallory",
        "tiny",
        "fill('/tmp/t', 1, 1)\ntry:\n    os.rename('/tmp/t', '/data/t')\nexcept OSError as e:\n    result = err(e)",
    )
    .await;
    assert_eq!(result(&r), "EXDEV");
}

#[tokio::test]
async fn a_rust_guest_gets_the_same_refusals() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let probe = common::load(&sandbox, "probe").await;
    let fill = |chunk: u64| {
        let input = json!({"op": "fill", "path": "/data/big", "chunk": chunk, "total": 64 * MIB});
        common::call("mallory", "tiny", input)
    };
    let r = common::run(&sandbox, &probe, &fill(MIB)).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let out = r.output.unwrap();
    assert!(out["error"].as_str().unwrap().contains("os error"), "{out}");
    assert!(out["written"].as_u64().unwrap() <= QUOTA, "{out}");
    assert_eq!(r.usage.limits_hit, ["data_quota"]);
    assert_within_quota(&sandbox, "mallory");
    // Full: the next write is refused at once, with the quota's own error.
    let r = common::run(&sandbox, &probe, &fill(1)).await;
    let out = r.output.unwrap();
    assert!(out["error"].as_str().unwrap().to_lowercase().contains("quota"), "{out}");
    assert_eq!(out["written"], 0);
    assert_within_quota(&sandbox, "mallory");
}

#[tokio::test]
async fn opening_files_in_a_loop_stops_at_the_tier_nofile_limit() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let code = "
open('/data/a.txt', 'w').close()
fds = []
try:
    while len(fds) < 100000:
        fds.append(os.open('/data/a.txt', os.O_RDONLY))
except OSError as e:
    result = [len(fds), err(e)]";
    let r = py(&sandbox, "mallory", "tiny", code).await;
    assert_eq!(result(&r), json!([NOFILE, "ENOMEM"]), "{r:?}");
    assert_eq!(r.usage.limits_hit, ["nofile"]);
    // Closed files give their place back within the call.
    let code = "
for i in range(3 * NOFILE):
    os.close(os.open('/data/a.txt', os.O_RDONLY))
result = 'ok'";
    let r = py(&sandbox, "mallory", "tiny", &format!("NOFILE = {NOFILE}\n{code}")).await;
    assert_eq!(result(&r), "ok", "{r:?}");
    assert!(r.usage.limits_hit.is_empty());
}

#[tokio::test]
async fn all_calls_together_hold_no_more_descriptors_than_the_pool_and_give_them_back() {
    // An engine of its own, with a pool of 100 descriptors for all guests.
    let pool = DescriptorPool::new(100);
    let mut config = EngineConfig::new(common::artifact_cache(), 1 << 30);
    config.max_instances = 64;
    config.guest_descriptors = Arc::clone(&pool);
    let engine = Engine::new(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox { policy: tiny_policy(), engine, data_dir: DataDir::open(dir.path()).unwrap() };
    let bytes = std::fs::read(common::interpreters::built_dir().join("python.wasm")).unwrap();
    let python = sandbox.load(&bytes, "python").await.unwrap();
    let hog = "import os, errno, time\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/tmp', os.O_RDONLY))\nexcept OSError:\n    pass\ntime.sleep(0.3)\nresult = len(fds)";
    let run = |user: &str, code: &str| {
        let call = common::call(user, "tiny", json!({"code": code}));
        let (sandbox, python) = (&sandbox, &python);
        async move { sandbox.run(Ok(python), &call).await }
    };
    let (a, b, c, d, other) =
        tokio::join!(run("m1", hog), run("m2", hog), run("m3", hog), run("m4", hog), run("bob", "result = 6 * 7"));
    let held: Vec<u64> = [&a, &b, &c, &d].iter().map(|r| result(r).as_u64().unwrap()).collect();
    assert!(held.iter().all(|&n| n <= NOFILE), "{held:?}");
    assert!(held.iter().sum::<u64>() <= 100, "the calls held {held:?} of a pool of 100");
    assert_eq!(result(&other), 42, "another user's call");
    assert_eq!(pool.in_use(), 0, "descriptors were not given back");
}

/// A WASI preview 1 module, as TinyGo, Zig or wasi-sdk emit, that opens
/// `name` (created) in the preopen whose path is `area`, writes `chunks` writes
/// of 64 KiB to it (or, with `open_loop`, opens it again and again), stops at
/// the first error, and prints `{"errno":E,"count":N}` (E = 0 when nothing was
/// refused). Preview 1's errno numbers: 19 EDQUOT, 48 ENOMEM, 51 ENOSPC.
fn p1_filler(area: &str, chunks: u32, open_loop: bool) -> String {
    let (area_len, open_loop) = (area.len(), i32::from(open_loop));
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 3)
  (data (i32.const 512) "big")
  (data (i32.const 600) "{{\"errno\":,\"count\":}}")
  ;; The preopen whose name is {area_len} bytes long.
  (func $dir (result i32)
    (local $fd i32)
    (local.set $fd (i32.const 3))
    (loop $next
      (if (i32.eqz (call $prestat (local.get $fd) (i32.const 256)))
        (then (if (i32.eq (i32.load (i32.const 260)) (i32.const {area_len})) (then (return (local.get $fd))))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $fd) (i32.const 16))))
    (unreachable))
  (func $open_big (param $dir i32) (param $oflags i32) (result i32)
    (call $open (local.get $dir) (i32.const 0) (i32.const 512) (i32.const 3) (local.get $oflags)
      (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 300)))
  ;; Writes $v in decimal at $at; answers where it ended.
  (func $num (param $v i32) (param $at i32) (result i32)
    (local $div i32)
    (local.set $div (i32.const 1))
    (block $big (loop $grow
      (br_if $big (i32.lt_u (i32.div_u (local.get $v) (local.get $div)) (i32.const 10)))
      (local.set $div (i32.mul (local.get $div) (i32.const 10)))
      (br $grow)))
    (loop $digit
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (i32.div_u (local.get $v) (local.get $div)) (i32.const 10))))
      (local.set $at (i32.add (local.get $at) (i32.const 1)))
      (local.set $div (i32.div_u (local.get $div) (i32.const 10)))
      (br_if $digit (local.get $div)))
    (local.get $at))
  (func (export "_start")
    (local $dir i32) (local $fd i32) (local $err i32) (local $n i32) (local $at i32)
    (local.set $dir (call $dir))
    (local.set $err (call $open_big (local.get $dir) (i32.const 1)))
    (if (local.get $err) (then (call $exit (i32.const 99))))
    (local.set $fd (i32.load (i32.const 300)))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (block $stop (loop $more
      (br_if $stop (i32.ge_u (local.get $n) (i32.const {chunks})))
      (if (i32.const {open_loop})
        (then (local.set $err (call $open_big (local.get $dir) (i32.const 0))))
        (else (local.set $err (call $write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))))
      (br_if $stop (local.get $err))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $more)))
    ;; {{"errno":E,"count":N}}
    (memory.copy (i32.const 1024) (i32.const 600) (i32.const 9))
    (local.set $at (call $num (local.get $err) (i32.const 1033)))
    (memory.copy (local.get $at) (i32.const 609) (i32.const 9))
    (local.set $at (call $num (local.get $n) (i32.add (local.get $at) (i32.const 9))))
    (i32.store8 (local.get $at) (i32.const 125))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.sub (i32.add (local.get $at) (i32.const 1)) (i32.const 1024)))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#
    )
}

/// Preview 1 modules (TinyGo, Zig, C) once wrote past every cap: wasmtime's
/// preview 1 host writes to files directly. Run through the adapter, they are
/// held like components, at each write and each open.
#[tokio::test]
async fn a_wasi_preview1_module_is_held_to_the_same_limits() {
    let (sandbox, _dir) = common::sandbox_with(tiny_policy());
    let run = async |area: &str, chunks: u32, open_loop: bool| {
        let tool = sandbox.load(p1_filler(area, chunks, open_loop).as_bytes(), "filler").await.unwrap();
        assert_eq!(tool.kind(), imagentx_sandbox::engine::ToolKind::WasiP1Module);
        let r = common::run(&sandbox, &tool, &common::call("mallory", "tiny", json!(null))).await;
        assert_eq!(r.status, Status::Ok, "{r:?}");
        (r.output.clone().unwrap(), r)
    };
    // Under the quota: 16 writes of 64 KiB, all there, all counted.
    let (out, r) = run("/data", 16, false).await;
    assert_eq!(out, json!({"errno": 0, "count": 16}), "{r:?}");
    assert_eq!(r.usage.bytes_written, Some(MIB));
    assert!(r.usage.limits_hit.is_empty(), "{:?}", r.usage.limits_hit);
    // 64 MiB against an 8 MiB quota: refused at the quota with EDQUOT, and the
    // module goes on to print its answer.
    let (out, r) = run("/data", 1024, false).await;
    assert_eq!(out["errno"], 19, "{r:?}");
    assert!(out["count"].as_u64().unwrap() <= 128, "{out}");
    assert_eq!(r.usage.limits_hit, ["data_quota"]);
    assert_within_quota(&sandbox, "mallory");
    // /tmp: ENOSPC at the tier's size, /data untouched by it.
    let (out, r) = run("/tmp", 1024, false).await;
    assert_eq!(out["errno"], 51, "{r:?}");
    assert!(out["count"].as_u64().unwrap() * 64 * 1024 <= TMP, "{out}");
    assert_eq!(r.usage.limits_hit, ["tmp"]);
    // Opening in a loop stops at the tier's descriptors (ENOMEM: WASI 0.2 has
    // no EMFILE), and they are all given back.
    let (out, r) = run("/tmp", 100_000, true).await;
    assert_eq!(out["errno"], 48, "{r:?}");
    assert!(out["count"].as_u64().unwrap() < NOFILE, "{out}");
    assert_eq!(r.usage.limits_hit, ["nofile"]);
    assert_eq!(sandbox.engine.guest_descriptors().in_use(), 0);
    assert_within_quota(&sandbox, "mallory");
}

/// A server with the built-in interpreters and the tiny tier.
async fn server() -> server::TestServer {
    let dir = common::interpreters::built_dir();
    server::TestServer::start_with(tiny_policy(), |s| {
        s.interpreters_dir = dir;
        s.artifact_cache_dir = Some(common::artifact_cache());
    })
    .await
}

async fn invoke_python(srv: &server::TestServer, key: &str, code: &str) -> Value {
    let body = json!({"input": {"code": format!("{PRELUDE}\n{code}")}}).to_string();
    let answer = srv.request(Method::POST, "/v1/tools/python/invoke", Some(key), body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    answer.json()
}

#[tokio::test]
async fn the_files_api_and_a_tool_share_one_quota() {
    let srv = server().await;
    let key = srv.add_user("carol", "tiny", false).await;
    let put = |bytes: u64| srv.request(Method::PUT, "/v1/files/put.bin", Some(&key), vec![b'x'; bytes as usize]);
    // A tool fills all but a megabyte; a PUT of two is refused, one fits.
    let report = invoke_python(&srv, &key, &format!("result = fill('/data/tool', 1 << 20, {})", QUOTA - MIB)).await;
    assert_eq!(report["output"]["result"], Value::Null, "{report}");
    let refused = put(2 * MIB).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(refused.error_code(), "quota_exceeded");
    assert_eq!(put(MIB).await.status, StatusCode::OK);
    let me = srv.request(Method::GET, "/v1/me", Some(&key), "").await.json();
    assert_eq!((me["data_used_bytes"].as_u64(), me["data_used_files"].as_u64()), (Some(QUOTA), Some(2)), "{me}");
    // Full: the tool's next write is refused.
    let report = invoke_python(&srv, &key, "result = fill('/data/more', 1, 1)").await;
    assert_eq!(report["output"]["result"], "EDQUOT", "{report}");
    assert_eq!(report["usage"]["limits_hit"], json!(["data_quota"]));
    // A tool and three PUTs racing for the room a delete made cannot pass the quota together.
    let delete = srv.request(Method::DELETE, "/v1/files/tool", Some(&key), "").await;
    assert_eq!(delete.status, StatusCode::OK);
    let (report, p1, p2, p3) = tokio::join!(
        invoke_python(&srv, &key, "result = fill('/data/race', 64 << 10, 64 << 20)"),
        put(3 * MIB),
        put(3 * MIB),
        put(3 * MIB)
    );
    assert_eq!(report["status"], "ok", "{report}");
    assert!([&p1, &p2, &p3].iter().all(|p| [StatusCode::OK, StatusCode::PAYLOAD_TOO_LARGE].contains(&p.status)));
    let (apparent, _) = on_disk(&srv.dir.path().join("users/carol"));
    assert!(apparent <= QUOTA, "the PUTs and the tool together left {apparent} bytes");
}

/// A server with the built-in interpreters and all calls' memory held to `budget`.
async fn memory_server(budget: u64) -> server::TestServer {
    let dir = common::interpreters::built_dir();
    server::TestServer::start_with(Policy::default(), |s| {
        s.interpreters_dir = dir;
        s.artifact_cache_dir = Some(common::artifact_cache());
        s.memory_budget_bytes = Some(budget);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hungry_calls_of_several_premium_users_cannot_pass_the_host_budget() {
    const BUDGET: u64 = 1 << 30;
    let srv = memory_server(BUDGET).await;
    let keys = [srv.add_user("p1", "premium", false).await, srv.add_user("p2", "premium", false).await];
    // Each call takes 300 MB (its tier allows 1 GiB) and holds it a while.
    let hog = json!({"input": {"code": "import time\nx = bytearray(300 << 20)\ntime.sleep(0.4)\nresult = len(x)"}})
        .to_string();
    let calls = (0..8).map(|i| srv.request(Method::POST, "/v1/tools/python/invoke", Some(&keys[i % 2]), hog.clone()));
    let answers = futures::future::join_all(calls).await;
    let (mut ok, mut turned_away, mut stopped) = (0, 0, 0);
    for answer in &answers {
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(["server_busy", "user_memory"].contains(&answer.error_code().as_str()), "{answer:?}");
            assert!(answer.headers.contains_key("retry-after"));
            turned_away += 1;
            continue;
        }
        let report = answer.json();
        match report["status"].as_str().unwrap() {
            "ok" => ok += 1,
            "memory_limit" => {
                let hit = &report["usage"]["limits_hit"];
                assert!(hit == &json!(["host_memory"]) || hit == &json!(["user_memory"]), "{report}");
                stopped += 1;
            }
            other => panic!("{other}: {report}"),
        }
    }
    assert!(ok >= 2 && turned_away + stopped >= 1, "{ok} ran, {turned_away} turned away, {stopped} stopped");
    let pool = srv.state.sandbox.engine.guest_memory();
    assert!(pool.peak_bytes() <= BUDGET, "the calls held {} bytes at once", pool.peak_bytes());
    assert_eq!(pool.in_use_bytes(), 0, "memory was not given back");
    let metrics = String::from_utf8(srv.request(Method::GET, "/metrics", None, "").await.body.to_vec()).unwrap();
    assert!(metrics.contains(&format!("imagentx_guest_memory_budget_bytes {BUDGET}")), "{metrics}");
    // The series exist from the start (at zero): counted is above it.
    let counted = |series: &str| {
        metrics
            .lines()
            .any(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| v > 0.0))
    };
    let any = |family: &str, label: &str, values: [&str; 2]| {
        values.iter().any(|v| counted(&format!("{family}{{{label}=\"{v}\"}}")))
    };
    let memory_limits = ["host_memory", "user_memory"];
    assert!(stopped == 0 || any("imagentx_limits_hit_total", "limit", memory_limits), "{metrics}");
    let reasons = ["server_busy", "user_memory"];
    assert!(turned_away == 0 || any("imagentx_admission_rejections_total", "reason", reasons), "{metrics}");
    // Once they are done, everyone's calls run again.
    let bob = srv.add_user("bob", "standard", false).await;
    let body = json!({"input": {"code": "result = 6 * 7"}}).to_string();
    let answer = srv.request(Method::POST, "/v1/tools/python/invoke", Some(&bob), body).await;
    assert_eq!(answer.json()["output"]["result"], 42);
}

/// The attack the soak found: premium users' calls at full concurrency, each
/// holding a few hundred megabytes, used to fill the whole budget, and then
/// every other user's calls were turned away (429 `server_busy`). Now each
/// user holds at most their share, heavy users together stop short of the
/// reserve, and a light user's calls keep being served all along.
#[tokio::test(flavor = "multi_thread")]
async fn premium_users_holding_memory_cannot_starve_another_users_calls() {
    const BUDGET: u64 = 2 << 30;
    let srv = memory_server(BUDGET).await;
    let pool = Arc::clone(srv.state.sandbox.engine.guest_memory());
    assert_eq!(pool.user_max_bytes(), BUDGET / 2);
    let hogs = [srv.add_user("hog1", "premium", false).await, srv.add_user("hog2", "premium", false).await];
    let bob = srv.add_user("bob", "standard", false).await;
    // Each call takes 300 MB (its tier allows 1 GiB) and holds it for 3 s;
    // each hog sends 10, half of what premium allows in flight.
    let hog =
        json!({"input": {"code": "import time\nx = bytearray(300 << 20)\ntime.sleep(3)\nresult = len(x)"}}).to_string();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let (pool, watching) = (Arc::clone(&pool), Arc::clone(&watching));
        std::thread::spawn(move || {
            let mut most = [0, 0, 0];
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                most[0] = most[0].max(pool.held_by("hog1"));
                most[1] = most[1].max(pool.held_by("hog2"));
                most[2] = most[2].max(pool.in_use_bytes());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            most
        })
    };
    let calls = (0..20).map(|i| srv.request(Method::POST, "/v1/tools/python/invoke", Some(&hogs[i % 2]), hog.clone()));
    let bobs = async {
        // Once the hogs hold their memory, bob's small calls, one after another.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let body = json!({"input": {"code": "result = sum(range(1000))"}}).to_string();
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(srv.request(Method::POST, "/v1/tools/python/invoke", Some(&bob), body.clone()).await);
        }
        answers
    };
    let (answers, bobs) = tokio::join!(futures::future::join_all(calls), bobs);
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let [most_hog1, most_hog2, most_in_use] = watch.join().unwrap();
    for answer in &bobs {
        assert_eq!(answer.status, StatusCode::OK, "bob was turned away: {answer:?}");
        assert_eq!(answer.json()["output"]["result"], 499_500, "{}", answer.json());
    }
    let (mut ok, mut share) = (0, 0);
    for answer in &answers {
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            let code = answer.error_code();
            assert!(["user_memory", "server_busy"].contains(&code.as_str()), "{answer:?}");
            share += usize::from(code == "user_memory");
            continue;
        }
        let report = answer.json();
        match report["status"].as_str().unwrap() {
            "ok" => ok += 1,
            "memory_limit" => {
                let hit = &report["usage"]["limits_hit"];
                assert!(hit == &json!(["user_memory"]) || hit == &json!(["host_memory"]), "{report}");
                share += usize::from(hit == &json!(["user_memory"]));
            }
            other => panic!("{other}: {report}"),
        }
    }
    assert!(ok >= 2 && share >= 1, "{ok} ran, {share} stopped at the user's share");
    for most in [most_hog1, most_hog2] {
        assert!(most <= pool.user_max_bytes(), "one user held {most} bytes, over the share {}", pool.user_max_bytes());
    }
    assert!(most_in_use <= BUDGET, "the calls held {most_in_use} bytes at once");
    assert_eq!(pool.in_use_bytes(), 0, "memory was not given back");
    let metrics = String::from_utf8(srv.request(Method::GET, "/metrics", None, "").await.body.to_vec()).unwrap();
    let counted = |series: &str| {
        metrics
            .lines()
            .any(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| v > 0.0))
    };
    assert!(
        counted("imagentx_limits_hit_total{limit=\"user_memory\"}")
            || counted("imagentx_admission_rejections_total{reason=\"user_memory\"}"),
        "{metrics}"
    );
}

/// The attack of SECURITY.md, "Descriptors": calls that open files in a loop
/// as many at once as two premium users may run, over HTTP, while another
/// user's calls keep being answered, and the server keeps its reserve.
#[tokio::test(flavor = "multi_thread")]
async fn descriptor_hogs_at_full_concurrency_leave_the_server_its_reserve() {
    let srv = server().await;
    let hogs = [srv.add_user("h1", "premium", false).await, srv.add_user("h2", "premium", false).await];
    let bob = srv.add_user("bob", "standard", false).await;
    let hog = json!({"input": {"code": "import os, time\nopen('/data/a', 'w').close()\nfds = []\ntry:\n    \
                while True:\n        fds.append(os.open('/data/a', os.O_RDONLY))\nexcept OSError:\n    pass\n\
                time.sleep(0.5)\nresult = len(fds)"}})
    .to_string();
    let calls = (0..20).map(|i| srv.request(Method::POST, "/v1/tools/python/invoke", Some(&hogs[i % 2]), hog.clone()));
    let bystander = async {
        let body = json!({"input": {"code": "result = 6 * 7"}}).to_string();
        let mut answers = Vec::new();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for _ in 0..10 {
            let answer = srv.request(Method::POST, "/v1/tools/python/invoke", Some(&bob), body.clone()).await;
            answers.push((answer.status, answer.json()["output"]["result"].clone()));
        }
        answers
    };
    let (hogged, answers) = tokio::join!(futures::future::join_all(calls), bystander);
    assert!(answers.iter().all(|a| *a == (StatusCode::OK, json!(42))), "{answers:?}");
    let pool = srv.state.sandbox.engine.guest_descriptors();
    let held: Vec<u64> = hogged
        .iter()
        .map(|a| {
            let report = a.json();
            assert_eq!(report["usage"]["limits_hit"], json!(["nofile"]), "{report}");
            report["output"]["result"].as_u64().unwrap()
        })
        .collect();
    // A call holds at most the soft limit, a user's calls together the hard one.
    assert!(held.iter().all(|&n| n <= 1024), "{held:?}");
    let per_user = |u: usize| held.iter().skip(u).step_by(2).sum::<u64>();
    assert!(per_user(0) <= 2048 && per_user(1) <= 2048, "{held:?}");
    assert!(held.iter().sum::<u64>() <= pool.max(), "{held:?} of {}", pool.max());
    assert_eq!(pool.in_use(), 0, "descriptors were not given back");
}
