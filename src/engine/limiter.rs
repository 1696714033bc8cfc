//! One resource limiter per call, summing every linear memory and table.
//!
//! wasmtime's `StoreLimits` caps each memory on its own, so a component with two
//! memories could take twice its tier. This limiter keeps running totals over
//! the whole instance (all its core instances), refuses any growth that would
//! pass the tier's cap, and records the refusal: the report then says
//! `memory_limit` because a limit was refused, not because an error's text
//! looked like one.
//!
//! Every call's limiter also charges one [`MemoryPool`] for the whole process:
//! each call is held to its tier, and all calls together to the host's budget
//! (SECURITY.md, "Host memory"), so a set of calls that each stay within
//! their tier cannot together push the host into the OOM killer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::ResourceLimiter;

/// Linear memory that all guests may hold at once, and what they hold now.
/// Native runs reserve their tier's memory here too (their cgroup's limit).
#[derive(Debug)]
pub struct MemoryPool {
    budget_bytes: u64,
    in_use: AtomicU64,
    peak: AtomicU64,
}

/// Share of the host's (or the server's cgroup's) memory that guests may use
/// by default: the specification's "memory use under 80 %".
pub const DEFAULT_MEMORY_SHARE: f64 = 0.8;

impl MemoryPool {
    pub fn new(budget_bytes: u64) -> Arc<Self> {
        Arc::new(Self { budget_bytes, in_use: AtomicU64::new(0), peak: AtomicU64::new(0) })
    }

    /// A pool of `share` of this host's memory, or of the server's cgroup
    /// limit when that is lower.
    pub fn for_this_host(share: f64) -> Arc<Self> {
        let total = crate::host::memory_bytes();
        Self::new((total as f64 * share) as u64)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn in_use_bytes(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// The most the guests held at once since the process started.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Charges `bytes` if they fit in the budget.
    pub fn take(&self, bytes: u64) -> bool {
        let taken = self.in_use.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&total| total <= self.budget_bytes)
        });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    pub fn give_back(&self, bytes: u64) {
        let _ = self.in_use.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(bytes)));
    }

    /// Holds `bytes` of the budget until the reservation is dropped (a native
    /// run's cgroup limit), or answers `None` when they do not fit.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<MemoryReservation> {
        self.take(bytes).then(|| MemoryReservation { pool: Arc::clone(self), bytes })
    }
}

/// Memory held in a [`MemoryPool`] until dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    pool: Arc<MemoryPool>,
    bytes: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.pool.give_back(self.bytes);
    }
}

/// Which cap a refused growth would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Memory {
        requested_bytes: u64,
        limit_bytes: u64,
    },
    Table {
        requested_elements: u64,
        limit_elements: u64,
    },
    /// The call was within its tier, but all calls together were at the
    /// host's budget.
    HostMemory {
        requested_bytes: u64,
        budget_bytes: u64,
    },
}

/// Running totals and caps for one store. Dropped with the store, it gives
/// its memory back to the pool.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    memory_limit_bytes: u64,
    table_limit_elements: u64,
    memory_bytes: u64,
    peak_memory_bytes: u64,
    table_elements: u64,
    refusal: Option<Refusal>,
    pool: Arc<MemoryPool>,
}

/// What a limiter saw, read after its call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimiterRecord {
    peak_memory_bytes: u64,
    refusal: Option<Refusal>,
}

impl LimiterRecord {
    /// The largest total of linear memory the instance held at once.
    pub(crate) fn peak_memory_bytes(&self) -> u64 {
        self.peak_memory_bytes
    }

    /// The first growth the limiter refused, if any.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }
}

impl Drop for CallLimiter {
    fn drop(&mut self) {
        self.pool.give_back(self.memory_bytes);
    }
}

/// Instances, memories and tables one call may create. A Rust wasip2 component
/// has 3 core instances, 1 memory and 2 tables; interpreters a few more.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;

impl CallLimiter {
    pub(crate) fn new(memory_limit_bytes: u64, table_limit_elements: u64, pool: Arc<MemoryPool>) -> Self {
        Self {
            memory_limit_bytes,
            table_limit_elements,
            memory_bytes: 0,
            peak_memory_bytes: 0,
            table_elements: 0,
            refusal: None,
            pool,
        }
    }

    /// Starts a new call on a live instance (a session's step): the peak and
    /// the refusal are this call's, the memory held is what the instance has.
    pub(crate) fn start_call(&mut self) {
        self.peak_memory_bytes = self.memory_bytes;
        self.refusal = None;
    }

    /// Linear memory the instance holds now.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    pub(crate) fn record(&self) -> LimiterRecord {
        LimiterRecord { peak_memory_bytes: self.peak_memory_bytes, refusal: self.refusal }
    }

    #[cfg(test)]
    fn peak_memory_bytes(&self) -> u64 {
        self.peak_memory_bytes
    }

    #[cfg(test)]
    fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    fn refuse(&mut self, refusal: Refusal) -> bool {
        tracing::debug!(?refusal, "guest growth refused");
        self.refusal.get_or_insert(refusal);
        false
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current) as u64;
        let total = self.memory_bytes.saturating_add(growth);
        if total > self.memory_limit_bytes {
            return Ok(self.refuse(Refusal::Memory { requested_bytes: total, limit_bytes: self.memory_limit_bytes }));
        }
        if !self.pool.take(growth) {
            let budget_bytes = self.pool.budget_bytes();
            return Ok(self.refuse(Refusal::HostMemory { requested_bytes: growth, budget_bytes }));
        }
        self.memory_bytes = total;
        self.peak_memory_bytes = self.peak_memory_bytes.max(total);
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current) as u64;
        let total = self.table_elements.saturating_add(growth);
        if total > self.table_limit_elements {
            return Ok(
                self.refuse(Refusal::Table { requested_elements: total, limit_elements: self.table_limit_elements })
            );
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_memories_together_cannot_pass_the_cap() {
        let mut l = CallLimiter::new(100, 10, MemoryPool::new(1000));
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(!l.memory_growing(0, 60, None).unwrap(), "a second memory doubled the budget");
        assert_eq!(l.refusal(), Some(Refusal::Memory { requested_bytes: 120, limit_bytes: 100 }));
        assert!(l.memory_growing(0, 40, None).unwrap());
        assert_eq!(l.peak_memory_bytes(), 100);
    }

    #[test]
    fn table_growth_is_summed_and_refused_separately() {
        let mut l = CallLimiter::new(100, 10, MemoryPool::new(1000));
        assert!(l.table_growing(0, 8, None).unwrap());
        assert!(!l.table_growing(8, 11, None).unwrap());
        assert!(matches!(l.refusal(), Some(Refusal::Table { .. })));
        assert_eq!(l.peak_memory_bytes(), 0);
    }

    #[test]
    fn calls_within_their_tier_cannot_pass_the_host_budget_together_and_give_it_back() {
        let pool = MemoryPool::new(150);
        let mut a = CallLimiter::new(100, 10, Arc::clone(&pool));
        let mut b = CallLimiter::new(100, 10, Arc::clone(&pool));
        assert!(a.memory_growing(0, 100, None).unwrap());
        assert!(!b.memory_growing(0, 60, None).unwrap(), "two calls passed the host's budget");
        assert_eq!(b.refusal(), Some(Refusal::HostMemory { requested_bytes: 60, budget_bytes: 150 }));
        assert!(b.memory_growing(0, 50, None).unwrap());
        assert_eq!((pool.in_use_bytes(), pool.peak_bytes()), (150, 150));
        drop(a);
        assert_eq!(pool.in_use_bytes(), 50);
        let held = pool.reserve(100).unwrap();
        assert!(pool.reserve(1).is_none());
        drop((b, held));
        assert_eq!(pool.in_use_bytes(), 0);
    }
}
