//! One resource limiter per call, summing every linear memory and table.
//!
//! wasmtime's `StoreLimits` caps each memory on its own, so a component with two
//! memories could take twice its tier. This limiter keeps running totals over
//! the whole instance (all its core instances), refuses any growth that would
//! pass the tier's cap, and records the refusal: the report then says
//! `memory_limit` because a limit was refused, not because an error's text
//! looked like one.

use wasmtime::ResourceLimiter;

/// Which cap a refused growth would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Memory { requested_bytes: u64, limit_bytes: u64 },
    Table { requested_elements: u64, limit_elements: u64 },
}

/// Running totals and caps for one store.
#[derive(Debug, Clone)]
pub(crate) struct CallLimiter {
    memory_limit_bytes: u64,
    table_limit_elements: u64,
    memory_bytes: u64,
    peak_memory_bytes: u64,
    table_elements: u64,
    refusal: Option<Refusal>,
}

/// Instances, memories and tables one call may create. A Rust wasip2 component
/// has 3 core instances, 1 memory and 2 tables; interpreters a few more.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;

impl CallLimiter {
    pub(crate) fn new(memory_limit_bytes: u64, table_limit_elements: u64) -> Self {
        Self {
            memory_limit_bytes,
            table_limit_elements,
            memory_bytes: 0,
            peak_memory_bytes: 0,
            table_elements: 0,
            refusal: None,
        }
    }

    /// The largest total of linear memory the instance held at once.
    pub(crate) fn peak_memory_bytes(&self) -> u64 {
        self.peak_memory_bytes
    }

    /// The first growth this limiter refused, if any.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
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
        let mut l = CallLimiter::new(100, 10);
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(!l.memory_growing(0, 60, None).unwrap(), "a second memory doubled the budget");
        assert_eq!(l.refusal(), Some(Refusal::Memory { requested_bytes: 120, limit_bytes: 100 }));
        assert!(l.memory_growing(0, 40, None).unwrap());
        assert_eq!(l.peak_memory_bytes(), 100);
    }

    #[test]
    fn table_growth_is_summed_and_refused_separately() {
        let mut l = CallLimiter::new(100, 10);
        assert!(l.table_growing(0, 8, None).unwrap());
        assert!(!l.table_growing(8, 11, None).unwrap());
        assert!(matches!(l.refusal(), Some(Refusal::Table { .. })));
        assert_eq!(l.peak_memory_bytes(), 0);
    }
}
