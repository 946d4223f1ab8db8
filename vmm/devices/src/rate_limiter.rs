//! Token-bucket rate limiting for device I/O the guest drives (virtio-blk
//! requests, virtio-net frames), after Firecracker's rate limiter: a bytes
//! bucket and an operations bucket, each with an optional one-time burst.
//!
//! Hand-written rather than taken from a crate: the limiter must tell the
//! event loop *when* to retry (a timerfd it watches), must never block, and
//! must let a request larger than the bucket through once the bucket is full
//! (running into debt) so a guest can always make progress; the rate-limit
//! crates on crates.io are async or lack the last two.
//!
//! Time is passed in (`now`), so tests drive it with a fake clock.

use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket: `size` tokens refill from empty in `refill_time_ms`;
/// `one_time_burst` extra tokens are there at start and never refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

/// Limits for one direction of one device. A missing bucket is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (blk) or frames (net).
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimiterError {
    #[error("{0}: size must be at least 1")]
    ZeroSize(&'static str),
    #[error("{0}: refill_time_ms must be at least 1")]
    ZeroRefillTime(&'static str),
    #[error("{0}: refill_time_ms must be at most {MAX_REFILL_MS} (one day)")]
    RefillTooLong(&'static str),
    #[error("cannot create the rate limiter timer: {0}")]
    Timer(String),
}

const MAX_REFILL_MS: u64 = 24 * 3600 * 1000;

impl TokenBucketConfig {
    fn validate(&self, what: &'static str) -> Result<(), RateLimiterError> {
        if self.size == 0 {
            return Err(RateLimiterError::ZeroSize(what));
        }
        if self.refill_time_ms == 0 {
            return Err(RateLimiterError::ZeroRefillTime(what));
        }
        if self.refill_time_ms > MAX_REFILL_MS {
            return Err(RateLimiterError::RefillTooLong(what));
        }
        Ok(())
    }
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.validate("bandwidth")?;
        }
        if let Some(o) = &self.ops {
            o.validate("ops")?;
        }
        Ok(())
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// A token bucket in exact integer arithmetic: the level is kept in units of
/// 1/refill_ns of a token, so refilling by `elapsed_ns * size` never rounds
/// and no fraction of a token is lost between calls.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens * refill_ns. Negative while a request larger than the bucket
    /// is being paid back.
    level: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (plus its burst) at `now`.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Self {
        let refill_ns = u128::from(config.refill_time_ms.max(1)) * 1_000_000;
        let size = config.size.max(1);
        Self {
            size,
            refill_ns,
            level: i128::from(size) * refill_ns as i128,
            burst: config.one_time_burst,
            last: now,
        }
    }

    fn capacity(&self) -> i128 {
        i128::from(self.size) * self.refill_ns as i128
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let added = elapsed.saturating_mul(u128::from(self.size));
        let added = i128::try_from(added).unwrap_or(i128::MAX);
        self.level = self.level.saturating_add(added).min(self.capacity());
    }

    /// How long until `tokens` could be taken, or None if they can be now.
    /// A request larger than the bucket needs a full bucket.
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        let needed = i128::from((tokens - from_burst).min(self.size)) * self.refill_ns as i128;
        if needed == 0 || self.level >= needed {
            return None;
        }
        let deficit = (needed - self.level) as u128;
        let ns = deficit.div_ceil(u128::from(self.size));
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Takes `tokens` (burst first); call only after `wait_for` said yes.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = i128::from(tokens - from_burst) * self.refill_ns as i128;
        self.level = self.level.saturating_sub(rest);
    }

    /// Whole tokens available now (for tests and metrics).
    pub fn available(&mut self, now: Instant) -> i64 {
        self.refill(now);
        let whole = self.level.div_euclid(self.refill_ns as i128);
        i64::try_from(whole).unwrap_or(i64::MAX) + i64::try_from(self.burst).unwrap_or(0)
    }
}

/// Both buckets plus the timer that wakes the device when tokens are back.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Option<TimerFd>,
    /// Set when a request was refused; cleared by the timer event.
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl RateLimiter {
    /// Lets everything through; needs no timer.
    pub fn unlimited() -> Self {
        Self {
            bandwidth: None,
            ops: None,
            timer: None,
            blocked: false,
        }
    }

    pub fn new(config: &RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        config.validate()?;
        if config.is_unlimited() {
            return Ok(Self::unlimited());
        }
        let timer = TimerFd::new().map_err(|e| RateLimiterError::Timer(e.to_string()))?;
        Ok(Self {
            bandwidth: config.bandwidth.as_ref().map(|c| TokenBucket::new(c, now)),
            ops: config.ops.as_ref().map(|c| TokenBucket::new(c, now)),
            timer: Some(timer),
            blocked: false,
        })
    }

    /// Asks for `bytes` and one operation. Takes both and returns true, or
    /// takes nothing, arms the timer for when they would be there, and
    /// returns false. While blocked everything is refused until the timer
    /// event (`on_timer`), so requests keep their order.
    pub fn consume(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait_bytes = self.bandwidth.as_mut().and_then(|b| b.wait_for(bytes, now));
        let wait_ops = self.ops.as_mut().and_then(|b| b.wait_for(1, now));
        match wait_bytes.max(wait_ops) {
            None => {
                if let Some(b) = &mut self.bandwidth {
                    b.take(bytes);
                }
                if let Some(o) = &mut self.ops {
                    o.take(1);
                }
                true
            }
            Some(wait) => {
                self.block_for(wait);
                false
            }
        }
    }

    fn block_for(&mut self, wait: Duration) {
        self.blocked = true;
        if let Some(timer) = &mut self.timer {
            // A zero duration would disarm the timer.
            if let Err(e) = timer.reset(wait.max(Duration::from_micros(1)), None) {
                // Unblock rather than stall the device forever.
                tracing::error!(error = %e, "rate limiter: cannot arm the timer");
                self.blocked = false;
            }
        }
    }

    /// The timer fired: tokens are back. Returns whether the device was
    /// blocked (and should now retry).
    pub fn on_timer(&mut self) -> bool {
        if let Some(timer) = &mut self.timer {
            // Only called when epoll saw it readable, so this does not block.
            let _ = timer.wait();
        }
        std::mem::replace(&mut self.blocked, false)
    }

    /// True when nothing is limited (no bucket, no timer).
    pub fn is_unlimited(&self) -> bool {
        self.timer.is_none()
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The fd to watch, if this limiter limits anything.
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Tokens left in the bytes and ops buckets.
    pub fn available(&mut self, now: Instant) -> (Option<i64>, Option<i64>) {
        (
            self.bandwidth.as_mut().map(|b| b.available(now)),
            self.ops.as_mut().map(|b| b.available(now)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time_ms: u64, one_time_burst: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_refills_linearly_and_caps_at_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 1000, 0), t0);
        assert_eq!(b.wait_for(1000, t0), None);
        b.take(1000);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.available(t0 + ms(250)), 250);
        assert_eq!(b.available(t0 + ms(999)), 999);
        assert_eq!(b.available(t0 + ms(5000)), 1000);
    }

    #[test]
    fn wait_time_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 1000, 0), t0);
        b.take(1000);
        // 100 tokens at 1 token/ms.
        assert_eq!(b.wait_for(100, t0), Some(ms(100)));
        assert_eq!(b.wait_for(100, t0 + ms(40)), Some(ms(60)));
        assert_eq!(b.wait_for(100, t0 + ms(100)), None);
    }

    #[test]
    fn oversized_request_needs_a_full_bucket_then_runs_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 100, 0), t0);
        // Larger than the bucket: allowed when full, leaves 400 tokens of debt.
        assert_eq!(b.wait_for(500, t0), None);
        b.take(500);
        assert_eq!(b.available(t0), -400);
        // One token needs the debt paid back first: 401 ms at 1 token/ms.
        assert_eq!(b.wait_for(1, t0), Some(ms(401)));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(10, 1000, 50), t0);
        assert_eq!(b.available(t0), 60);
        assert_eq!(b.wait_for(55, t0), None);
        b.take(55);
        assert_eq!(b.available(t0), 5);
        assert_eq!(b.available(t0 + ms(10_000)), 10);
    }

    #[test]
    fn limiter_refuses_then_allows_after_the_wait_with_a_fake_clock() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(bucket(4096, 100, 0)),
            ops: Some(bucket(2, 100, 0)),
        };
        let mut rl = RateLimiter::new(&config, t0).unwrap();
        assert!(rl.timer_fd().is_some());
        assert!(rl.consume(1024, t0));
        assert!(rl.consume(1024, t0));
        // Ops exhausted (2 per 100 ms): refused, nothing taken.
        assert!(!rl.consume(1024, t0));
        assert!(rl.is_blocked());
        assert_eq!(rl.available(t0), (Some(2048), Some(0)));
        // Blocked until the timer says otherwise, even if time passed.
        assert!(!rl.consume(1, t0 + ms(60)));
        assert!(rl.on_timer_without_read());
        assert!(rl.consume(1024, t0 + ms(60)));
        // 2048 + 60 ms of refill (2457) caps at 4096; 1024 taken.
        assert_eq!(rl.available(t0 + ms(60)), (Some(3072), Some(0)));
    }

    #[test]
    fn bandwidth_alone_limits_bytes_per_second() {
        // 1 MiB/s: over a simulated second a flood of 64 KiB requests gets
        // 1 MiB (the full bucket) plus one second of refill, never more.
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(bucket(1 << 20, 1000, 0)),
            ops: None,
        };
        let mut rl = RateLimiter::new(&config, t0).unwrap();
        let mut served = 0u64;
        let mut now = t0;
        while now < t0 + ms(1000) {
            if rl.consume(64 << 10, now) {
                served += 64 << 10;
            } else {
                rl.on_timer_without_read();
                now += ms(1);
            }
        }
        assert!(served <= 2 << 20, "{served}");
        assert!(served >= (2 << 20) - (64 << 10), "{served}");
    }

    #[test]
    fn the_timer_fires_after_the_wait() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, 20, 0)),
        };
        let mut rl = RateLimiter::new(&config, t0).unwrap();
        assert!(rl.consume(0, t0));
        assert!(!rl.consume(0, t0));
        let fd = rl.timer_fd().unwrap();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(ready, 1);
        assert!(rl.on_timer());
        assert!(!rl.is_blocked());
    }

    #[test]
    fn unlimited_and_invalid_configs() {
        let mut rl = RateLimiter::unlimited();
        assert!(rl.timer_fd().is_none());
        assert!(rl.consume(u64::MAX, Instant::now()));
        let t0 = Instant::now();
        assert!(RateLimiter::new(&RateLimiterConfig::default(), t0)
            .unwrap()
            .timer_fd()
            .is_none());
        let zero = RateLimiterConfig {
            bandwidth: Some(bucket(0, 100, 0)),
            ops: None,
        };
        assert_eq!(
            RateLimiter::new(&zero, t0).err(),
            Some(RateLimiterError::ZeroSize("bandwidth"))
        );
        let no_refill = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, 0, 0)),
        };
        assert_eq!(
            no_refill.validate(),
            Err(RateLimiterError::ZeroRefillTime("ops"))
        );
    }

    #[test]
    fn config_json_shape() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "refill_time_ms": 1000}, "ops": {"size": 100, "one_time_burst": 10, "refill_time_ms": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.bandwidth.unwrap().size, 1 << 20);
        assert_eq!(c.ops.unwrap().one_time_burst, 10);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwith": {}}"#).is_err());
    }

    impl RateLimiter {
        /// The timer's effect without waiting on the real fd.
        fn on_timer_without_read(&mut self) -> bool {
            std::mem::replace(&mut self.blocked, false)
        }
    }
}
