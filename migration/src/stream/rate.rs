//! [`RateLimiter`]: a token bucket in bytes, refilled from real (monotonic) time, that tells
//! the stream writer how long to wait before it may send more.

use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, holding at most `burst` bytes of credit.
///
/// The writer asks before each write to the transport; a write larger than the bucket
/// takes the credit into debt and waits for it to refill, so any size of write passes and
/// the long-run rate stays `rate`.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: u64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A bucket of `rate` bytes per second (at least 1), starting full, holding a tenth of
    /// a second's worth (at least 64 KiB: one write's worth of small pages).
    pub fn new(rate: u64) -> RateLimiter {
        let rate = rate.max(1);
        let burst = (rate as f64 / 10.0).max(64.0 * 1024.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst);
        self.last = now;
    }

    /// Takes `n` bytes of credit at `now` and returns how long to wait before sending them
    /// (zero when the bucket held enough).
    pub fn take_at(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// Whether `n` more bytes could go now without waiting.
    pub fn has_credit_at(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n as f64
    }

    /// [`take_at`](Self::take_at) now, sleeping for the wait it returns.
    pub fn take(&mut self, n: u64) {
        let wait = self.take_at(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_the_rate_and_caps_at_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1_000_000);
        r.last = t0;
        // Burst: 100 KB of credit at the start.
        assert_eq!(r.take_at(100_000, t0), Duration::ZERO);
        // Another 50 KB needs 50 ms.
        let w = r.take_at(50_000, t0);
        assert!((w.as_secs_f64() - 0.05).abs() < 1e-6, "{w:?}");
        // A long idle time refills no more than the burst.
        let later = t0 + Duration::from_secs(10);
        assert!(r.has_credit_at(100_000, later));
        assert!(!r.has_credit_at(100_001, later));
    }

    #[test]
    fn any_size_passes_and_the_long_run_rate_holds() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10_000_000);
        r.last = t0;
        let mut now = t0;
        for _ in 0..100 {
            now += r.take_at(1 << 20, now);
        }
        let secs = now.duration_since(t0).as_secs_f64();
        let want = (100.0 * (1 << 20) as f64 - 1_000_000.0) / 10_000_000.0;
        assert!((secs - want).abs() < 1e-3, "{secs} vs {want}");
    }
}
