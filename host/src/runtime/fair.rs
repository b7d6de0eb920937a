//! Fair sharing of the CPU between plugins.
//!
//! Guests run on the host's async worker threads. Left to tokio's FIFO run queue, a
//! plugin whose every call burns its whole fuel budget gets a worker for each of its
//! timeslices as often as a plugin whose calls take microseconds gets one for a whole
//! call, so a few busy plugins leave a well-behaved one a small share.
//!
//! [`CpuGate`] admits at most `slots` guest polls at once and, when guests queue, admits
//! the one whose plugin has used the least CPU ("virtual runtime", as in Linux's CFS).
//! [`Fair`] wraps a guest call. Its first poll (one timeslice at most, since guests
//! yield every `FUEL_PER_TIMESLICE` of fuel) runs at once, so the many calls that end
//! there pay nothing; every later poll waits for a slot. Calls that burn timeslices
//! therefore wait at the gate rather than in the async runtime's run queues, where a
//! quick call would wait behind all of them, and busy plugins take turns. Every poll's
//! duration is charged to the plugin.
//!
//! Invariants:
//! - a slot is held only during a poll after a call's first, never while the call waits
//!   for I/O or its turn;
//! - a slot handed to a waiter that is dropped before it runs is handed on, never lost;
//! - a plugin that was idle re-enters at most [`CATCH_UP`] of CPU behind the busiest
//!   recent runner, so a long pause does not buy it a monopoly afterwards.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How far behind the others an idle plugin may come back: it then runs first for at
/// most this much CPU before it takes turns.
const CATCH_UP: Duration = Duration::from_millis(20);

/// The host-wide gate guests pass to run.
#[derive(Debug)]
pub struct CpuGate {
    state: Mutex<GateState>,
    next_ticket: AtomicU64,
}

#[derive(Debug)]
struct GateState {
    free: usize,
    /// Waiting polls, lowest virtual runtime first (ties in arrival order).
    waiting: BTreeMap<(u64, u64), Waker>,
    /// Tickets handed a slot that have not run yet.
    granted: HashSet<u64>,
    /// Virtual runtime of the most recent admission; only grows.
    floor: u64,
}

/// The clock of one guest call, kept by [`Fair`] as it polls the call: when the call
/// started, the time its polls ran, and the time from its start to the end of its latest
/// poll. Each poll reads the clock once, at its end; the first poll starts at `started`.
#[derive(Debug)]
pub struct CallClock {
    started: Instant,
    cpu_ns: AtomicU64,
    elapsed_ns: AtomicU64,
    /// How long after `started` a run's current call is cut off (a run of calls moves it
    /// on as each call begins); zero while nothing moved it.
    moved_deadline_ns: AtomicU64,
}

impl CallClock {
    /// A clock started now.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu_ns: AtomicU64::new(0),
            elapsed_ns: AtomicU64::new(0),
            moved_deadline_ns: AtomicU64::new(0),
        }
    }

    /// Moves the call's deadline to `deadline`, for the next call of a run.
    pub fn move_deadline(&self, deadline: Instant) {
        self.moved_deadline_ns.store(
            nanos(deadline.saturating_duration_since(self.started)),
            Ordering::Relaxed,
        );
    }

    /// The deadline [`CallClock::move_deadline`] set, if any.
    pub fn moved_deadline(&self) -> Option<Instant> {
        match self.moved_deadline_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.started + Duration::from_nanos(ns)),
        }
    }

    /// When the call started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The time the call's polls ran: its own CPU time.
    pub fn cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }

    /// The time from the call's start to the end of its latest poll.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::Relaxed))
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A plugin's account at the gate: the CPU its calls have used, in nanoseconds, plus
/// what catching up added.
#[derive(Debug, Default)]
pub struct CpuShare {
    used_ns: AtomicU64,
}

impl CpuGate {
    /// A gate that lets `slots` guest polls run at once (at least one).
    pub fn new(slots: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                free: slots.max(1),
                waiting: BTreeMap::new(),
                granted: HashSet::new(),
                floor: 0,
            }),
            next_ticket: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for `ticket` now, or queues it to be woken with one.
    fn acquire(
        &self,
        share: &CpuShare,
        ticket: u64,
        queued: &mut Option<u64>,
        waker: &Waker,
    ) -> bool {
        let mut state = self.state();
        if state.granted.remove(&ticket) {
            *queued = None;
            return true;
        }
        // A plugin back from idle is lifted to at most `CATCH_UP` behind the floor.
        let catch_up = u64::try_from(CATCH_UP.as_nanos()).unwrap_or(u64::MAX);
        let least = state.floor.saturating_sub(catch_up);
        let vruntime = share.used_ns.fetch_max(least, Ordering::Relaxed).max(least);
        if let Some(previous) = queued.take() {
            state.waiting.remove(&(previous, ticket));
        }
        let first_in_line = state
            .waiting
            .first_key_value()
            .is_none_or(|(&(lowest, _), _)| vruntime <= lowest);
        if state.free > 0 && first_in_line {
            state.free -= 1;
            state.floor = state.floor.max(vruntime);
            return true;
        }
        state.waiting.insert((vruntime, ticket), waker.clone());
        *queued = Some(vruntime);
        false
    }

    /// Returns a slot: to the first waiter if there is one.
    fn release(&self) {
        let mut state = self.state();
        match state.waiting.pop_first() {
            Some(((vruntime, ticket), waker)) => {
                state.floor = state.floor.max(vruntime);
                state.granted.insert(ticket);
                drop(state);
                waker.wake();
            }
            None => state.free += 1,
        }
    }

    /// Forgets a ticket that will not poll again; a slot already handed to it moves on.
    fn abandon(&self, ticket: u64, queued: Option<u64>) {
        let mut state = self.state();
        if let Some(vruntime) = queued {
            state.waiting.remove(&(vruntime, ticket));
        }
        if state.granted.remove(&ticket) {
            drop(state);
            self.release();
        }
    }
}

pin_project_lite::pin_project! {
    /// A guest call whose polls after the first run only while it holds a slot of the
    /// gate; every poll is charged to the plugin.
    pub struct Fair<'g, F> {
        #[pin]
        inner: F,
        gate: &'g CpuGate,
        share: &'g CpuShare,
        clock: &'g CallClock,
        ticket: u64,
        queued: Option<u64>,
        yielded: bool,
    }

    impl<'g, F> PinnedDrop for Fair<'g, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A ticket that never queued holds nothing at the gate.
            if this.queued.is_some() {
                this.gate.abandon(*this.ticket, *this.queued);
            }
        }
    }
}

impl<'g, F: Future> Fair<'g, F> {
    /// Wraps `inner`, charging `share` at `gate`; the time its polls run is also kept by
    /// `clock`, the call's own.
    pub fn new(gate: &'g CpuGate, share: &'g CpuShare, clock: &'g CallClock, inner: F) -> Self {
        Self {
            inner,
            gate,
            share,
            clock,
            ticket: gate.next_ticket.fetch_add(1, Ordering::Relaxed),
            queued: None,
            yielded: false,
        }
    }
}

impl<F: Future> Future for Fair<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The first poll runs at once: most calls end in it, and then pay no hand-off.
        // A call that yields has proven it is long, and takes turns from then on.
        let gated = *this.yielded;
        if gated
            && !this
                .gate
                .acquire(this.share, *this.ticket, this.queued, cx.waker())
        {
            return Poll::Pending;
        }
        // The first poll starts with the call: one clock read per poll, at its end.
        let started = if *this.yielded {
            Instant::now()
        } else {
            this.clock.started
        };
        let polled = this.inner.poll(cx);
        let ended = Instant::now();
        let ran = nanos(ended.saturating_duration_since(started));
        this.share.used_ns.fetch_add(ran, Ordering::Relaxed);
        this.clock.cpu_ns.fetch_add(ran, Ordering::Relaxed);
        this.clock.elapsed_ns.store(
            nanos(ended.saturating_duration_since(this.clock.started)),
            Ordering::Relaxed,
        );
        if gated {
            this.gate.release();
        }
        *this.yielded = true;
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waker() -> Waker {
        Waker::noop().clone()
    }

    fn used(share: &CpuShare) -> Duration {
        Duration::from_nanos(share.used_ns.load(Ordering::Relaxed))
    }

    fn share(used: Duration) -> CpuShare {
        let share = CpuShare::default();
        share.used_ns.store(
            u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        share
    }

    #[test]
    fn the_least_served_waiter_gets_the_next_slot_whatever_its_arrival() {
        let gate = CpuGate::new(1);
        let runner = share(Duration::ZERO);
        let busy = share(Duration::from_millis(10));
        let light = share(Duration::from_millis(1));
        let (mut running, mut busy_turn, mut light_turn) = (None, None, None);
        assert!(gate.acquire(&runner, 1, &mut running, &waker()));
        assert!(!gate.acquire(&busy, 2, &mut busy_turn, &waker()));
        assert!(!gate.acquire(&light, 3, &mut light_turn, &waker()));
        gate.release();
        // The light plugin queued last but has used less: it runs first.
        assert!(!gate.acquire(&busy, 2, &mut busy_turn, &waker()));
        assert!(gate.acquire(&light, 3, &mut light_turn, &waker()));
        gate.release();
        assert!(gate.acquire(&busy, 2, &mut busy_turn, &waker()));
        gate.release();
        // Nobody waits: the slot is free again.
        let mut again = None;
        assert!(gate.acquire(&busy, 4, &mut again, &waker()));
    }

    #[test]
    fn a_dropped_waiter_hands_its_slot_on() {
        let gate = CpuGate::new(1);
        let share = CpuShare::default();
        let (mut first, mut second, mut third) = (None, None, None);
        assert!(gate.acquire(&share, 1, &mut first, &waker()));
        assert!(!gate.acquire(&share, 2, &mut second, &waker()));
        assert!(!gate.acquire(&share, 3, &mut third, &waker()));
        // The slot goes to ticket 2, which is dropped before it runs: ticket 3 gets it.
        gate.release();
        gate.abandon(2, second);
        assert!(gate.acquire(&share, 3, &mut third, &waker()));
        // A queued waiter that is dropped leaves the queue.
        let mut fourth = None;
        assert!(!gate.acquire(&share, 4, &mut fourth, &waker()));
        gate.abandon(4, fourth);
        gate.release();
        let mut fifth = None;
        assert!(gate.acquire(&share, 5, &mut fifth, &waker()));
    }

    #[test]
    fn an_idle_plugin_comes_back_at_most_the_catch_up_behind() {
        let gate = CpuGate::new(1);
        let busy = share(Duration::from_secs(3));
        let idle = CpuShare::default();
        let (mut busy_turn, mut idle_turn) = (None, None);
        assert!(gate.acquire(&busy, 1, &mut busy_turn, &waker()));
        gate.release();
        assert!(gate.acquire(&idle, 2, &mut idle_turn, &waker()));
        gate.release();
        assert_eq!(used(&idle), Duration::from_secs(3) - CATCH_UP);
    }

    #[test]
    fn a_first_poll_runs_at_once_and_later_polls_wait_their_turn() {
        let gate = CpuGate::new(1);
        let share = CpuShare::default();
        let mut other = None;
        assert!(gate.acquire(&share, 1_000, &mut other, &waker()));
        let inner_polls = std::cell::Cell::new(0);
        let call = std::future::poll_fn(|_| {
            inner_polls.set(inner_polls.get() + 1);
            if inner_polls.get() == 2 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let clock = CallClock::start();
        let mut call = std::pin::pin!(Fair::new(&gate, &share, &clock, call));
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        // The slot is taken, yet the first poll runs.
        assert!(call.as_mut().poll(&mut cx).is_pending());
        assert_eq!(inner_polls.get(), 1);
        // Having yielded, the call waits for the slot.
        assert!(call.as_mut().poll(&mut cx).is_pending());
        assert_eq!(inner_polls.get(), 1);
        gate.release();
        assert!(call.as_mut().poll(&mut cx).is_ready());
        assert_eq!(inner_polls.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_is_charged_for_its_polls_and_frees_its_slot() {
        let gate = CpuGate::new(1);
        let share = CpuShare::default();
        let mut polls = 0;
        let burn = std::future::poll_fn(|cx| {
            let until = Instant::now() + Duration::from_millis(2);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            polls += 1;
            if polls == 3 {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        let clock = CallClock::start();
        Fair::new(&gate, &share, &clock, burn).await;
        assert!(clock.cpu() >= Duration::from_millis(6), "{:?}", clock.cpu());
        assert!(clock.elapsed() >= clock.cpu(), "{clock:?}");
        assert!(
            used(&share) >= Duration::from_millis(6),
            "{:?}",
            used(&share)
        );
        let mut next = None;
        assert!(gate.acquire(&share, 99, &mut next, &waker()));
    }
}
