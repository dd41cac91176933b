//! Exponential backoff with jitter for reconnecting the chat stream.

use std::time::Duration;

/// Reconnect delays: `initial` doubling per attempt up to `max`, each drawn uniformly from
/// the upper half of the current step ("equal jitter"), so a crowd of clients that lost the
/// same server spreads out instead of returning in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Returns a backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// Returns the cap of the step for the next attempt, without jitter.
    pub fn current_ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Returns the delay before the next attempt and advances.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current_ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let floor_ms = ceiling_ms / 2;
        Duration::from_millis(rand::random_range(floor_ms..=ceiling_ms))
    }

    /// Returns how many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial` (after a connection that held).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    /// 100 ms → 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_stop_at_the_cap() {
        let mut backoff = Backoff::default();
        let expected_ceilings_ms = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for ceiling_ms in expected_ceilings_ms {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_millis(ceiling_ms / 2)
                    && delay <= Duration::from_millis(ceiling_ms),
                "delay {delay:?} outside [{}, {ceiling_ms}] ms",
                ceiling_ms / 2
            );
        }
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn reset_starts_again_from_the_initial_delay() {
        let mut backoff = Backoff::default();
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
            seen.insert(backoff.next_delay());
        }
        assert!(seen.len() > 1, "all delays were equal: {seen:?}");
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..10_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
    }
}
