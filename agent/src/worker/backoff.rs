//! Reconnect delays (STYLE.md §4.1): a random delay within a cap that doubles from 100 ms to 8 s,
//! so a controller that comes back is not hit by every node at the same instant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) const INITIAL: Duration = Duration::from_millis(100);
pub(crate) const MAX: Duration = Duration::from_secs(8);

/// Capped exponential back-off with full jitter ("a random delay within the cap").
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    cap: Duration,
    rng: Jitter,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            cap: INITIAL,
            rng: Jitter::seeded(),
        }
    }

    /// The next delay: at least half the current cap (never a hot loop), at most the cap; the
    /// cap then doubles up to `MAX`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(MAX);
        let half = cap / 2;
        half + self.rng.below(cap - half)
    }

    /// A session got through registration: the next failure starts from the bottom again.
    pub(crate) fn reset(&mut self) {
        self.cap = INITIAL;
    }
}

/// A small xorshift generator: jitter needs spread, not cryptographic quality, and the agent
/// needs no dependency for it.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn seeded() -> Jitter {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A duration in `[0, limit)` (zero for a zero limit).
    pub(crate) fn below(&mut self, limit: Duration) -> Duration {
        let nanos = limit.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % nanos)
    }

    /// `period` spread by ±10 %, so heartbeats of many nodes do not line up.
    pub(crate) fn spread(&mut self, period: Duration) -> Duration {
        let tenth = period / 10;
        period - tenth + self.below(tenth * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_a_doubling_cap_up_to_eight_seconds() {
        let mut b = Backoff::new();
        let mut cap = INITIAL;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= cap / 2 && d <= cap, "{d:?} not within {cap:?}");
            cap = (cap * 2).min(MAX);
        }
        assert_eq!(cap, MAX);
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }

    #[test]
    fn spread_stays_within_ten_percent() {
        let mut j = Jitter::seeded();
        let p = Duration::from_secs(5);
        for _ in 0..100 {
            let d = j.spread(p);
            assert!(d >= Duration::from_millis(4500) && d < Duration::from_millis(5500));
        }
    }
}
