//! [`Callback`]: a queued `FnOnce() + Send`, stored inline when it is small.
//!
//! Most call_rcu callbacks capture one pointer (the object to free). Boxing each would
//! cost an allocation and a free per callback on top of the object's own; a closure of up
//! to [`INLINE_WORDS`] words is instead moved into the queue entry itself.

use std::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};
use std::ptr;

/// Closures up to this many machine words are stored inline.
pub(crate) const INLINE_WORDS: usize = 3;

type Storage = [MaybeUninit<usize>; INLINE_WORDS];

/// A type-erased `FnOnce() + Send + 'static`, run exactly once (or leaked if never run).
pub(crate) struct Callback {
    storage: Storage,
    /// Moves the closure out of `storage` and calls it.
    run: unsafe fn(*mut Storage),
}

impl Callback {
    /// Wraps `f`.
    pub(crate) fn new<F: FnOnce() + Send + 'static>(f: F) -> Callback {
        let mut storage: Storage = [MaybeUninit::uninit(); INLINE_WORDS];
        let slot = storage.as_mut_ptr();
        if size_of::<F>() <= size_of::<Storage>() && align_of::<F>() <= align_of::<Storage>() {
            // SAFETY: `storage` is large and aligned enough for an F (checked above), and
            // uninitialized; `run_inline::<F>` is the only reader of what we write.
            unsafe { ptr::write(slot.cast::<F>(), f) };
            Callback {
                storage,
                run: run_inline::<F>,
            }
        } else {
            let boxed = Box::into_raw(Box::new(f));
            // SAFETY: one word fits; `run_boxed::<F>` is the only reader.
            unsafe { ptr::write(slot.cast::<*mut F>(), boxed) };
            Callback {
                storage,
                run: run_boxed::<F>,
            }
        }
    }

    /// Calls the closure.
    pub(crate) fn call(self) {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: `run` matches what `new` stored, and `me` is never used again, so the
        // closure is moved out exactly once.
        unsafe { (me.run)(&mut me.storage) }
    }
}

// SAFETY: a Callback only ever holds an `F: Send` (inline or boxed); nothing else.
unsafe impl Send for Callback {}

/// # Safety
/// `storage` holds an `F` written by [`Callback::new`], not yet moved out.
unsafe fn run_inline<F: FnOnce()>(storage: *mut Storage) {
    // SAFETY: the caller's guarantee.
    let f = unsafe { ptr::read(storage.cast::<F>()) };
    f();
}

/// # Safety
/// `storage` holds a `*mut F` from `Box::into_raw`, not yet taken.
unsafe fn run_boxed<F: FnOnce()>(storage: *mut Storage) {
    // SAFETY: the caller's guarantee.
    let f = unsafe { Box::from_raw(ptr::read(storage.cast::<*mut F>())) };
    f();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    #[test]
    fn small_and_large_closures_run_once_with_their_captures() {
        let hits = Arc::new(AtomicUsize::new(0));
        let small = {
            let hits = hits.clone();
            Callback::new(move || {
                hits.fetch_add(1, SeqCst);
            })
        };
        let big_capture = [7u64; 16];
        let large = {
            let hits = hits.clone();
            Callback::new(move || {
                hits.fetch_add(big_capture.iter().sum::<u64>() as usize, SeqCst);
            })
        };
        small.call();
        large.call();
        assert_eq!(hits.load(SeqCst), 1 + 7 * 16);
        // Every capture was dropped: only our own reference is left.
        assert_eq!(Arc::strong_count(&hits), 1);
    }
}
