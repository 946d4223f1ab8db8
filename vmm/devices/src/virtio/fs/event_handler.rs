//! Event-loop glue: the only event is the back-end's socket becoming
//! readable or hung up. The back-end never speaks unasked on this channel
//! (we negotiate no back-end requests), so either means it is gone or broken.

use super::connection::{peer_state, PeerState};
use super::device::VhostUserFs;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

const BACKEND_SOCKET: u32 = 0;

impl MutEventSubscriber for VhostUserFs {
    fn init(&mut self, ops: &mut EventOps) {
        let Some(watch) = &self.watch else {
            return;
        };
        let events = Events::with_data(
            watch,
            BACKEND_SOCKET,
            EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        );
        if let Err(e) = ops.add(events) {
            tracing::error!(
                tag = %self.tag(),
                "virtio-fs: cannot watch the back-end socket ({e:?}); a dead back-end will go unnoticed until the next request"
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() != BACKEND_SOCKET {
            tracing::error!(
                data = events.data(),
                "virtio-fs: event from an unknown source"
            );
            return;
        }
        let hung_up = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR);
        // The device lock is held here, so no request is waiting for a reply
        // and anything readable was sent unasked.
        let peer = match (&self.watch, hung_up) {
            (Some(watch), false) => peer_state(watch),
            _ => PeerState::Closed,
        };
        let why = match peer {
            PeerState::Alive => return,
            PeerState::Closed => "the vhost-user back-end closed the connection",
            PeerState::UnexpectedData => "the vhost-user back-end sent an unrequested message",
        };
        self.fail(&why);
        // Level-triggered: stop watching, then let go of the fd.
        if let Err(e) = ops.remove(events) {
            tracing::error!("virtio-fs: cannot stop watching the back-end socket: {e:?}");
        }
        self.watch = None;
    }
}
