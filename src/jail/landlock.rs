//! Landlock, a second wall behind the mounts where the kernel has it: read
//! and execute everywhere (the mounts already make the system read-only),
//! everything but execute under `/data`, `/tmp`, `/var/tmp` and `/dev/shm`,
//! read and write on devices. Made with raw system calls in the tool before
//! its exec (the `landlock` crate allocates, which the tool may not).

use std::ffi::CStr;

use super::sys::{self, Errno};

/// The file-system rights this kernel's Landlock knows, all handled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rights {
    handled: u64,
}

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const TRUNCATE: u64 = 1 << 14;

/// The rights to handle on this kernel, or `None` without Landlock.
pub(super) fn available() -> Option<Rights> {
    let abi = sys::landlock_abi().ok()?;
    // ABI 1: 13 rights; 2 adds REFER (bit 13); 3 adds TRUNCATE (bit 14).
    let mut handled = (1u64 << 13) - 1;
    if abi >= 2 {
        handled |= 1 << 13;
    }
    if abi >= 3 {
        handled |= TRUNCATE;
    }
    Some(Rights { handled })
}

/// The rules: what may be done beneath each path.
fn rules(rights: Rights) -> [(&'static CStr, u64); 6] {
    let writable = rights.handled & !EXECUTE;
    [
        (c"/", EXECUTE | READ_FILE | READ_DIR),
        (c"/data", writable),
        (c"/tmp", writable),
        (c"/var/tmp", writable),
        (c"/dev/shm", writable),
        (c"/dev", READ_FILE | WRITE_FILE | READ_DIR | TRUNCATE),
    ]
}

/// The same rules, written for a warm jail's program to apply itself once
/// the user's `/data` is attached (a rule made before would name the empty
/// directory underneath, which Landlock never consults again): the handled
/// rights, then `path=rights` pairs, `;`-separated, as decimal numbers.
pub(super) fn deferred(rights: Rights) -> String {
    let mut text = rights.handled.to_string();
    for (path, access) in rules(rights) {
        text.push_str(&format!(";{}={}", path.to_string_lossy(), access & rights.handled));
    }
    text
}

/// Restricts the calling process (paths inside the new root).
pub(super) fn restrict(rights: Rights) -> Result<(), Errno> {
    let ruleset = sys::landlock_create_ruleset(rights.handled)?;
    for (path, access) in rules(rights) {
        let fd = sys::open_path(path)?;
        let added = sys::landlock_allow_beneath(ruleset, fd, access & rights.handled);
        sys::close(fd);
        added?;
    }
    let restricted = sys::landlock_restrict_self(ruleset);
    sys::close(ruleset);
    restricted
}
