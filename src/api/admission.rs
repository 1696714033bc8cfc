//! Admission control: who may start a call now. Three checks, all answered
//! at once (never a queue that hangs): a per-user request rate (token bucket,
//! per tier), a per-user cap on calls in flight (per tier), and a global cap
//! sized to the engine's instance pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

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
    in_flight: AtomicU32,
    per_user: Mutex<HashMap<String, u32>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A call's place; given back when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    user: String,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").field("user", &self.user).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut per_user = self.admission.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

impl Admission {
    pub fn new(global_cap: u32) -> Arc<Self> {
        Arc::new(Self {
            global_cap,
            in_flight: AtomicU32::new(0),
            per_user: Mutex::default(),
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
            message: format!("over the tier's rate of {rate} requests per second"),
            retry_after: wait.ceil() as u64,
        })
    }

    /// A place for one call of `user`, whose tier allows `user_cap` at once.
    ///
    /// # Errors
    ///
    /// A [`Denial`] when the user or the whole server is at its cap.
    pub fn admit(self: &Arc<Self>, user: &str, user_cap: u32) -> Result<Permit, Denial> {
        let mut per_user = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = per_user.get(user).copied().unwrap_or(0);
        if mine >= user_cap {
            return Err(Denial {
                reason: "user_concurrency",
                message: format!("{mine} calls already running, the tier's limit"),
                retry_after: 1,
            });
        }
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.global_cap).then_some(n + 1));
        if taken.is_err() {
            return Err(Denial {
                reason: "server_busy",
                message: format!("the server is running its maximum of {} calls", self.global_cap),
                retry_after: 1,
            });
        }
        per_user.insert(user.to_owned(), mine + 1);
        Ok(Permit { admission: self.clone(), user: user.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_and_global_caps_hold_and_permits_come_back() {
        let a = Admission::new(3);
        let p1 = a.admit("alice", 2).unwrap();
        let _p2 = a.admit("alice", 2).unwrap();
        assert_eq!(a.admit("alice", 2).unwrap_err().reason, "user_concurrency");
        let _p3 = a.admit("bob", 5).unwrap();
        assert_eq!(a.admit("bob", 5).unwrap_err().reason, "server_busy");
        drop(p1);
        assert_eq!(a.in_flight(), 2);
        assert!(a.admit("alice", 2).is_ok());
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
        let a = Admission::new(10);
        for _ in 0..4 {
            a.rate("alice", 2).unwrap();
        }
        let denial = a.rate("alice", 2).unwrap_err();
        assert_eq!(denial.reason, "rate");
        assert_eq!(denial.retry_after, 1);
        assert!(a.rate("bob", 2).is_ok());
    }
}
