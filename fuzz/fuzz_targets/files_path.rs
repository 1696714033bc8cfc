//! The files API's path resolution (`GET|PUT|DELETE /v1/files/{path}`) on
//! arbitrary paths and operations, in a user directory planted with what an
//! attacker would leave there: symlinks out (relative and absolute) and a
//! FIFO. Whatever the path: nothing outside the user's directory is read,
//! written or removed, no open hangs, and the quota holds.

#![no_main]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use imagentx_sandbox::quota::{Budget, Ledger};
use imagentx_sandbox::userfs::{Node, UserFs};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Get(String),
    Put(String, Vec<u8>),
    Delete(String),
}

const QUOTA: u64 = 64 << 10;
const FILES: u64 = 32;

struct Place {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// (device, inode) of every file outside the user's directory.
    secrets: Vec<(u64, u64)>,
    /// The tree outside the user's directory, as it must stay.
    outside: Vec<(PathBuf, u64, Vec<u8>)>,
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a directory");
        let root = dir.path().to_owned();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::create_dir_all(root.join("users/bob")).unwrap();
        std::fs::write(root.join("outside/secret"), b"outside").unwrap();
        std::fs::write(root.join("users/bob/secret"), b"bob's").unwrap();
        let secrets = ["outside/secret", "users/bob/secret"]
            .iter()
            .map(|p| {
                let m = std::fs::metadata(root.join(p)).unwrap();
                (m.dev(), m.ino())
            })
            .collect();
        let outside = snapshot(&root, &root.join("users/alice"));
        Place { _dir: dir, root, secrets, outside }
    })
}

/// Every path under `root` but `skip`, with its size and (for files) content.
fn snapshot(root: &Path, skip: &Path) -> Vec<(PathBuf, u64, Vec<u8>)> {
    let mut all = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path == skip {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_file() { std::fs::read(&path).unwrap() } else { Vec::new() };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            // A directory's own size varies with the filesystem: not compared.
            all.push((path, if meta.is_dir() { 0 } else { meta.len() }, content));
        }
    }
    all
}

/// Alice's directory, fresh, with the attacker's plants.
fn fresh_user_dir(place: &Place) -> PathBuf {
    let alice = place.root.join("users/alice");
    let _ = std::fs::remove_dir_all(&alice);
    std::fs::create_dir_all(alice.join("sub")).unwrap();
    std::fs::write(alice.join("sub/file"), b"alice's").unwrap();
    std::os::unix::fs::symlink("../../outside", alice.join("up")).unwrap();
    std::os::unix::fs::symlink("../bob/secret", alice.join("sub/bob")).unwrap();
    std::os::unix::fs::symlink(place.root.join("outside"), alice.join("abs")).unwrap();
    let fifo = std::process::Command::new("mkfifo").arg(alice.join("fifo")).status().unwrap();
    assert!(fifo.success());
    alice
}

fuzz_target!(|ops: Vec<Op>| {
    let place = place();
    let alice = fresh_user_dir(place);
    let fs = UserFs::open(&alice).expect("alice's directory");
    let (bytes, entries) = fs.usage().expect("usage");
    let budget = Budget::new(Ledger::new(bytes, entries), QUOTA, FILES);
    for op in ops.iter().take(16) {
        match op {
            Op::Get(path) => {
                if let Ok(Node::File { file, .. }) = fs.get(path) {
                    let m = file.metadata().unwrap();
                    assert!(!place.secrets.contains(&(m.dev(), m.ino())), "{path:?} opened a file outside");
                }
            }
            Op::Put(path, content) => {
                let _ = fs.put(path, content, &budget);
            }
            Op::Delete(path) => {
                let _ = fs.delete(path, &budget);
            }
        }
    }
    let (used_bytes, used_entries) = fs.usage().expect("usage");
    assert!(used_bytes <= QUOTA.max(bytes), "{used_bytes} bytes in use, over the quota of {QUOTA}: {ops:?}");
    assert!(used_entries <= FILES.max(entries), "{used_entries} files, over the cap of {FILES}: {ops:?}");
    assert_eq!(snapshot(&place.root, &alice), place.outside, "something outside alice's directory changed: {ops:?}");
});
