//! Disk budgets: what a user's `/data` and a call's `/tmp` may hold, charged
//! at every write rather than checked between calls.
//!
//! A [`Ledger`] keeps running totals for one directory: apparent bytes in
//! regular files (a sparse file counts at its length, so that a file that is
//! cheap on this disk cannot become a disk-filling one when copied) and
//! entries (files, directories, symlinks: a million empty files is a disk
//! attack too). One ledger per user is shared by everything that writes that
//! user's directory at once: each of their WASM calls in flight and the
//! files API. A [`Budget`] is a ledger seen with the caps of one tier.
//!
//! Charges are made *before* the write they pay for, with one atomic
//! compare-and-swap, so two writers racing for the last bytes cannot both get
//! them: the total never passes the cap. A writer that charged and then failed
//! to write gives the charge back; where it cannot tell (a background stream
//! write), it keeps it, erring on the side of the cap. The directory is
//! walked again when nothing writes through the ledger (after a native call,
//! which writes past it, and after a call ran into its quota) to drop
//! what such over-counting left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Running totals for one directory tree.
#[derive(Debug, Default)]
pub struct Ledger {
    bytes: AtomicU64,
    entries: AtomicU64,
    /// Writers charging this ledger right now (see [`Ledger::writer`]).
    writers: AtomicU32,
    /// Bumped by every charge and refund: a walk that saw it move while it
    /// ran cannot tell which writes it counted, and keeps the ledger's figure.
    changes: AtomicU64,
    /// Held while a name is removed or replaced (unlink, rename, the files
    /// API's write and delete): between reading what the name holds and
    /// removing it, no other writer may swap it through this ledger, or the
    /// refund would be for a file that was not freed.
    names: tokio::sync::Mutex<()>,
    /// Bumped whenever a file under this ledger is made shorter in place
    /// (truncated, `set-size` down): an open stream that knows its file's
    /// size reads it again (see `engine::fs`).
    shrinks: AtomicU64,
}

/// Which cap a write would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Bytes { used: u64, requested: u64, max: u64 },
    Entries { used: u64, max: u64 },
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Bytes { used, requested, max } => {
                write!(f, "{requested} more bytes would pass the cap of {max} bytes ({used} in use)")
            }
            Exceeded::Entries { used, max } => {
                write!(f, "one more file would pass the cap of {max} files and directories ({used} in use)")
            }
        }
    }
}

impl Ledger {
    /// A ledger for a directory that holds `bytes` in `entries` files and directories.
    pub fn new(bytes: u64, entries: u64) -> Arc<Self> {
        Arc::new(Self { bytes: AtomicU64::new(bytes), entries: AtomicU64::new(entries), ..Self::default() })
    }

    /// Bytes and entries as charged now.
    pub fn used(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::Acquire), self.entries.load(Ordering::Acquire))
    }

    /// Marks one writer as charging this ledger until the guard is dropped:
    /// a walk of the directory does not replace the totals meanwhile.
    pub fn writer(self: &Arc<Self>) -> WriterGuard {
        self.writers.fetch_add(1, Ordering::AcqRel);
        WriterGuard(Arc::clone(self))
    }

    /// A figure measured by walking the directory, taken only when nothing
    /// charged or refunded since `changes_before` and nothing writes now.
    /// Answers whether it was taken.
    pub fn replace_if_quiet(&self, changes_before: u64, bytes: u64, entries: u64) -> bool {
        if self.writers.load(Ordering::Acquire) != 0 || self.changes.load(Ordering::Acquire) != changes_before {
            return false;
        }
        self.bytes.store(bytes, Ordering::Release);
        self.entries.store(entries, Ordering::Release);
        true
    }

    /// The lock to hold while reading what a name holds and then removing or
    /// replacing it (see the field).
    pub fn names(&self) -> &tokio::sync::Mutex<()> {
        &self.names
    }

    /// How many times a file under this ledger was made shorter in place.
    pub fn shrinks(&self) -> u64 {
        self.shrinks.load(Ordering::Acquire)
    }

    /// Records that a file was made shorter in place.
    pub fn note_shrink(&self) {
        self.shrinks.fetch_add(1, Ordering::AcqRel);
    }

    /// The change counter, to pass to [`Ledger::replace_if_quiet`] after a walk.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Adds up to `wanted` to `counter` without passing `max`; answers what was added.
    fn take(&self, counter: &AtomicU64, wanted: u64, max: u64, partial: bool) -> Result<u64, u64> {
        let mut used = counter.load(Ordering::Acquire);
        loop {
            let room = max.saturating_sub(used);
            let granted = if wanted <= room {
                wanted
            } else if partial && room > 0 {
                room
            } else {
                return Err(used);
            };
            match counter.compare_exchange_weak(used, used + granted, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if granted > 0 {
                        self.changes.fetch_add(1, Ordering::AcqRel);
                    }
                    return Ok(granted);
                }
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, counter: &AtomicU64, amount: u64) {
        if amount == 0 {
            return;
        }
        // Saturating: a refund for bytes the walk never counted must not wrap.
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(amount)));
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

/// Keeps a ledger's totals from being replaced by a walk while it lives.
#[derive(Debug)]
pub struct WriterGuard(Arc<Ledger>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A ledger with the caps that apply to one writer.
#[derive(Debug, Clone)]
pub struct Budget {
    ledger: Arc<Ledger>,
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Budget {
    pub fn new(ledger: Arc<Ledger>, max_bytes: u64, max_entries: u64) -> Self {
        Self { ledger, max_bytes, max_entries }
    }

    /// A fresh, empty ledger under these caps: a call's own `/tmp`.
    pub fn empty(max_bytes: u64, max_entries: u64) -> Self {
        Self::new(Ledger::new(0, 0), max_bytes, max_entries)
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Bytes that may still be charged.
    pub fn room(&self) -> u64 {
        self.max_bytes.saturating_sub(self.ledger.used().0)
    }

    /// Charges `bytes` of growth, all or nothing.
    ///
    /// # Errors
    ///
    /// [`Exceeded::Bytes`] when they would pass the cap; nothing is charged.
    pub fn grow(&self, bytes: u64) -> Result<(), Exceeded> {
        self.ledger.take(&self.ledger.bytes, bytes, self.max_bytes, false).map(drop).map_err(|used| Exceeded::Bytes {
            used,
            requested: bytes,
            max: self.max_bytes,
        })
    }

    /// Charges as much of `bytes` as fits; answers how much (0 when nothing does).
    pub fn grow_up_to(&self, bytes: u64) -> u64 {
        self.ledger.take(&self.ledger.bytes, bytes, self.max_bytes, true).unwrap_or(0)
    }

    /// Gives back `bytes`: a file shrank or went away, or a charged write failed.
    pub fn shrink(&self, bytes: u64) {
        self.ledger.give_back(&self.ledger.bytes, bytes);
    }

    /// Charges one new file, directory or link.
    ///
    /// # Errors
    ///
    /// [`Exceeded::Entries`] when it would pass the cap.
    pub fn add_entry(&self) -> Result<(), Exceeded> {
        self.ledger
            .take(&self.ledger.entries, 1, self.max_entries, false)
            .map(drop)
            .map_err(|used| Exceeded::Entries { used, max: self.max_entries })
    }

    pub fn remove_entry(&self) {
        self.ledger.give_back(&self.ledger.entries, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_stops_at_the_cap_and_a_partial_grant_fills_it_exactly() {
        let budget = Budget::new(Ledger::new(90, 1), 100, 2);
        assert_eq!(budget.grow(11), Err(Exceeded::Bytes { used: 90, requested: 11, max: 100 }));
        assert_eq!(budget.grow_up_to(25), 10);
        assert_eq!(budget.grow_up_to(1), 0);
        assert_eq!(budget.ledger().used(), (100, 1));
        budget.shrink(30);
        assert!(budget.grow(30).is_ok());
        assert!(budget.add_entry().is_ok());
        assert_eq!(budget.add_entry(), Err(Exceeded::Entries { used: 2, max: 2 }));
        budget.remove_entry();
        assert!(budget.add_entry().is_ok());
    }

    #[test]
    fn racing_writers_never_pass_the_cap_together() {
        let budget = Budget::new(Ledger::new(0, 0), 1_000_000, 0);
        let granted: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100_000).map(|_| if budget.grow(7).is_ok() { 7 } else { 0 }).sum::<u64>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, budget.ledger().used().0);
        assert!(granted <= 1_000_000 && granted > 1_000_000 - 7, "{granted}");
    }

    #[test]
    fn a_walk_replaces_the_totals_only_when_nothing_wrote_meanwhile() {
        let ledger = Ledger::new(500, 5);
        let budget = Budget::new(Arc::clone(&ledger), 1000, 10);
        let before = ledger.changes();
        budget.grow(1).unwrap();
        assert!(!ledger.replace_if_quiet(before, 7, 1), "a charge during the walk was lost");
        let before = ledger.changes();
        let writer = ledger.writer();
        assert!(!ledger.replace_if_quiet(before, 7, 1), "a writer in flight was overwritten");
        drop(writer);
        assert!(ledger.replace_if_quiet(before, 7, 1));
        assert_eq!(ledger.used(), (7, 1));
        budget.shrink(100);
        assert_eq!(ledger.used(), (0, 1), "a refund wrapped below zero");
    }
}
