//! Reconnect backoff: exponential with jitter, pure so it can be tested without a clock.

use std::time::Duration;

/// Backoff policy.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the delay randomised in both directions (0.2 = +-20 %).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        // 200 ms first retry so a restarted coordinator is rejoined quickly; 5 s cap keeps
        // a fleet of thousands from hammering a recovering coordinator in lockstep while
        // still reconnecting within seconds.
        Self { base: Duration::from_millis(200), max: Duration::from_secs(5), jitter: 0.2 }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (0-based). `unit` in [0, 1) supplies the jitter.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self.base.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
        let capped = exp.min(self.max.as_secs_f64());
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_bounded_jitter() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(400));
        assert_eq!(b.delay(10, 0.5), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_secs(5));
        assert!(b.delay(10, 0.0) >= Duration::from_secs(4));
        assert!(b.delay(10, 0.999) <= Duration::from_secs(6));
        assert_ne!(b.delay(3, 0.1), b.delay(3, 0.9));
    }
}
