//! Event-loop glue: the activate event and the request-queue event.

use super::device::Block;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

const ACTIVATE: u32 = 0;
const REQUEST_QUEUE: u32 = 1;
const RATE_LIMITER: u32 = 2;

impl Block {
    fn on_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activation.on_activate_event(ops, REQUEST_QUEUE) {
            self.metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-blk: failed to register the queue event");
        }
        // Requests may have been queued before we were listening.
        self.process_queue();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activation.register(ops, ACTIVATE) {
            self.metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-blk: failed to register the activate event");
        }
        if let Some(fd) = self.rate_limiter.timer_fd() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, RATE_LIMITER, EventSet::IN)) {
                self.metrics.event_errors.inc();
                tracing::error!(error = %e, "virtio-blk: failed to register the rate limiter timer");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => self.on_activate_event(ops),
            REQUEST_QUEUE => {
                self.activation.consume_queue_event(0);
                // While throttled the timer event resumes the queue.
                if !self.rate_limiter.is_blocked() {
                    self.process_queue();
                }
            }
            RATE_LIMITER => {
                if self.rate_limiter.on_timer() {
                    self.process_queue();
                }
            }
            other => tracing::error!(data = other, "virtio-blk: event from an unknown source"),
        }
    }
}
