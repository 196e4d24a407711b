//! A token bucket shared by all transfers of one kind (e.g. `--upload-rate`),
//! with two priority classes: a node's own reads ([`Priority::High`]) are
//! served before uploads to peers ([`Priority::Low`]), which wait as long as
//! any high-priority acquire is pending.
//!
//! The token arithmetic is the pure [`Bucket`] (time is passed in); the
//! [`RateLimiter`] around it only adds a lock and tokio sleeps.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Below this, a burst would make every 16 KiB write wait separately.
const MIN_BURST: u64 = 16 * 1024;
/// A tenth of a second of traffic: enough to smooth scheduling jitter, small
/// enough that a measured rate holds over a second or two.
const BURST_DIVISOR: u64 = 10;
/// Float slack so a sleep computed for exactly the missing tokens counts as
/// enough once it has passed.
const EPSILON: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// The node's own client reads.
    High,
    /// Serving other peers.
    Low,
}

/// Token arithmetic of one bucket: `rate` tokens (bytes) per second, at most
/// `burst` saved up. A request larger than the burst is granted once the
/// bucket is full and leaves it in debt, so big requests are never starved
/// and the long-run rate still holds.
#[derive(Clone, Debug)]
pub(super) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Duration,
}

impl Bucket {
    /// A full bucket at `now` (an offset from any fixed origin). `rate` must
    /// be non-zero; zero means "no limit", which [`RateLimiter`] handles.
    pub(super) fn new(rate: u64, now: Duration) -> Self {
        assert!(rate > 0, "a zero rate means unlimited: no bucket");
        let burst = (rate / BURST_DIVISOR).max(MIN_BURST) as f64;
        Self {
            rate: rate as f64,
            burst,
            tokens: burst,
            at: now,
        }
    }

    pub(super) fn burst(&self) -> u64 {
        self.burst as u64
    }

    fn refill(&mut self, now: Duration) {
        // Time never runs backwards here, even if a caller's clock does.
        if now > self.at {
            let dt = (now - self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            self.at = now;
        }
    }

    /// How long until `n` tokens are there, not counting any refill after the
    /// last `take`.
    pub(super) fn time_for(&self, n: u64) -> Duration {
        let need = (n as f64).min(self.burst);
        if self.tokens + EPSILON >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate)
        }
    }

    /// Takes `n` tokens at `now`, or says how long to wait before trying again.
    pub(super) fn take(&mut self, n: u64, now: Duration) -> Result<(), Duration> {
        self.refill(now);
        match self.time_for(n) {
            Duration::ZERO => {
                self.tokens -= n as f64;
                Ok(())
            }
            wait => Err(wait),
        }
    }
}

/// A shared limiter; `RateLimiter::new(0)` lets everything through at once.
pub struct RateLimiter {
    limited: Option<Limited>,
}

struct Limited {
    origin: Instant,
    burst: u64,
    state: Mutex<State>,
}

struct State {
    bucket: Bucket,
    high_waiting: usize,
}

impl RateLimiter {
    /// `bytes_per_sec == 0` is unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        if bytes_per_sec == 0 {
            return Self::unlimited();
        }
        let bucket = Bucket::new(bytes_per_sec, Duration::ZERO);
        Self {
            limited: Some(Limited {
                origin: Instant::now(),
                burst: bucket.burst(),
                state: Mutex::new(State {
                    bucket,
                    high_waiting: 0,
                }),
            }),
        }
    }

    pub fn unlimited() -> Self {
        Self { limited: None }
    }

    pub fn is_unlimited(&self) -> bool {
        self.limited.is_none()
    }

    pub async fn acquire_high(&self, n: u64) {
        self.acquire(n, Priority::High).await
    }

    pub async fn acquire_low(&self, n: u64) {
        self.acquire(n, Priority::Low).await
    }

    /// Waits until `n` bytes may pass. Cancel-safe: a dropped acquire gives
    /// up its place (tokens already taken for earlier steps stay spent).
    pub async fn acquire(&self, n: u64, priority: Priority) {
        let Some(l) = &self.limited else { return };
        let _pending = (priority == Priority::High).then(|| HighPending::new(l));
        // Taking at most a burst per step lets a high-priority acquire slip in
        // between the steps of a large low-priority one.
        let mut left = n;
        while left > 0 {
            let step = left.min(l.burst);
            let outcome = {
                let mut st = l.state.lock().unwrap_or_else(|e| e.into_inner());
                if priority == Priority::Low && st.high_waiting > 0 {
                    // Roughly when the high-priority side will have had a step.
                    Err(st.bucket.time_for(step).max(Duration::from_millis(1)))
                } else {
                    st.bucket.take(step, l.origin.elapsed())
                }
            };
            match outcome {
                Ok(()) => left -= step,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// Counts a pending high-priority acquire for as long as it lives.
struct HighPending<'a>(&'a Limited);

impl<'a> HighPending<'a> {
    fn new(l: &'a Limited) -> Self {
        l.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .high_waiting += 1;
        Self(l)
    }
}

impl Drop for HighPending<'_> {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .high_waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bucket_starts_full_and_refills_at_the_rate() {
        let mut b = Bucket::new(1_000_000, Duration::ZERO);
        assert_eq!(b.burst(), 100_000);
        assert_eq!(b.take(100_000, Duration::ZERO), Ok(()));
        assert_eq!(b.take(1_000, Duration::ZERO), Err(MS));
        assert_eq!(b.take(1_000, MS), Ok(()));
        // Refill stops at the burst.
        assert_eq!(b.take(100_000, Duration::from_secs(10)), Ok(()));
        assert!(b.take(1, Duration::from_secs(10)).is_err());
    }

    #[test]
    fn oversized_requests_wait_for_a_full_bucket_then_leave_debt() {
        let mut b = Bucket::new(1_000_000, Duration::ZERO);
        assert_eq!(b.take(300_000, Duration::ZERO), Ok(()));
        // 200_000 of debt plus the next 1_000.
        assert_eq!(
            b.take(1_000, Duration::ZERO),
            Err(Duration::from_millis(201))
        );
        assert_eq!(b.take(1_000, Duration::from_millis(201)), Ok(()));
    }

    #[test]
    fn time_running_backwards_is_ignored() {
        let mut b = Bucket::new(1_000_000, Duration::from_secs(5));
        assert_eq!(b.take(100_000, Duration::from_secs(5)), Ok(()));
        assert!(b.take(1_000, Duration::from_secs(1)).is_err());
        assert_eq!(b.take(1_000, Duration::from_secs(5) + MS), Ok(()));
    }

    #[test]
    fn pure_rate_holds_over_a_simulated_interval() {
        let rate = 3_000_000;
        let mut b = Bucket::new(rate, Duration::ZERO);
        let (mut now, mut sent) = (Duration::ZERO, 0u64);
        let end = Duration::from_secs(20);
        while now < end {
            match b.take(40_000, now) {
                Ok(()) => sent += 40_000,
                Err(wait) => now += wait,
            }
        }
        let expected = rate as f64 * end.as_secs_f64() + b.burst() as f64;
        let err = (sent as f64 - expected).abs() / expected;
        assert!(err < 0.01, "sent {sent}, expected {expected}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let l = RateLimiter::new(0);
        let t = Instant::now();
        l.acquire_low(u64::MAX).await;
        l.acquire_high(u64::MAX).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn async_rate_holds_within_a_few_percent() {
        let rate = 2 * 1024 * 1024;
        let l = RateLimiter::new(rate);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(10) {
            l.acquire_low(64 * 1024).await;
            sent += 64 * 1024;
        }
        let secs = start.elapsed().as_secs_f64();
        let measured = sent as f64 / secs;
        let err = (measured - rate as f64).abs() / rate as f64;
        assert!(err < 0.03, "{measured} B/s over {secs} s for {rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn high_priority_goes_first() {
        let rate = 1024 * 1024;
        let l = Arc::new(RateLimiter::new(rate));
        l.acquire_high(l.limited.as_ref().unwrap().burst).await; // drain
        let start = Instant::now();
        let low = tokio::spawn({
            let l = l.clone();
            async move {
                l.acquire_low(rate).await;
                start.elapsed()
            }
        });
        // Let the low acquire start waiting first.
        tokio::task::yield_now().await;
        let high = tokio::spawn({
            let l = l.clone();
            async move {
                l.acquire_high(rate / 2).await;
                start.elapsed()
            }
        });
        let (low, high) = (low.await.unwrap(), high.await.unwrap());
        assert!(high < low, "high done at {high:?}, low at {low:?}");
        // High gets nearly the whole rate while it waits; low the rest.
        assert!(high <= Duration::from_millis(650), "{high:?}");
        let total = low.as_secs_f64();
        assert!((1.4..1.7).contains(&total), "{low:?}");
    }
}
