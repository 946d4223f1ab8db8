//! The guest's wall clock, kept on the host's (issue #15).
//!
//! A pod VM may boot without a wall clock (QEMU's microvm runs with
//! `rtc=off`), and a VM that was paused or starved falls behind. The shim
//! measures the guest's CLOCK_REALTIME against its own (the agent's
//! `GetClock`, bracketed by two host reads: offset = guest minus the
//! midpoint, error = half the round trip) and steps the guest by the
//! offset (`StepClock` is relative, so its own transit adds no error). It
//! does so before the sandbox is created and then every
//! [`SYNC_INTERVAL`] ([`SyncTask`]).
//!
//! The guest is not trusted with the timestamps the shim reports: an exit
//! time from the agent is clamped into the host's window in which the
//! process ran ([`exit_time`]), so a wrong or hostile guest clock cannot
//! put an exit before its start or in the future.

use microvm_proto::agent::v1 as api;
use std::time::{Duration, Instant, SystemTime};

/// How often a running pod's guest clock is re-synced.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// A guest within this of the host (plus the measurement's error) is
/// left alone: steps are for real drift, not for noise.
pub const TOLERANCE: Duration = Duration::from_millis(5);
/// Readings per measurement; the one with the shortest round trip wins.
const SAMPLES: usize = 3;
/// A reading whose round trip took longer is no measurement.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading the guest clock failed: {0}")]
    Read(tonic::Status),
    #[error("stepping the guest clock by {step_nanos} ns failed: {status}")]
    Step {
        step_nanos: i64,
        status: tonic::Status,
    },
    #[error("every guest clock reading took longer than {MAX_ROUND_TRIP:?} (best {0:?})")]
    Slow(Duration),
}

/// The guest minus the host, and how far off that may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    pub nanos: i64,
    pub error_nanos: i64,
}

/// Nanoseconds since the epoch (negative before it, saturating).
pub fn unix_nanos(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The offset of one reading `guest` taken between the host times
/// `before` and `after` (nanoseconds since the epoch).
pub fn offset_of(before: i64, guest: i64, after: i64) -> Offset {
    let half = after.saturating_sub(before).max(0) / 2;
    Offset {
        nanos: guest.saturating_sub(before.saturating_add(half)),
        error_nanos: half,
    }
}

/// The agent's Clock service, as the shim uses it.
type Client = api::clock_client::ClockClient<crate::agent::Intercepted>;

/// Measures the guest's offset: the best of [`SAMPLES`] readings.
pub async fn measure(client: &Client) -> Result<Offset, ClockError> {
    let mut best: Option<(Duration, Offset)> = None;
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let before = unix_nanos(SystemTime::now());
        let reading = client
            .clone()
            .get_clock(api::GetClockRequest {})
            .await
            .map_err(ClockError::Read)?
            .into_inner();
        let after = unix_nanos(SystemTime::now());
        let round_trip = started.elapsed();
        let offset = offset_of(before, reading.realtime_unix_nanos, after);
        if best.is_none_or(|(shortest, _)| round_trip < shortest) {
            best = Some((round_trip, offset));
        }
    }
    match best {
        Some((round_trip, offset)) if round_trip <= MAX_ROUND_TRIP => Ok(offset),
        Some((round_trip, _)) => Err(ClockError::Slow(round_trip)),
        None => Err(ClockError::Slow(Duration::ZERO)),
    }
}

/// Measures and, if the guest is off by more than the tolerance, steps it.
/// Returns the step taken (0 for none).
pub async fn sync(client: &Client) -> Result<i64, ClockError> {
    let offset = measure(client).await?;
    let tolerance = i64::try_from(TOLERANCE.as_nanos()).unwrap_or(i64::MAX);
    if offset.nanos.unsigned_abs() <= (offset.error_nanos.saturating_add(tolerance)) as u64 {
        return Ok(0);
    }
    let step_nanos = offset.nanos.saturating_neg();
    client
        .clone()
        .step_clock(api::StepClockRequest { step_nanos })
        .await
        .map_err(|status| ClockError::Step { step_nanos, status })?;
    Ok(step_nanos)
}

/// Syncs the guest clock every [`SYNC_INTERVAL`] until dropped. A failure
/// is logged (rate-limited by the interval) and retried next time.
#[derive(Debug)]
pub struct SyncTask(tokio::task::JoinHandle<()>);

impl SyncTask {
    pub fn start(pod_id: &str, client: Client) -> Self {
        let pod_id = pod_id.to_owned();
        Self(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SYNC_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate; the boot sync just ran.
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match sync(&client).await {
                    Ok(0) => {}
                    Ok(step_nanos) => {
                        tracing::info!("pod {pod_id}: guest clock stepped by {step_nanos} ns")
                    }
                    Err(err) => tracing::warn!("pod {pod_id}: guest clock sync: {err}"),
                }
            }
        }))
    }
}

impl Drop for SyncTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The exit time to report for a process the shim began waiting for at
/// `waited_since`: the guest's `guest_nanos` (its clock is synced, so it
/// is the better estimate of when the exit happened) when it falls between
/// `waited_since` and now, else the nearest end of that window. 0 (none
/// given) is now.
pub fn exit_time(guest_nanos: i64, waited_since: SystemTime) -> SystemTime {
    let now = SystemTime::now();
    if guest_nanos <= 0 {
        return now;
    }
    let guest = SystemTime::UNIX_EPOCH + Duration::from_nanos(guest_nanos.unsigned_abs());
    guest.clamp(waited_since.min(now), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_taken_at_the_midpoint() {
        assert_eq!(
            offset_of(1_000, 1_600, 2_000),
            Offset {
                nanos: 100,
                error_nanos: 500
            }
        );
        // A guest that never had a clock: hugely behind.
        let host = 1_764_000_000_000_000_000;
        let offset = offset_of(host, 3_100_000_000, host + 2_000_000);
        assert_eq!(offset.nanos, 3_100_000_000 - host - 1_000_000);
        // Host clock readings that went backwards give no negative error.
        assert_eq!(offset_of(10, 10, 5).error_nanos, 0);
        assert_eq!(
            offset_of(i64::MIN, i64::MAX, i64::MAX).error_nanos,
            i64::MAX / 2
        );
    }

    #[test]
    fn unix_nanos_saturates() {
        assert_eq!(unix_nanos(SystemTime::UNIX_EPOCH), 0);
        assert_eq!(
            unix_nanos(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            -1_000_000_000
        );
    }

    #[test]
    fn exit_times_stay_in_the_window_the_process_ran() {
        let waited_since = SystemTime::now() - Duration::from_secs(30);
        let inside = waited_since + Duration::from_secs(10);
        assert_eq!(exit_time(unix_nanos(inside), waited_since), inside);
        // A guest that never had a clock (3.1 s after the epoch).
        assert_eq!(exit_time(3_100_000_000, waited_since), waited_since);
        // A guest far in the future.
        let future = SystemTime::now() + Duration::from_secs(3600);
        let reported = exit_time(unix_nanos(future), waited_since);
        assert!(reported <= SystemTime::now());
        assert!(reported >= waited_since);
        // None given, or nonsense.
        for nanos in [0, -5] {
            let reported = exit_time(nanos, waited_since);
            assert!(SystemTime::now().duration_since(reported).unwrap() < Duration::from_secs(5));
        }
    }
}
