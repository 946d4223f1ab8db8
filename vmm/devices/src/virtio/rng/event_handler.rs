//! Event-loop glue: the activate event and the request-queue event.

use super::device::Rng;
use event_manager::{EventOps, Events, MutEventSubscriber};

const ACTIVATE: u32 = 0;
const REQUEST_QUEUE: u32 = 1;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activation.register(ops, ACTIVATE) {
            self.metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-rng: failed to register the activate event");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                if let Err(e) = self.activation.on_activate_event(ops, REQUEST_QUEUE) {
                    self.metrics.event_errors.inc();
                    tracing::error!(error = %e, "virtio-rng: failed to register the queue event");
                }
                self.process_queue();
            }
            REQUEST_QUEUE => {
                self.activation.consume_queue_event(0);
                self.process_queue();
            }
            other => tracing::error!(data = other, "virtio-rng: event from an unknown source"),
        }
    }
}
