//! Memory shared with devices: a bump allocator over a static arena inside
//! the image (guest-physical = virtual, so a pointer is also the address the
//! device sees). Every access goes through volatile reads and writes, because
//! the device changes this memory behind the compiler's back.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

// Host unit tests share one arena across many tests, so it is bigger there.
const ARENA_SIZE: usize = if cfg!(test) { 4 << 20 } else { 128 << 10 };

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the arena is only handed out in disjoint pieces (see `alloc`), and
// the pieces are accessed with volatile operations through raw pointers.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A piece of the arena. Copyable: it is a window, not an owner; the probe
/// hands each piece to at most one queue or request at a time.
#[derive(Debug, Clone, Copy)]
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

/// Carves `len` zeroed bytes aligned to `align` (a power of two) out of the
/// arena, or `None` when it is used up. Never freed: the probe is short-lived.
pub fn alloc(len: usize, align: usize) -> Option<DmaBuf> {
    let base = ARENA.0.get().cast::<u8>();
    let mut start = 0;
    NEXT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
        start = next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len)?;
        (end <= ARENA_SIZE).then_some(end)
    })
    .ok()?;
    // SAFETY: `start + len <= ARENA_SIZE`, so the pointer stays in the arena.
    let ptr = unsafe { base.add(start) };
    Some(DmaBuf { ptr, len })
}

impl DmaBuf {
    /// Guest-physical address (identity-mapped).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-window; `None` if it does not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<DmaBuf> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| DmaBuf {
            // SAFETY: `offset <= end <= self.len`, inside this buffer.
            ptr: unsafe { self.ptr.add(offset) },
            len,
        })
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        let size = core::mem::size_of::<T>();
        assert!(offset + size <= self.len, "dma access out of bounds");
        // SAFETY: checked just above to stay inside the buffer.
        let p = unsafe { self.ptr.add(offset).cast::<T>() };
        assert!(p.is_aligned(), "unaligned dma access");
        p
    }

    pub fn read<T: Copy>(&self, offset: usize) -> T {
        let p = self.at::<T>(offset);
        // SAFETY: in bounds and aligned (see `at`); volatile because the
        // device writes this memory.
        unsafe { ptr::read_volatile(p) }
    }

    pub fn write<T: Copy>(&self, offset: usize, value: T) {
        let p = self.at::<T>(offset);
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile(p, value) }
    }

    pub fn copy_from(&self, offset: usize, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            self.write(offset + i, byte);
        }
    }

    pub fn copy_to(&self, offset: usize, out: &mut [u8]) {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.read(offset + i);
        }
    }

    pub fn fill(&self, value: u8) {
        for i in 0..self.len {
            self.write(i, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let a = alloc(10, 16).unwrap();
        let b = alloc(100, 4096).unwrap();
        assert_eq!(a.addr() % 16, 0);
        assert_eq!(b.addr() % 4096, 0);
        assert!(a.addr() + 10 <= b.addr() || b.addr() + 100 <= a.addr());
        assert!(alloc(ARENA_SIZE + 1, 1).is_none());
    }

    #[test]
    fn reads_back_what_was_written() {
        let buf = alloc(64, 8).unwrap();
        buf.write::<u64>(8, 0x1122_3344_5566_7788);
        buf.copy_from(20, b"abc");
        assert_eq!(buf.read::<u64>(8), 0x1122_3344_5566_7788);
        let mut out = [0u8; 3];
        buf.copy_to(20, &mut out);
        assert_eq!(&out, b"abc");
        assert_eq!(buf.slice(60, 4).unwrap().addr(), buf.addr() + 60);
        assert!(buf.slice(60, 5).is_none());
    }
}
