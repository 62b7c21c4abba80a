//! Waiting on a condition with a deadline, for code that has no event to await
//! (another process's files, a child's exit).

use std::time::{Duration, Instant};

/// Calls `check` every `every` until it returns `Some`, for at most `timeout`;
/// `None` if the deadline passed first. `check` runs at least once.
pub fn poll_for<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Calls `check` every `every` until it is true, for at most `timeout`; whether it
/// became true.
pub fn poll_until(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    poll_for(timeout, every, || check().then_some(())).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_and_gives_up_at_the_deadline() {
        let mut n = 0;
        let got = poll_for(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, Some(3));
        let t = Instant::now();
        assert!(!poll_until(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || false
        ));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
