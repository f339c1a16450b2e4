//! [`RcuArray`]: QEMU's RCU resizable array — copy, publish, reclaim the old copy after a
//! grace period.

use crate::cell::RcuCell;
use crate::primitive::{lock, Mutex};
use crate::reader::{read_lock, ReadGuard};

/// An array that readers index with no lock while writers grow or rewrite it.
///
/// A writer builds a new array from the current one, publishes it with one pointer store
/// and leaves the old one to call_rcu. Elements are cloned into the new array, so an array
/// of shared handles (`Arc`s of bitmap chunks, say) keeps every handle — and any bit set
/// through an old copy during the switch — alive in the new one: a grow never blocks a
/// reader and never loses an update made through an element.
pub struct RcuArray<T: Clone + Send + Sync + 'static> {
    current: RcuCell<Box<[T]>>,
    writer: Mutex<()>,
}

impl<T: Clone + Send + Sync + 'static> RcuArray<T> {
    /// An array holding `items`.
    pub fn new(items: Vec<T>) -> RcuArray<T> {
        RcuArray {
            current: RcuCell::new(items.into_boxed_slice()),
            writer: Mutex::new(()),
        }
    }

    /// The current array, for the guard's lifetime.
    #[inline]
    pub fn load<'g>(&self, guard: &'g ReadGuard) -> &'g [T] {
        self.current.load(guard)
    }

    /// The current length.
    pub fn len(&self) -> usize {
        self.load(&read_lock()).len()
    }

    /// True if the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Grows to `new_len`, filling the new tail with `fill(index)`; does nothing if the
    /// array is already that long. Returns the length now in force.
    pub fn grow_with(&self, new_len: usize, mut fill: impl FnMut(usize) -> T) -> usize {
        self.update(|old| {
            if new_len <= old.len() {
                return None;
            }
            let mut v = Vec::with_capacity(new_len);
            v.extend_from_slice(old);
            v.extend((old.len()..new_len).map(&mut fill));
            Some(v)
        })
    }

    /// Rewrites the array: `f` sees the current contents and returns the next ones (or
    /// None to leave it unchanged). Writers are serialized. Returns the length now in
    /// force.
    pub fn update(&self, f: impl FnOnce(&[T]) -> Option<Vec<T>>) -> usize {
        let _writer = lock(&self.writer);
        let next = {
            let guard = read_lock();
            match f(self.current.load(&guard)) {
                Some(v) => v,
                None => return self.current.load(&guard).len(),
            }
        };
        let len = next.len();
        self.current.store(next.into_boxed_slice());
        len
    }
}
