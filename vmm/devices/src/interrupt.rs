//! Interrupt delivery, injected into devices so that they stay KVM-free.

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// Raises one interrupt line towards the guest.
pub trait IrqTrigger: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// Triggers through an `EventFd`. The VMM registers the same fd with KVM as an
/// irqfd, so a write becomes an edge on the guest's interrupt line.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl IrqTrigger for EventFdTrigger {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
pub mod test_utils {
    use super::IrqTrigger;
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts triggers; used by device tests in place of KVM.
    #[derive(Default)]
    pub struct CountingTrigger(pub AtomicU64);

    impl CountingTrigger {
        pub fn count(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl IrqTrigger for CountingTrigger {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}
