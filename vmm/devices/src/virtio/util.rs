//! Small helpers shared by the virtio devices: descriptor-chain sanity checks,
//! the queue-draining loop, queue-event registration and rate-limited
//! warnings for guest faults.

use super::VirtioInterrupt;
use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// What a chain looks like, learned by walking it once without touching the
/// buffers it names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChainShape {
    pub descriptors: usize,
    pub readable_bytes: u64,
    pub writable_bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is empty (bad head index or unreadable descriptor)")]
    Empty,
    /// virtio-queue stops walking a chain after `queue size` descriptors, at a
    /// next index past the table, or at an unreadable descriptor; in every such
    /// case the last descriptor it yielded still has NEXT set.
    #[error("descriptor chain is not terminated (loop, too long, or bad next index)")]
    Unterminated,
}

/// Walks `chain` (a clone of it) and rejects chains that virtio-queue had to
/// cut short. Loops and chains longer than the queue end up here. The guest
/// may rewrite descriptors after this walk; that can only change the outcome
/// of its own request, as Reader/Writer bound-check every buffer again.
pub fn chain_shape<M>(chain: &DescriptorChain<M>) -> Result<ChainShape, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut shape = ChainShape::default();
    let mut last_has_next = false;
    for desc in chain.clone() {
        shape.descriptors += 1;
        if desc.is_write_only() {
            shape.writable_bytes += u64::from(desc.len());
        } else {
            shape.readable_bytes += u64::from(desc.len());
        }
        last_has_next = desc.has_next();
    }
    if shape.descriptors == 0 {
        Err(ChainError::Empty)
    } else if last_has_next {
        Err(ChainError::Unterminated)
    } else {
        Ok(shape)
    }
}

/// Copies the part of `config` that `offset..offset + data.len()` covers into
/// `data` and zeroes the rest, so out-of-range config reads read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainStats {
    /// Chains put in the used ring.
    pub completed: u64,
    /// Used-ring writes that failed (bad head index from the guest).
    pub used_ring_errors: u64,
    /// The avail ring says there is more but no chain could be popped.
    pub stalled: bool,
    /// The handler deferred a chain; it is still in the avail ring.
    pub deferred: bool,
}

/// Pops every available chain, lets `handle` process it (returning the number
/// of bytes it wrote into the chain) and returns the chain to the guest. Runs
/// the disable/enable-notification loop so that a kick racing with the end of
/// the pass is not lost.
pub fn drain_queue<'m, F>(queue: &mut Queue, mem: &'m GuestMemoryMmap, mut handle: F) -> DrainStats
where
    F: FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
{
    drain_queue_with(queue, mem, |chain| ChainVerdict::Done(handle(chain)))
}

/// What a handler did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Processed; this many bytes were written into it.
    Done(u32),
    /// Not now (a rate limiter said wait): the chain stays in the avail ring
    /// and the pass stops with notifications off; the caller retries later.
    Defer,
}

/// [`drain_queue`] with a handler that may defer a chain.
pub fn drain_queue_with<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut handle: F,
) -> DrainStats
where
    F: FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> ChainVerdict,
{
    let mut stats = DrainStats::default();
    loop {
        // Failures here only lose an optimisation hint; the ring was checked
        // at activation.
        let _ = queue.disable_notification(mem);
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let used_len = match handle(chain) {
                ChainVerdict::Done(len) => len,
                ChainVerdict::Defer => {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    stats.deferred = true;
                    return stats;
                }
            };
            match queue.add_used(mem, head, used_len) {
                Ok(()) => stats.completed += 1,
                Err(e) => {
                    stats.used_ring_errors += 1;
                    crate::guest_warn!(head, error = %e, "virtio: failed to return a chain");
                }
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped => continue,
            // More announced than we could pop: a bogus avail index. Stop
            // rather than spin; the next kick retries.
            Ok(true) => {
                stats.stalled = true;
                break;
            }
            Ok(false) => break,
            Err(e) => {
                crate::guest_warn!(error = %e, "virtio: cannot re-enable notifications");
                break;
            }
        }
    }
    stats
}

/// Raises the used-ring interrupt if anything was completed and the driver
/// wants to hear about it.
pub fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    completed: u64,
) -> std::io::Result<()> {
    if completed == 0 {
        return Ok(());
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue()?;
    }
    Ok(())
}

/// Queue eventfds moving from `activate()` (vCPU thread) into the event loop.
///
/// `activate()` and `reset()` cannot touch epoll, so they only stage the set
/// the device should listen to; the event loop applies it on the activate
/// event. Registered fds are kept open until they are removed, because epoll
/// keeps watching a file while any fd for it is open (the transport keeps one).
#[derive(Default)]
pub struct QueueEventSet {
    staged: Option<Vec<EventFd>>,
    registered: Vec<EventFd>,
}

impl QueueEventSet {
    /// Called on activation (with the queue events) and on reset (empty).
    pub fn stage(&mut self, events: Vec<EventFd>) {
        self.staged = Some(events);
    }

    /// Applies the staged set: removes what was registered, registers the new
    /// events with `data_base + queue index` as their epoll data.
    pub fn apply(
        &mut self,
        ops: &mut EventOps,
        data_base: u32,
    ) -> Result<(), event_manager::Error> {
        let Some(staged) = self.staged.take() else {
            return Ok(());
        };
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                tracing::error!(error = %e, "virtio: failed to remove a queue event");
            }
        }
        let mut result = Ok(());
        for (index, evt) in staged.into_iter().enumerate() {
            let data = data_base + index as u32;
            match ops.add(Events::with_data(&evt, data, EventSet::IN)) {
                Ok(()) => self.registered.push(evt),
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// Consumes a pending notification of queue `index`, if registered.
    pub fn consume(&self, index: usize) {
        if let Some(evt) = self.registered.get(index) {
            // EAGAIN just means a spurious wake-up.
            let _ = evt.read();
        }
    }

    pub fn registered_len(&self) -> usize {
        self.registered.len()
    }
}

/// The activation plumbing every device shares (see the module docs of
/// `virtio`): the activate event that wakes the event loop, the queue events
/// it (re)registers there, and the state that exists only while the driver
/// runs the device.
pub struct Activation<S> {
    event: EventFd,
    queue_events: QueueEventSet,
    state: Option<S>,
}

impl<S> Activation<S> {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            queue_events: QueueEventSet::default(),
            state: None,
        })
    }

    /// Called from `VirtioDevice::activate` (vCPU thread): stores the state
    /// and asks the event loop to register `queue_events`.
    pub fn activate(
        &mut self,
        queue_events: Vec<EventFd>,
        state: S,
    ) -> Result<(), super::ActivateError> {
        if self.state.is_some() {
            return Err(super::ActivateError::AlreadyActive);
        }
        self.event
            .write(1)
            .map_err(super::ActivateError::ActivateEvent)?;
        self.queue_events.stage(queue_events);
        self.state = Some(state);
        Ok(())
    }

    /// The whole `VirtioDevice::activate` of a device with exactly `N`
    /// queues: checks the count, builds the device's state from the memory,
    /// the queues (in index order) and the interrupt, and activates.
    pub fn activate_queues<const N: usize>(
        &mut self,
        ctx: super::ActivateContext,
        state: impl FnOnce(GuestMemoryMmap, [Queue; N], Arc<VirtioInterrupt>) -> S,
    ) -> Result<(), super::ActivateError> {
        let got = ctx.queues.len();
        let queues: [Queue; N] = ctx
            .queues
            .try_into()
            .map_err(|_| super::ActivateError::QueueCount { expected: N, got })?;
        let state = state(ctx.mem, queues, ctx.interrupt);
        self.activate(ctx.queue_events, state)
    }

    /// The whole `VirtioDevice::reset` of a device whose only other
    /// negotiated state is its acked features: drops the state (the event
    /// loop unregisters the queue events when it sees the activate event)
    /// and forgets the features. Always succeeds.
    pub fn reset(&mut self, device: &str, acked_features: &mut u64) -> bool {
        self.state = None;
        *acked_features = 0;
        self.queue_events.stage(Vec::new());
        if let Err(e) = self.event.write(1) {
            tracing::error!(error = %e, "{device}: failed to signal reset to the event loop");
        }
        true
    }

    pub fn is_active(&self) -> bool {
        self.state.is_some()
    }

    pub fn state_mut(&mut self) -> Option<&mut S> {
        self.state.as_mut()
    }

    /// For `MutEventSubscriber::init`: watch the activate event with `data`.
    pub fn register(&self, ops: &mut EventOps, data: u32) -> Result<(), event_manager::Error> {
        ops.add(Events::with_data(&self.event, data, EventSet::IN))
    }

    /// On the activate event: (re)registers the queue events, queue `i` with
    /// epoll data `queue_data_base + i`.
    pub fn on_activate_event(
        &mut self,
        ops: &mut EventOps,
        queue_data_base: u32,
    ) -> Result<(), event_manager::Error> {
        // EAGAIN only means another wake-up already consumed the count.
        let _ = self.event.read();
        self.queue_events.apply(ops, queue_data_base)
    }

    /// Consumes a pending notification of queue `index`.
    pub fn consume_queue_event(&self, index: usize) {
        self.queue_events.consume(index);
    }

    pub fn registered_queue_events(&self) -> usize {
        self.queue_events.registered_len()
    }
}

/// Lets one message through per interval and counts the rest, so a hostile
/// guest cannot flood the host log. One limiter per call site (see
/// [`guest_warn!`]).
pub struct LogLimiter {
    next_allowed_ms: AtomicU64,
    suppressed: AtomicU64,
}

const LOG_INTERVAL_MS: u64 = 1000;

fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            next_allowed_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(messages suppressed since the last one)` when a message
    /// may be logged now.
    pub fn check(&self) -> Option<u64> {
        let now = monotonic_ms();
        let next = self.next_allowed_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_allowed_ms
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `warn!` limited to one message a second per call site; for faults the guest
/// can cause at will.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::virtio::util::LogLimiter =
            $crate::virtio::util::LogLimiter::new();
        if let Some(suppressed) = LIMITER.check() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{build_chain, guest_memory, RawDesc};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    #[test]
    fn shape_counts_directions() {
        let mem = guest_memory();
        let (_q, chain) = build_chain(
            &mem,
            &[
                RawDesc::new(0x10000, 16, 0),
                RawDesc::new(0x11000, 512, VRING_DESC_F_WRITE),
                RawDesc::new(0x12000, 1, VRING_DESC_F_WRITE),
            ],
        );
        let shape = chain_shape(&chain).unwrap();
        assert_eq!(
            shape,
            ChainShape {
                descriptors: 3,
                readable_bytes: 16,
                writable_bytes: 513
            }
        );
    }

    #[test]
    fn loop_is_unterminated() {
        let mem = guest_memory();
        let (_q, chain) = build_chain(
            &mem,
            &[
                RawDesc::linked(0x10000, 16, VRING_DESC_F_NEXT, 1),
                RawDesc::linked(0x11000, 16, VRING_DESC_F_NEXT, 0),
            ],
        );
        assert_eq!(chain_shape(&chain), Err(ChainError::Unterminated));
    }

    #[test]
    fn next_index_past_table_is_unterminated() {
        let mem = guest_memory();
        let (_q, chain) = build_chain(
            &mem,
            &[RawDesc::linked(0x10000, 16, VRING_DESC_F_NEXT, 9999)],
        );
        assert_eq!(chain_shape(&chain), Err(ChainError::Unterminated));
    }

    #[test]
    fn limiter_lets_first_through_then_counts() {
        let limiter = LogLimiter::new();
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.suppressed.load(Ordering::Relaxed), 2);
    }
}
