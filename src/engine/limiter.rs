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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::ResourceLimiter;

/// Linear memory that all guests may hold at once, what they hold now, and
/// what each user's calls hold together. Native runs reserve their tier's
/// memory here too (their cgroup's limit).
///
/// Two rules keep one tenant from starving the others (SECURITY.md, "Host
/// memory"): a user's calls together hold at most [`MemoryPool::user_max_bytes`]
/// (a share of the budget, half by default), and the last part of the budget,
/// above [`RESERVE_ABOVE`], is kept for users whose calls hold little (under
/// [`LIGHT_SHARE`] of it): however much the others hold, their small calls
/// still start and grow.
#[derive(Debug)]
pub struct MemoryPool {
    budget_bytes: u64,
    user_max_bytes: u64,
    in_use: AtomicU64,
    peak: AtomicU64,
    users: PerOwner,
}

/// Share of the host's (or the server's cgroup's) memory that guests may use
/// by default: the specification's "memory use under 80 %".
pub const DEFAULT_MEMORY_SHARE: f64 = 0.8;

/// Share of the budget that one user's calls may hold together, by default.
pub const DEFAULT_USER_SHARE: f64 = 0.5;

/// Past this share of the budget only light users' calls may grow.
pub const RESERVE_ABOVE: f64 = 0.9;

/// A user whose calls hold less than this share of the budget is light.
pub const LIGHT_SHARE: f64 = 0.05;

/// New calls are admitted while the pool is below [`RESERVE_ABOVE`] (or, for
/// a light user, below this share): the rest is room for calls to grow.
const ADMIT_LIGHT_BELOW: f64 = 0.98;

/// Which rule a charge would have broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// The budget (or, for a user who is not light, its shared part) is in use.
    Budget,
    /// The user's calls hold `held_bytes` of their share already.
    UserShare { held_bytes: u64 },
}

/// Counters per owner (a user), shared by all their calls.
#[derive(Debug, Default)]
pub(crate) struct PerOwner(Mutex<HashMap<Arc<str>, Arc<AtomicU64>>>);

impl PerOwner {
    /// The counter of `owner`.
    pub(crate) fn get(&self, owner: &str) -> Arc<AtomicU64> {
        let mut owners = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Every call asks: look up before making the key.
        if let Some(counter) = owners.get(owner) {
            return Arc::clone(counter);
        }
        Arc::clone(owners.entry(owner.into()).or_default())
    }
}

pub(crate) fn give_back(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(n)));
}

fn share(bytes: u64, share: f64) -> u64 {
    (bytes as f64 * share) as u64
}

impl MemoryPool {
    /// A budget of `budget_bytes`, of which one user may hold [`DEFAULT_USER_SHARE`].
    pub fn new(budget_bytes: u64) -> Arc<Self> {
        Self::with_user_share(budget_bytes, DEFAULT_USER_SHARE)
    }

    /// A budget of `budget_bytes`, of which one user may hold `user_share` (0 to 1].
    pub fn with_user_share(budget_bytes: u64, user_share: f64) -> Arc<Self> {
        Arc::new(Self {
            budget_bytes,
            user_max_bytes: share(budget_bytes, user_share.clamp(0.0, 1.0)),
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            users: PerOwner::default(),
        })
    }

    /// A pool of `share` of this host's memory, or of the server's cgroup
    /// limit when that is lower, for a process with one user (`run`, `mcp`,
    /// the benchmarks): no per-user share. The server sets its own.
    pub fn for_this_host(share: f64) -> Arc<Self> {
        let total = crate::host::memory_bytes();
        Self::with_user_share((total as f64 * share) as u64, 1.0)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// What one user's calls may hold together.
    pub fn user_max_bytes(&self) -> u64 {
        self.user_max_bytes
    }

    /// The most one heavy user's run may reserve at once: their share, and
    /// no further than [`RESERVE_ABOVE`] of the budget.
    pub fn heavy_max_bytes(&self) -> u64 {
        self.user_max_bytes.min(share(self.budget_bytes, RESERVE_ABOVE))
    }

    /// Below this, a user is light: the reserve above [`RESERVE_ABOVE`] is theirs.
    pub fn light_bytes(&self) -> u64 {
        share(self.budget_bytes, LIGHT_SHARE)
    }

    pub fn in_use_bytes(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// What `owner`'s calls hold now.
    pub fn held_by(&self, owner: &str) -> u64 {
        self.users.get(owner).load(Ordering::Acquire)
    }

    /// The most the guests held at once since the process started.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// The counter of what `owner`'s calls hold.
    pub(crate) fn owner(&self, owner: &str) -> Arc<AtomicU64> {
        self.users.get(owner)
    }

    /// Charges `bytes` to `owner` (their counter) and the budget, if the
    /// user's share has room and the budget has room for them.
    pub(crate) fn take(&self, owner: &AtomicU64, bytes: u64) -> Result<(), Short> {
        // wasmtime asks for memories that start empty too.
        if bytes == 0 {
            return Ok(());
        }
        let held = owner
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.user_max_bytes)
            })
            .map_err(|held_bytes| Short::UserShare { held_bytes })?
            + bytes;
        let line = if held < self.light_bytes() { self.budget_bytes } else { share(self.budget_bytes, RESERVE_ABOVE) };
        let taken = self.in_use.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&total| total <= line)
        });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, Ordering::AcqRel);
                Ok(())
            }
            Err(_) => {
                give_back(owner, bytes);
                Err(Short::Budget)
            }
        }
    }

    fn give_back(&self, owner: &AtomicU64, bytes: u64) {
        give_back(owner, bytes);
        give_back(&self.in_use, bytes);
    }

    /// Whether a new call of `owner` that reserves nothing up front (a WASM
    /// call, whose limiter charges as it grows) may start: below 90 % of the
    /// user's share, and below [`RESERVE_ABOVE`] of the budget (a light
    /// user: nearly all of it).
    pub fn admits(&self, owner: &str) -> Result<(), Short> {
        let held_bytes = self.held_by(owner);
        if held_bytes >= share(self.user_max_bytes, 0.9) {
            return Err(Short::UserShare { held_bytes });
        }
        let line = if held_bytes < self.light_bytes() { ADMIT_LIGHT_BELOW } else { RESERVE_ABOVE };
        if self.in_use_bytes() >= share(self.budget_bytes, line) {
            return Err(Short::Budget);
        }
        Ok(())
    }

    /// Holds `bytes` of `owner`'s share and of the budget until the
    /// reservation is dropped (a native run's cgroup limit).
    ///
    /// # Errors
    ///
    /// The rule that leaves no room for them.
    pub fn reserve(self: &Arc<Self>, owner: &str, bytes: u64) -> Result<MemoryReservation, Short> {
        let counter = self.owner(owner);
        self.take(&counter, bytes)?;
        Ok(MemoryReservation { pool: Arc::clone(self), owner: counter, bytes })
    }
}

/// Memory held in a [`MemoryPool`] until dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    pool: Arc<MemoryPool>,
    owner: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.pool.give_back(&self.owner, self.bytes);
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
    /// The call was within its tier, but the user's calls together held
    /// their share of the host's budget.
    UserMemory {
        requested_bytes: u64,
        held_bytes: u64,
        share_bytes: u64,
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
    /// What the owner's calls hold together, in `pool`.
    owner: Arc<AtomicU64>,
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
        self.pool.give_back(&self.owner, self.memory_bytes);
    }
}

/// Instances, memories and tables one call may create. A Rust wasip2 component
/// has 3 core instances, 1 memory and 2 tables; interpreters a few more.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;

impl CallLimiter {
    /// A limiter for one call of `owner`, charging `pool`.
    pub(crate) fn new(memory_limit_bytes: u64, table_limit_elements: u64, pool: Arc<MemoryPool>, owner: &str) -> Self {
        Self {
            owner: pool.owner(owner),
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
        match self.pool.take(&self.owner, growth) {
            Ok(()) => {}
            Err(Short::Budget) => {
                let budget_bytes = self.pool.budget_bytes();
                return Ok(self.refuse(Refusal::HostMemory { requested_bytes: growth, budget_bytes }));
            }
            Err(Short::UserShare { held_bytes }) => {
                let share_bytes = self.pool.user_max_bytes();
                return Ok(self.refuse(Refusal::UserMemory { requested_bytes: growth, held_bytes, share_bytes }));
            }
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
        let mut l = CallLimiter::new(100, 10, MemoryPool::with_user_share(1000, 1.0), "u");
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(!l.memory_growing(0, 60, None).unwrap(), "a second memory doubled the budget");
        assert_eq!(l.refusal(), Some(Refusal::Memory { requested_bytes: 120, limit_bytes: 100 }));
        assert!(l.memory_growing(0, 40, None).unwrap());
        assert_eq!(l.peak_memory_bytes(), 100);
    }

    #[test]
    fn table_growth_is_summed_and_refused_separately() {
        let mut l = CallLimiter::new(100, 10, MemoryPool::with_user_share(1000, 1.0), "u");
        assert!(l.table_growing(0, 8, None).unwrap());
        assert!(!l.table_growing(8, 11, None).unwrap());
        assert!(matches!(l.refusal(), Some(Refusal::Table { .. })));
        assert_eq!(l.peak_memory_bytes(), 0);
    }

    #[test]
    fn calls_within_their_tier_cannot_pass_the_host_budget_together_and_give_it_back() {
        let pool = MemoryPool::with_user_share(150, 1.0);
        let mut a = CallLimiter::new(100, 10, Arc::clone(&pool), "u");
        let mut b = CallLimiter::new(100, 10, Arc::clone(&pool), "v");
        assert!(a.memory_growing(0, 100, None).unwrap());
        assert!(!b.memory_growing(0, 60, None).unwrap(), "two calls passed the host's budget");
        assert_eq!(b.refusal(), Some(Refusal::HostMemory { requested_bytes: 60, budget_bytes: 150 }));
        assert!(b.memory_growing(0, 35, None).unwrap());
        assert_eq!((pool.in_use_bytes(), pool.peak_bytes()), (135, 135));
        drop(a);
        assert_eq!(pool.in_use_bytes(), 35);
        let held = pool.reserve("w", 100).unwrap();
        assert_eq!(pool.reserve("w", 1).unwrap_err(), Short::Budget);
        drop((b, held));
        assert_eq!((pool.in_use_bytes(), pool.held_by("u"), pool.held_by("w")), (0, 0, 0));
    }

    /// The attack of the soak: one user's calls at their tier's memory, as
    /// many as the tier allows, hold at most their share, and a light user's
    /// calls still start and grow into the reserve.
    #[test]
    fn one_user_cannot_hold_the_whole_budget_and_light_users_keep_the_reserve() {
        let pool = MemoryPool::with_user_share(1000, 0.5);
        let hogs: Vec<CallLimiter> = (0..20)
            .map(|_| {
                let mut l = CallLimiter::new(100, 10, Arc::clone(&pool), "hog");
                l.memory_growing(0, 100, None).unwrap();
                l
            })
            .collect();
        assert_eq!(pool.held_by("hog"), 500, "one user holds more than their share");
        let refused = hogs.iter().find_map(|l| l.refusal()).unwrap();
        assert_eq!(refused, Refusal::UserMemory { requested_bytes: 100, held_bytes: 500, share_bytes: 500 });
        assert_eq!(pool.admits("hog").unwrap_err(), Short::UserShare { held_bytes: 500 });
        assert!(pool.admits("light").is_ok());
        // A second heavy user fills the shared part up to 90 %, no further.
        let mut second = CallLimiter::new(500, 10, Arc::clone(&pool), "second");
        assert!(second.memory_growing(0, 400, None).unwrap());
        assert!(!second.memory_growing(0, 10, None).unwrap(), "a heavy user grew into the reserve");
        assert_eq!(second.refusal(), Some(Refusal::HostMemory { requested_bytes: 10, budget_bytes: 1000 }));
        assert_eq!(pool.admits("second").unwrap_err(), Short::Budget);
        // The reserve is for users holding under 5 %: they start and grow.
        assert!(pool.admits("light").is_ok());
        let mut light = CallLimiter::new(100, 10, Arc::clone(&pool), "light");
        assert!(light.memory_growing(0, 49, None).unwrap());
        assert!(!light.memory_growing(49, 60, None).unwrap(), "the reserve took a heavy growth");
        assert!(pool.reserve("other", 49).is_ok());
        drop((hogs, second, light));
        assert_eq!(pool.in_use_bytes(), 0);
    }
}
