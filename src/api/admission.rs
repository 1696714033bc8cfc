//! Admission control: who may start a call now. Four checks, all answered
//! at once (never a queue that hangs): a per-user request rate (token bucket,
//! per tier), a per-user cap on calls in flight (per tier), a global cap
//! sized to the engine's instance pool, and the host's memory budget.
//!
//! Memory: a native run reserves its tier's memory (its cgroup's hard limit)
//! for as long as it runs. A WASM call reserves nothing up front: reserving
//! its tier's limit would cap a 24 GiB host at 38 standard-tier calls in
//! flight while a typical call takes 1 to 30 MB. Instead every call's memory
//! limiter charges the same pool as it grows, and a growth that would pass
//! the budget is refused (the call ends `memory_limit`); admission turns new
//! calls away while the pool is nearly full. The sum never passes the budget
//! either way, and the pool's per-user share and reserve for light users
//! ([`MemoryPool`]) keep one user from holding it all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::engine::{MemoryPool, MemoryReservation, Short};

/// Why a request was turned away, and when to come back (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
    pub retry_after: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Self {
        Self { tokens: burst, at: Instant::now() }
    }

    /// Refills at `rate` per second up to `burst`, then takes one token if
    /// there is one; otherwise answers the seconds until there will be.
    fn take(&mut self, rate: f64, burst: f64) -> Result<(), f64> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }
}

/// Keeps refused requests from flooding the audit trail: per key (the kind of
/// record and who caused it), `RECORDS_PER_SECOND` records, bursts of twice
/// that; the rest are counted and the next record says how many were skipped.
#[derive(Default)]
pub struct AuditThrottle {
    keys: Mutex<HashMap<String, (Bucket, u64)>>,
}

const RECORDS_PER_SECOND: f64 = 20.0;

impl AuditThrottle {
    /// `Some(skipped)` when a record may be written now (`skipped` records of
    /// this key were left out before it); `None` when this one is skipped.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let (bucket, skipped) =
            keys.entry(key.to_owned()).or_insert_with(|| (Bucket::full(2.0 * RECORDS_PER_SECOND), 0));
        match bucket.take(RECORDS_PER_SECOND, 2.0 * RECORDS_PER_SECOND) {
            Ok(()) => Some(std::mem::take(skipped)),
            Err(_) => {
                *skipped += 1;
                None
            }
        }
    }
}

pub struct Admission {
    global_cap: u32,
    memory: Arc<MemoryPool>,
    in_flight: AtomicU32,
    /// Instance-pool slots held by code sessions' live instances.
    sessions: AtomicU32,
    places: Mutex<Places>,
    next_call: AtomicU64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Who holds the places: calls per user, and each call in flight.
#[derive(Default)]
struct Places {
    per_user: HashMap<String, u32>,
    running: HashMap<u64, Place>,
}

/// A call's place.
struct Place {
    user: String,
    tool: String,
    since: Instant,
    at: std::time::SystemTime,
}

/// A call in flight, as `GET /v1/live` lists it.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Running {
    pub user: String,
    pub tool: String,
    /// RFC 3339: when it was admitted.
    pub started: String,
    pub running_ms: u64,
}

/// A call's place; given back when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    call: u64,
    _memory: Option<MemoryReservation>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").field("call", &self.call).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut places = self.admission.places.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(place) = places.running.remove(&self.call)
            && let Some(n) = places.per_user.get_mut(&place.user)
        {
            *n -= 1;
            if *n == 0 {
                places.per_user.remove(&place.user);
            }
        }
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(global_cap: u32, memory: Arc<MemoryPool>) -> Arc<Self> {
        Arc::new(Self {
            global_cap,
            memory,
            in_flight: AtomicU32::new(0),
            sessions: AtomicU32::new(0),
            places: Mutex::default(),
            next_call: AtomicU64::new(0),
            buckets: Mutex::default(),
        })
    }

    pub fn global_cap(&self) -> u32 {
        self.global_cap
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The calls in flight now, longest running first.
    pub fn running(&self) -> Vec<Running> {
        let places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        let mut calls: Vec<(Instant, std::time::SystemTime, String, String)> =
            places.running.values().map(|p| (p.since, p.at, p.user.clone(), p.tool.clone())).collect();
        drop(places);
        calls.sort_by_key(|(since, ..)| *since);
        calls
            .into_iter()
            .map(|(since, at, user, tool)| Running {
                user,
                tool,
                started: crate::report::rfc3339(at),
                running_ms: since.elapsed().as_millis() as u64,
            })
            .collect()
    }

    /// Takes an instance-pool slot for a code session's live instance, if
    /// fewer than `max` sessions hold one and the calls in flight leave one.
    pub fn take_session_slot(&self, max: u32) -> bool {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        self.sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max && n + in_flight < self.global_cap).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn give_back_session_slot(&self) {
        self.sessions.fetch_sub(1, Ordering::AcqRel);
    }

    /// Slots that code sessions hold now.
    pub fn session_slots(&self) -> u32 {
        self.sessions.load(Ordering::Acquire)
    }

    /// Takes one request from `user`'s bucket (`rate` per second, burst `2 × rate`).
    ///
    /// # Errors
    ///
    /// A [`Denial`] saying when a token will be there.
    pub fn rate(&self, user: &str, rate: u32) -> Result<(), Denial> {
        let rate = f64::from(rate.max(1));
        let burst = 2.0 * rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(user.to_owned()).or_insert_with(|| Bucket::full(burst));
        bucket.take(rate, burst).map_err(|wait| Denial {
            reason: "rate",
            message: format!("over your rate of {rate} requests per second (the tier's, or lower while throttled)"),
            retry_after: wait.ceil() as u64,
        })
    }

    /// A place for one call of `user` to `tool`, whose tier allows `user_cap` at once,
    /// holding `reserve_bytes` of the memory budget while it runs (a native
    /// run's memory limit; 0 for a WASM call, whose limiter charges as it grows).
    ///
    /// # Errors
    ///
    /// A [`Denial`] when the user or the whole server is at its cap, or the
    /// host's memory budget is used up.
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        tool: &str,
        user_cap: u32,
        reserve_bytes: u64,
    ) -> Result<Permit, Denial> {
        let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = places.per_user.get(user).copied().unwrap_or(0);
        if mine >= user_cap {
            return Err(Denial {
                reason: "user_concurrency",
                message: format!("{mine} calls already running, the tier's limit"),
                retry_after: 1,
            });
        }
        // Sessions' live instances hold slots of the same pool.
        let cap = self.global_cap.saturating_sub(self.sessions.load(Ordering::Acquire));
        let taken = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1));
        if taken.is_err() {
            return Err(Denial {
                reason: "server_busy",
                message: format!(
                    "the server is running its maximum of {} calls (code sessions hold {} of them)",
                    self.global_cap,
                    self.global_cap - cap
                ),
                retry_after: 1,
            });
        }
        let memory = match self.memory_for(user, reserve_bytes) {
            Ok(memory) => memory,
            Err(denial) => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(denial);
            }
        };
        places.per_user.insert(user.to_owned(), mine + 1);
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let place = Place {
            user: user.to_owned(),
            tool: tool.to_owned(),
            since: Instant::now(),
            at: std::time::SystemTime::now(),
        };
        places.running.insert(call, place);
        Ok(Permit { admission: self.clone(), call, _memory: memory })
    }

    fn memory_for(&self, user: &str, reserve_bytes: u64) -> Result<Option<MemoryReservation>, Denial> {
        let pool = &self.memory;
        let answer = if reserve_bytes > 0 {
            pool.reserve(user, reserve_bytes).map(Some)
        } else {
            pool.admits(user).map(|()| None)
        };
        answer.map_err(|short| {
            let run = if reserve_bytes > 0 { format!("this run's {reserve_bytes}") } else { "a new call".to_owned() };
            match short {
                Short::UserShare { held_bytes } => Denial {
                    reason: "user_memory",
                    message: format!(
                        "your calls in flight hold {held_bytes} bytes of the {} that one user's calls may hold \
                         together (a share of the server's memory): no room for {run}",
                        pool.user_max_bytes()
                    ),
                    retry_after: 1,
                },
                Short::Budget => Denial {
                    reason: "server_busy",
                    message: format!(
                        "the calls in flight hold {} bytes of the server's memory budget of {}: no room for {run}",
                        pool.in_use_bytes(),
                        pool.budget_bytes()
                    ),
                    retry_after: 1,
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_and_global_caps_hold_and_permits_come_back() {
        let a = Admission::new(3, MemoryPool::new(1 << 30));
        let p1 = a.admit("alice", "t", 2, 0).unwrap();
        let _p2 = a.admit("alice", "t", 2, 0).unwrap();
        assert_eq!(a.admit("alice", "t", 2, 0).unwrap_err().reason, "user_concurrency");
        let _p3 = a.admit("bob", "t", 5, 0).unwrap();
        assert_eq!(a.admit("bob", "t", 5, 0).unwrap_err().reason, "server_busy");
        drop(p1);
        assert_eq!(a.in_flight(), 2);
        assert!(a.admit("alice", "t", 2, 0).is_ok());
    }

    #[test]
    fn the_memory_budget_turns_calls_away_and_native_reservations_come_back() {
        let pool = MemoryPool::with_user_share(1000, 1.0);
        let a = Admission::new(10, Arc::clone(&pool));
        let native = a.admit("alice", "t", 5, 600).unwrap();
        let denial = a.admit("bob", "t", 5, 600).unwrap_err();
        assert_eq!(denial.reason, "server_busy");
        assert!(denial.message.contains("memory budget"), "{}", denial.message);
        assert_eq!(a.in_flight(), 1, "a refused call kept its place");
        assert!(a.admit("bob", "t", 5, 0).is_ok(), "WASM calls are admitted below 90 %");
        let bobs = pool.reserve("bob", 300).unwrap();
        assert_eq!(a.admit("bob", "t", 5, 0).unwrap_err().reason, "server_busy");
        assert!(a.admit("carol", "t", 5, 0).is_ok(), "a light user was refused the reserve");
        drop(native);
        assert_eq!(pool.in_use_bytes(), 300);
        assert!(a.admit("bob", "t", 5, 0).is_ok());
        drop(bobs);
    }

    #[test]
    fn one_user_holding_their_share_is_refused_and_the_others_are_not() {
        let pool = MemoryPool::new(1000);
        let a = Admission::new(50, Arc::clone(&pool));
        let natives: Vec<Permit> = (0..5).map(|_| a.admit("hog", "t", 20, 100).unwrap()).collect();
        for reserve in [0, 100] {
            let denial = a.admit("hog", "t", 20, reserve).unwrap_err();
            assert_eq!(denial.reason, "user_memory", "{denial:?}");
            assert!(denial.message.contains("500 bytes"), "{}", denial.message);
        }
        assert!(a.admit("bob", "t", 20, 100).is_ok());
        assert!(a.admit("carol", "t", 20, 0).is_ok());
        drop(natives);
        assert!(a.admit("hog", "t", 20, 100).is_ok());
    }

    #[test]
    fn refusals_are_recorded_at_a_bounded_rate_and_the_skipped_ones_counted() {
        let t = AuditThrottle::default();
        for _ in 0..40 {
            assert_eq!(t.admit("auth_failure/anonymous"), Some(0));
        }
        assert_eq!(t.admit("auth_failure/anonymous"), None);
        assert_eq!(t.admit("auth_failure/anonymous"), None);
        assert_eq!(t.admit("denied/alice"), Some(0), "keys are separate");
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(t.admit("auth_failure/anonymous"), Some(2));
    }

    #[test]
    fn the_rate_bucket_allows_a_burst_of_twice_the_rate_then_refuses() {
        let a = Admission::new(10, MemoryPool::new(1 << 30));
        for _ in 0..4 {
            a.rate("alice", 2).unwrap();
        }
        let denial = a.rate("alice", 2).unwrap_err();
        assert_eq!(denial.reason, "rate");
        assert_eq!(denial.retry_after, 1);
        assert!(a.rate("bob", 2).is_ok());
    }
}
