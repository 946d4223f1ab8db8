//! OOM events from the guest, bounded and validated before they reach
//! containerd.
//!
//! The agent's event stream is guest-controlled: it can name any container
//! id and send events as fast as the vsock carries them. The shim's event
//! queue also carries exits, which must never be dropped, so OOM events are
//! gated *before* it: an id the pod does not know is dropped and counted,
//! and what passes is limited by a token bucket (a burst, then a steady
//! rate), the excess dropped and counted. The queue then grows by at most
//! that rate, and a flood can neither mark another tenant's container
//! OOMKilled nor crowd out this pod's exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Events let through at once after a quiet period.
pub const BURST: u32 = 32;
/// Steady rate let through: one event per this interval.
pub const REFILL_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct OomCounters {
    pub forwarded: AtomicU64,
    pub unknown_container: AtomicU64,
    pub rate_limited: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    UnknownContainer,
    RateLimited,
}

/// The gate for one pod's event stream.
#[derive(Debug)]
pub struct OomGate {
    tokens: u32,
    last_refill: Instant,
    pub counters: OomCounters,
}

impl Default for OomGate {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl OomGate {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            last_refill: now,
            counters: OomCounters::default(),
        }
    }

    /// Decides about one event naming `container_id`, with `known` telling
    /// whether the pod has that container. Logs drops, rate-limited (first,
    /// then every power of two).
    pub fn check(&mut self, container_id: &str, known: bool, now: Instant) -> Verdict {
        if !known {
            let n = self
                .counters
                .unknown_container
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    "guest sent an OOM event for unknown container {:?}; dropped ({n} so far)",
                    container_id.chars().take(80).collect::<String>()
                );
            }
            return Verdict::UnknownContainer;
        }
        self.refill(now);
        if self.tokens == 0 {
            let n = self.counters.rate_limited.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!("OOM events from the guest over the rate limit; dropped {n} so far");
            }
            return Verdict::RateLimited;
        }
        self.tokens -= 1;
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        Verdict::Forward
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let new = elapsed.as_nanos() / REFILL_EVERY.as_nanos();
        if new == 0 {
            return;
        }
        let new = u32::try_from(new).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(new).min(BURST);
        self.last_refill += REFILL_EVERY * new.min(BURST);
        if self.tokens == BURST {
            self.last_refill = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_containers_are_dropped_and_counted() {
        let now = Instant::now();
        let mut gate = OomGate::new(now);
        assert_eq!(
            gate.check("other-tenant", false, now),
            Verdict::UnknownContainer
        );
        assert_eq!(gate.check("c1", true, now), Verdict::Forward);
        assert_eq!(gate.counters.unknown_container.load(Ordering::Relaxed), 1);
        assert_eq!(gate.counters.forwarded.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flood_is_cut_to_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut gate = OomGate::new(start);
        let passed = (0..10_000)
            .filter(|_| gate.check("c1", true, start) == Verdict::Forward)
            .count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(
            gate.counters.rate_limited.load(Ordering::Relaxed),
            10_000 - u64::from(BURST)
        );
        // One second later: ten more.
        let later = start + Duration::from_secs(1);
        let passed = (0..1000)
            .filter(|_| gate.check("c1", true, later) == Verdict::Forward)
            .count();
        assert_eq!(passed, 10);
        // After a long quiet period, the burst again, not more.
        let much_later = later + Duration::from_secs(3600);
        let passed = (0..1000)
            .filter(|_| gate.check("c1", true, much_later) == Verdict::Forward)
            .count();
        assert_eq!(passed, BURST as usize);
    }
}
