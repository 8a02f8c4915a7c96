//! Full-jitter exponential backoff: each delay is drawn uniformly from zero to the capped
//! exponential step, so a fleet cut off at once does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// An endless backoff schedule; `backon` retries as long as it yields delays.
#[derive(Clone, Debug)]
pub struct FullJitter {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl FullJitter {
    pub fn new(min: Duration, max: Duration) -> Self {
        FullJitter {
            min,
            max,
            attempt: 0,
        }
    }

    /// The ceiling of the next draw: `min * 2^attempt`, capped at `max`.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

impl Iterator for FullJitter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // The cap applies before the jitter is drawn: the draw covers the whole capped range.
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(rand::rng().random_range(0..=nanos)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_grows_then_caps() {
        let mut b = FullJitter::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                b.next();
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn draws_stay_within_the_capped_range_and_spread() {
        let b = FullJitter::new(Duration::from_millis(100), Duration::from_secs(2));
        let draws: Vec<Duration> = b.skip(10).take(2000).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(2)));
        let low = draws
            .iter()
            .filter(|d| **d < Duration::from_millis(500))
            .count();
        let high = draws
            .iter()
            .filter(|d| **d > Duration::from_millis(1500))
            .count();
        // Uniform over [0, 2s]: about a quarter of draws in each tail.
        assert!(low > 300 && high > 300, "low {low}, high {high}");
    }

    #[test]
    fn never_ends_and_survives_huge_attempt_counts() {
        let mut b = FullJitter::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next().is_some());
        }
    }
}
