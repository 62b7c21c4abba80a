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

/// Round-trip times between regions: the proxy's RTT table (which region is next
/// closest) and, in `aloft dev`, the delay injected into each cross-region forward.
///
/// Pairs set explicitly win; other pairs of known Fly regions get an estimate from
/// their great-circle distance (light in fibre, ~200 km/ms, on a path 1.5× the straight
/// line, plus 2 ms), which lands near measured inter-region RTTs (ams–iad ≈ 95 ms,
/// iad–syd ≈ 235 ms); pairs involving an unknown region get [`LatencyMatrix::UNKNOWN`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyMatrix {
    pairs: std::collections::HashMap<(String, String), std::time::Duration>,
}

/// A `--region-latency` value that cannot be used; `item` is the offending piece.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("region latency {item:?}: {why}")]
pub struct LatencyMatrixError {
    pub item: String,
    pub why: String,
}

/// Approximate locations (latitude, longitude) of Fly's regions.
const REGION_COORDS: &[(&str, f64, f64)] = &[
    ("ams", 52.37, 4.90),
    ("arn", 59.65, 17.93),
    ("atl", 33.64, -84.43),
    ("bog", 4.70, -74.15),
    ("bom", 19.09, 72.87),
    ("bos", 42.36, -71.01),
    ("cdg", 49.01, 2.55),
    ("den", 39.86, -104.67),
    ("dfw", 32.90, -97.04),
    ("ewr", 40.69, -74.17),
    ("eze", -34.82, -58.54),
    ("fra", 50.03, 8.57),
    ("gdl", 20.52, -103.31),
    ("gig", -22.81, -43.25),
    ("gru", -23.43, -46.47),
    ("hkg", 22.31, 113.91),
    ("iad", 38.95, -77.46),
    ("jnb", -26.14, 28.24),
    ("lax", 33.94, -118.41),
    ("lhr", 51.47, -0.45),
    ("mad", 40.47, -3.56),
    ("mia", 25.79, -80.29),
    ("nrt", 35.77, 140.39),
    ("ord", 41.97, -87.90),
    ("otp", 44.57, 26.08),
    ("phx", 33.43, -112.01),
    ("qro", 20.62, -100.19),
    ("scl", -33.39, -70.79),
    ("sea", 47.45, -122.31),
    ("sin", 1.36, 103.99),
    ("sjc", 37.36, -121.93),
    ("syd", -33.94, 151.18),
    ("waw", 52.17, 20.97),
    ("yul", 45.47, -73.74),
    ("yyz", 43.68, -79.63),
];

impl LatencyMatrix {
    /// The round trip assumed between regions nobody measured.
    pub const UNKNOWN: std::time::Duration = std::time::Duration::from_millis(50);

    /// Parse `ams-iad=80ms,iad-syd=200ms` (also `s`, or a bare number of ms; commas or
    /// newlines between pairs; `#` starts a comment). Pairs are symmetric.
    pub fn parse(text: &str) -> Result<LatencyMatrix, LatencyMatrixError> {
        let mut m = LatencyMatrix::default();
        for item in text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let bad = |why: &str| LatencyMatrixError {
                item: item.to_string(),
                why: why.to_string(),
            };
            let (pair, value) = item
                .split_once('=')
                .ok_or_else(|| bad("expected REGION-REGION=DURATION, e.g. ams-iad=80ms"))?;
            let (a, b) = pair
                .trim()
                .split_once('-')
                .ok_or_else(|| bad("expected two regions joined by '-'"))?;
            let (a, b) = (a.trim(), b.trim());
            if a.is_empty() || b.is_empty() {
                return Err(bad("a region name is empty"));
            }
            let v = value.trim();
            let d = if let Some(ms) = v.strip_suffix("ms") {
                ms.trim()
                    .parse::<f64>()
                    .map(|x| x / 1000.0)
                    .map_err(|_| bad("not a number of ms"))?
            } else if let Some(s) = v.strip_suffix('s') {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| bad("not a number of s"))?
            } else {
                v.parse::<f64>()
                    .map(|x| x / 1000.0)
                    .map_err(|_| bad("not a duration"))?
            };
            if !(0.0..=60.0).contains(&d) {
                return Err(bad("must be between 0 and 60 s"));
            }
            m.set(a, b, std::time::Duration::from_secs_f64(d));
        }
        Ok(m)
    }

    /// Set the round trip between `a` and `b` (both ways).
    pub fn set(&mut self, a: &str, b: &str, rtt: std::time::Duration) {
        self.pairs.insert((a.to_string(), b.to_string()), rtt);
        self.pairs.insert((b.to_string(), a.to_string()), rtt);
    }

    /// The round trip between two regions (zero within one).
    pub fn rtt(&self, a: &str, b: &str) -> std::time::Duration {
        if a == b {
            return std::time::Duration::ZERO;
        }
        if let Some(d) = self.pairs.get(&(a.to_string(), b.to_string())) {
            return *d;
        }
        let pos = |r: &str| {
            REGION_COORDS
                .iter()
                .find(|(n, _, _)| *n == r)
                .map(|(_, lat, lon)| (*lat, *lon))
        };
        match (pos(a), pos(b)) {
            (Some(p), Some(q)) => {
                let km = great_circle_km(p, q);
                std::time::Duration::from_secs_f64((2.0 * km * 1.5 / 200.0 + 2.0) / 1000.0)
            }
            _ => Self::UNKNOWN,
        }
    }

    /// `regions` other than `own`, nearest first (ties by name).
    pub fn order<'a>(&self, own: &str, regions: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut v: Vec<&str> = regions.into_iter().filter(|r| *r != own).collect();
        v.sort_unstable();
        v.dedup();
        v.sort_by_key(|r| self.rtt(own, r));
        v.into_iter().map(str::to_owned).collect()
    }
}

fn great_circle_km((lat1, lon1): (f64, f64), (lat2, lon2): (f64, f64)) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

#[cfg(test)]
mod latency_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_pairs_and_orders_by_rtt() {
        let m = LatencyMatrix::parse("ams-iad=80ms, iad-syd=0.2s\n# comment\nams-syd=270").unwrap();
        assert_eq!(m.rtt("iad", "ams"), Duration::from_millis(80));
        assert_eq!(m.rtt("syd", "iad"), Duration::from_millis(200));
        assert_eq!(m.rtt("ams", "syd"), Duration::from_millis(270));
        assert_eq!(m.rtt("ams", "ams"), Duration::ZERO);
        assert_eq!(m.order("ams", ["syd", "iad", "ams"]), ["iad", "syd"]);
        assert_eq!(m.order("syd", ["ams", "iad"]), ["iad", "ams"]);
        let e = LatencyMatrix::parse("ams-iad=fast").unwrap_err();
        assert_eq!(e.item, "ams-iad=fast");
        assert!(LatencyMatrix::parse("amsiad=3ms").is_err());
    }

    #[test]
    fn default_rtts_follow_geography() {
        let m = LatencyMatrix::default();
        let ms = |a, b| m.rtt(a, b).as_millis();
        assert!(
            (70..=100).contains(&ms("ams", "iad")),
            "{}",
            ms("ams", "iad")
        );
        assert!(
            (200..=300).contains(&ms("ams", "syd")),
            "{}",
            ms("ams", "syd")
        );
        assert!(ms("ams", "fra") < 20);
        assert_eq!(m.rtt("ams", "nowhere"), LatencyMatrix::UNKNOWN);
        assert_eq!(m.order("ams", ["syd", "iad", "fra"]), ["fra", "iad", "syd"]);
    }
}
