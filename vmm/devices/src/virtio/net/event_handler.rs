//! Event-loop glue: activate event, rx/tx queue events and the back-end fd.
//!
//! The back-end fd is level-triggered, so it is only in the interest list
//! while the device can take frames: when a frame waits for rx buffers it is
//! removed, and the next rx-queue kick puts it back.

use super::device::{Net, RxStop};
use super::{RX_QUEUE, TX_QUEUE};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

const ACTIVATE: u32 = 0;
const QUEUE_BASE: u32 = 1;
const RX_EVENT: u32 = QUEUE_BASE + RX_QUEUE as u32;
const TX_EVENT: u32 = QUEUE_BASE + TX_QUEUE as u32;
const BACKEND: u32 = 100;
const RX_LIMITER: u32 = 101;
const TX_LIMITER: u32 = 102;

impl Net {
    fn set_backend_interest(&mut self, ops: &mut EventOps, wanted: bool) {
        let wanted = wanted && self.activation.is_active() && !self.backend_closed;
        if wanted == self.backend_registered {
            return;
        }
        let fd = self.backend.raw_fd();
        let result = if wanted {
            ops.add(Events::with_data_raw(fd, BACKEND, EventSet::IN))
        } else {
            ops.remove(Events::new_raw(fd, EventSet::IN))
        };
        match result {
            Ok(()) => self.backend_registered = wanted,
            Err(e) => {
                self.metrics.event_errors.inc();
                tracing::error!(error = %e, wanted, "virtio-net: failed to update back-end polling");
            }
        }
    }

    fn run_rx(&mut self, ops: &mut EventOps) {
        let stop = self.process_rx();
        self.set_backend_interest(ops, stop == RxStop::BackendEmpty);
    }

    fn on_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activation.on_activate_event(ops, QUEUE_BASE) {
            self.metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-net: failed to register queue events");
        }
        // Also covers reset: process_rx reports Idle and polling stops.
        self.run_rx(ops);
        self.process_tx();
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activation.register(ops, ACTIVATE) {
            self.metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-net: failed to register the activate event");
        }
        let timers = [
            (self.rx_limiter.timer_fd(), RX_LIMITER),
            (self.tx_limiter.timer_fd(), TX_LIMITER),
        ];
        for (fd, data) in timers {
            let Some(fd) = fd else { continue };
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                self.metrics.event_errors.inc();
                tracing::error!(error = %e, "virtio-net: failed to register a rate limiter timer");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => self.on_activate_event(ops),
            RX_EVENT => {
                self.activation.consume_queue_event(RX_QUEUE);
                self.run_rx(ops);
            }
            TX_EVENT => {
                self.activation.consume_queue_event(TX_QUEUE);
                // While throttled the timer event resumes tx.
                if !self.tx_limiter.is_blocked() {
                    self.process_tx();
                }
            }
            RX_LIMITER => {
                if self.rx_limiter.on_timer() {
                    self.run_rx(ops);
                }
            }
            TX_LIMITER => {
                if self.tx_limiter.on_timer() {
                    self.process_tx();
                }
            }
            BACKEND => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    tracing::error!("virtio-net: back-end hung up or failed; no more rx");
                    self.backend_closed = true;
                }
                self.run_rx(ops);
            }
            other => tracing::error!(data = other, "virtio-net: event from an unknown source"),
        }
    }
}
