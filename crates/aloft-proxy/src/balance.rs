//! Choosing a machine: own region first, power-of-two-choices on in-flight load,
//! admission against `hard_limit` by compare-and-swap (never exceeded), the next
//! region only when every machine of the nearer ones is at its hard limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use tokio::sync::Notify;

use crate::clock;
use crate::routes::{Backend, ServiceRoute};

/// Wakes requests waiting for a free slot whenever any slot is released.
#[derive(Debug, Default)]
pub(crate) struct Capacity {
    pub(crate) waiters: AtomicUsize,
    pub(crate) notify: Notify,
}

/// One admitted request on one machine; dropping it frees the slot.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
    capacity: Arc<Capacity>,
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.backend
            .last_active
            .store(clock::now_ms(), Ordering::Relaxed);
        if self.capacity.waiters.load(Ordering::SeqCst) > 0 {
            self.capacity.notify.notify_waiters();
        }
    }
}

/// The outcome of one attempt to choose a machine.
#[derive(Debug)]
pub(crate) enum Choice {
    Leased(Lease),
    /// Candidates exist but all are at their hard limit.
    Busy,
    /// No started machine is left to try.
    Nothing,
}

/// What constrains a choice, from the request.
#[derive(Debug, Default)]
pub(crate) struct Constraints<'a> {
    pub(crate) prefer_region: Option<&'a str>,
    pub(crate) force_instance: Option<&'a str>,
    /// Machines already tried for this request.
    pub(crate) exclude: &'a [usize],
}

fn try_acquire(b: &Backend, hard_limit: u32) -> bool {
    b.in_flight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < hard_limit).then_some(n + 1)
        })
        .is_ok()
}

pub(crate) fn choose(svc: &ServiceRoute, c: &Constraints<'_>, capacity: &Arc<Capacity>) -> Choice {
    let hard = svc.concurrency.hard_limit;
    let lease = |b: &Arc<Backend>| Lease {
        backend: Arc::clone(b),
        capacity: Arc::clone(capacity),
    };
    let excluded = |b: &Arc<Backend>| c.exclude.contains(&(Arc::as_ptr(b) as usize));

    if let Some(id) = c.force_instance {
        let found = svc
            .groups
            .iter()
            .flat_map(|g| g.backends.iter())
            .find(|b| &*b.machine_id == id && !excluded(b));
        return match found {
            None => Choice::Nothing,
            Some(b) if try_acquire(b, hard) => Choice::Leased(lease(b)),
            Some(_) => Choice::Busy,
        };
    }

    let preferred = c
        .prefer_region
        .and_then(|r| svc.groups.iter().position(|g| &*g.region == r));
    let order = preferred
        .into_iter()
        .chain((0..svc.groups.len()).filter(|i| Some(*i) != preferred));

    let now = clock::now_ms();
    let healthy = |b: &Arc<Backend>| !excluded(b) && b.failing_until.load(Ordering::Relaxed) <= now;
    let mut saw_healthy = false;
    for gi in order {
        let (saw, got) = pick_in_group(&svc.groups[gi].backends, &healthy, hard);
        saw_healthy |= saw;
        if let Some(b) = got {
            return Choice::Leased(lease(b));
        }
    }
    if saw_healthy {
        return Choice::Busy;
    }
    // Every remaining machine failed recently: try them anyway rather than refuse.
    let mut saw_any = false;
    for g in &svc.groups {
        let (saw, got) = pick_in_group(&g.backends, &|b| !excluded(b), hard);
        saw_any |= saw;
        if let Some(b) = got {
            return Choice::Leased(lease(b));
        }
    }
    if saw_any {
        Choice::Busy
    } else {
        Choice::Nothing
    }
}

/// Power of two choices among the eligible machines of one group, then a scan from a
/// random start if both are full. Returns whether any machine was eligible.
fn pick_in_group<'a>(
    group: &'a [Arc<Backend>],
    eligible: &dyn Fn(&Arc<Backend>) -> bool,
    hard: u32,
) -> (bool, Option<&'a Arc<Backend>>) {
    let n = group.len();
    if n == 0 {
        return (false, None);
    }
    if n == 1 {
        let b = &group[0];
        if !eligible(b) {
            return (false, None);
        }
        return (true, try_acquire(b, hard).then_some(b));
    }
    let mut rng = rand::thread_rng();
    let i = rng.gen_range(0..n);
    let mut j = rng.gen_range(0..n - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (&group[i], &group[j]);
    let (first, second) = if b.in_flight() < a.in_flight() {
        (b, a)
    } else {
        (a, b)
    };
    let mut saw = false;
    for cand in [first, second] {
        if eligible(cand) {
            saw = true;
            if try_acquire(cand, hard) {
                return (true, Some(cand));
            }
        }
    }
    let start = rng.gen_range(0..n);
    for k in 0..n {
        let cand = &group[(start + k) % n];
        if eligible(cand) {
            saw = true;
            if try_acquire(cand, hard) {
                return (true, Some(cand));
            }
        }
    }
    (saw, None)
}

/// Mark a machine as failing for `for_ms` milliseconds.
pub(crate) fn mark_failing(b: &Backend, for_ms: u64) {
    b.failing_until
        .store(clock::now_ms() + for_ms, Ordering::Relaxed);
}
