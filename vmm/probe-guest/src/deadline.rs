//! Time limits for polling loops, so a broken VMM makes the probe fail
//! instead of hang. Time comes from the TSC (native in ring 3); a spin cap
//! backs it up in case the TSC does not advance.

use core::arch::x86_64::{__cpuid, _rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

/// Assumed when CPUID does not say; a slower real TSC only lengthens limits.
const FALLBACK_TICKS_PER_MS: u64 = 3_000_000;
/// A spin (pause + rdtsc) takes well over 5 ns, so 200k spins per ms is an
/// upper bound that the TSC limit normally beats.
const MAX_SPINS_PER_MS: u64 = 200_000;

static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

pub struct Deadline {
    end_tsc: u64,
    spins_left: u64,
}

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Self {
            end_tsc: rdtsc().saturating_add(ms.saturating_mul(ticks_per_ms())),
            spins_left: ms.saturating_mul(MAX_SPINS_PER_MS),
        }
    }

    /// Counts one spin and tells whether time is up.
    pub fn expired(&mut self) -> bool {
        self.spins_left = self.spins_left.saturating_sub(1);
        self.spins_left == 0 || rdtsc() >= self.end_tsc
    }
}

/// Spins until `ready` returns `Some` or `ms` milliseconds pass.
pub fn poll<T>(ms: u64, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let mut deadline = Deadline::after_ms(ms);
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if deadline.expired() {
            return None;
        }
        core::hint::spin_loop();
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is left clear, so ring 3 may use it.
    unsafe { _rdtsc() }
}

fn ticks_per_ms() -> u64 {
    let cached = TICKS_PER_MS.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let ticks = tsc_hz_from_cpuid()
        .map(|hz| hz / 1000)
        .filter(|ticks| (500_000..=10_000_000).contains(ticks))
        .unwrap_or(FALLBACK_TICKS_PER_MS);
    TICKS_PER_MS.store(ticks, Ordering::Relaxed);
    ticks
}

/// TSC frequency from leaf 0x15 (crystal ratio) or 0x16 (base MHz).
fn tsc_hz_from_cpuid() -> Option<u64> {
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        let leaf = __cpuid(0x15);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            return Some(u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax));
        }
    }
    if max_leaf >= 0x16 {
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_returns_value_or_times_out() {
        let mut calls = 0;
        assert_eq!(
            poll(1000, || {
                calls += 1;
                (calls == 3).then_some(7)
            }),
            Some(7)
        );
        let start = std::time::Instant::now();
        assert_eq!(poll::<()>(20, || None), None);
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(5), "{waited:?}");
        assert!(waited < std::time::Duration::from_secs(5), "{waited:?}");
    }
}
