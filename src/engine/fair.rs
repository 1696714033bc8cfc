//! CPU shared fairly between users when the host is contended (SECURITY.md,
//! "CPU between users").
//!
//! A guest runs only while its call's future is being polled, and a poll lasts
//! at most one epoch tick (the epoch callback yields). [`CpuGate`] lets as many
//! polls run at once as there are cores but one (the server keeps a core for
//! its own work); past that, a poll waits for a turn,
//! and turns go round the *users* with polls waiting, one poll each, not round
//! the calls. One user's twenty spinning calls then take one turn in two
//! against another user's one call, instead of twenty in twenty-one, and
//! their waiting polls sit in the gate rather than in the runtime's queues,
//! where they would delay the server's own work.
//!
//! A running guest yields at an epoch tick (1 ms) only when a poll waits for
//! a turn, or after [`RUN_TICKS`] ticks in a row: uncontended, it runs on;
//! contended, another user waits at most about a tick for the core.
//! Uncontended, a poll takes and gives back its turn under one short lock.

/// Ticks a guest may run without yielding when nobody waits for its turn,
/// so that the runtime's worker still serves its other tasks now and then.
pub(crate) const RUN_TICKS: u32 = 5;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

/// Turns to run guest code: at most `slots` polls at once, handed round the
/// users that wait.
#[derive(Debug)]
pub struct CpuGate {
    slots: usize,
    state: Mutex<GateState>,
    /// Polls waiting for a turn (kept beside the lock, for the epoch
    /// callback to read without taking it).
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct GateState {
    running: usize,
    /// Users with a poll waiting, in the order their turns come.
    turns: VecDeque<Arc<str>>,
    /// Each waiting user's polls, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<(u64, Waker)>>,
    /// Polls handed a turn that have not run yet.
    granted: Vec<u64>,
    next_ticket: u64,
}

impl GateState {
    /// A turn just ended: give it to the next user's oldest poll, or free it.
    fn pass_on(&mut self, waiting: &AtomicUsize) {
        while let Some(user) = self.turns.pop_front() {
            let Some(queue) = self.waiting.get_mut(&user) else { continue };
            let Some((ticket, waker)) = queue.pop_front() else {
                self.waiting.remove(&user);
                continue;
            };
            if queue.is_empty() {
                self.waiting.remove(&user);
            } else {
                self.turns.push_back(user);
            }
            self.granted.push(ticket);
            waiting.fetch_sub(1, Ordering::Relaxed);
            waker.wake();
            return;
        }
        self.running -= 1;
    }

    fn forget(&mut self, user: &Arc<str>, ticket: u64, waiting: &AtomicUsize) {
        if let Some(queue) = self.waiting.get_mut(user) {
            let before = queue.len();
            queue.retain(|(t, _)| *t != ticket);
            waiting.fetch_sub(before - queue.len(), Ordering::Relaxed);
            if queue.is_empty() {
                self.waiting.remove(user);
                self.turns.retain(|u| u != user);
            }
        }
    }
}

impl CpuGate {
    /// A gate for `slots` guests running at once (the cores the runtime has).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self { slots: slots.max(1), state: Mutex::default(), waiting: AtomicUsize::new(0) })
    }

    /// A gate with one slot per core of this host but one: guests never take
    /// every core, so the server's own work (accepting, parsing, auth,
    /// recording) always finds a worker free, whatever the guests do. With
    /// as many slots as cores, 20 spinning calls kept both workers of a
    /// 2-core host busy and another user's trivial call over HTTP took
    /// 150 ms (p50; BENCHMARKS.md).
    pub fn for_this_host() -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores.saturating_sub(1).max(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Guests that may run at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Whether a poll waits for a turn: a running guest then yields at its
    /// next epoch tick instead of running on.
    pub(crate) fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }
}

/// `inner`, polled only on the turns that `gate` gives `user`.
pub(crate) struct Fair<F> {
    inner: Pin<Box<F>>,
    gate: Arc<CpuGate>,
    user: Arc<str>,
    /// The poll's place in the gate's queue while it waits.
    ticket: Option<u64>,
}

impl<F: Future> Fair<F> {
    pub(crate) fn new(inner: F, gate: Arc<CpuGate>, user: Arc<str>) -> Self {
        Self { inner: Box::pin(inner), gate, user, ticket: None }
    }

    /// Takes a turn now, or queues for one (answers false).
    fn take_turn(&mut self, cx: &Context<'_>) -> bool {
        let mut state = self.gate.lock();
        if let Some(ticket) = self.ticket {
            if let Some(i) = state.granted.iter().position(|&t| t == ticket) {
                state.granted.swap_remove(i);
                self.ticket = None;
                return true;
            }
            // Still waiting: keep the newest waker.
            if let Some(entry) =
                state.waiting.get_mut(&self.user).and_then(|q| q.iter_mut().find(|(t, _)| *t == ticket))
            {
                entry.1.clone_from(cx.waker());
            }
            return false;
        }
        if state.running < self.gate.slots && state.turns.is_empty() {
            state.running += 1;
            return true;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let queue = state.waiting.entry(Arc::clone(&self.user)).or_default();
        let first = queue.is_empty();
        queue.push_back((ticket, cx.waker().clone()));
        self.gate.waiting.fetch_add(1, Ordering::Relaxed);
        if first {
            state.turns.push_back(Arc::clone(&self.user));
        }
        self.ticket = Some(ticket);
        false
    }
}

impl<F: Future> Future for Fair<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.take_turn(cx) {
            return Poll::Pending;
        }
        let polled = self.inner.as_mut().poll(cx);
        self.gate.lock().pass_on(&self.gate.waiting);
        polled
    }
}

impl<F> Drop for Fair<F> {
    fn drop(&mut self) {
        // Dropped while waiting (the call's outer timeout): leave the queue,
        // or pass on a turn handed to it that it will never use.
        let Some(ticket) = self.ticket else { return };
        let mut state = self.gate.lock();
        if let Some(i) = state.granted.iter().position(|&t| t == ticket) {
            state.granted.swap_remove(i);
            state.pass_on(&self.gate.waiting);
        } else {
            state.forget(&self.user, ticket, &self.gate.waiting);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn turns_go_round_the_users_not_the_calls() {
        let gate = CpuGate::new(1);
        let mut cx = Context::from_waker(Waker::noop());
        // The one slot is taken; five calls of user a queue, then one of b.
        gate.lock().running = 1;
        let mut calls: Vec<_> = "aaaaab"
            .chars()
            .map(|u| Box::pin(Fair::new(std::future::pending::<()>(), Arc::clone(&gate), u.to_string().into())))
            .collect();
        for call in &mut calls {
            assert!(call.as_mut().poll(&mut cx).is_pending());
        }
        // Each turn that ends goes to the next user in line: b's call comes
        // second, not after a's five.
        let mut order = String::new();
        for _ in 0..6 {
            let mut state = gate.lock();
            state.pass_on(&gate.waiting);
            let ticket = state.granted.pop().unwrap();
            order.push(if ticket == 5 { 'b' } else { 'a' });
        }
        assert_eq!(order, "abaaaa");
        assert!(gate.lock().waiting.is_empty() && !gate.contended());
    }

    /// A future that needs a few polls, each with a little work, waking itself.
    struct Steps(u32, Arc<AtomicUsize>);

    impl Future for Steps {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.0 -= 1;
            if self.0 == 0 {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn contended_calls_all_finish_and_give_every_turn_back() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().unwrap();
        let gate = CpuGate::new(1);
        let polls = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let tasks: Vec<_> = (0..12)
                .map(|i| {
                    let fair =
                        Fair::new(Steps(5, Arc::clone(&polls)), Arc::clone(&gate), ["a", "b", "c"][i % 3].into());
                    tokio::spawn(fair)
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(polls.load(Ordering::Relaxed), 60);
        let state = gate.lock();
        assert_eq!((state.running, state.turns.len(), state.granted.len()), (0, 0, 0));
    }

    #[test]
    fn a_call_dropped_while_waiting_leaves_the_queue() {
        let gate = CpuGate::new(1);
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = Box::pin(Fair::new(std::future::pending::<()>(), Arc::clone(&gate), "a".into()));
        let mut second = Box::pin(Fair::new(std::future::pending::<()>(), Arc::clone(&gate), "b".into()));
        // `first` runs (and gives its turn back after its poll); hold the slot
        // by marking it taken, so `second` has to queue.
        assert!(first.as_mut().poll(&mut cx).is_pending());
        gate.lock().running = 1;
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(gate.lock().turns.len(), 1);
        assert!(gate.contended());
        drop(second);
        assert!(gate.lock().turns.is_empty() && gate.lock().waiting.is_empty());
        assert!(!gate.contended());
        // A turn handed to a call that is then dropped goes to nobody and is freed.
        let mut third = Box::pin(Fair::new(std::future::pending::<()>(), Arc::clone(&gate), "c".into()));
        assert!(third.as_mut().poll(&mut cx).is_pending());
        gate.lock().pass_on(&gate.waiting);
        drop(third);
        assert_eq!(gate.lock().running, 0);
    }
}
