//! [`RcuList`]: QEMU's `QLIST_*_RCU`, a doubly linked list that readers walk with no lock.
//!
//! Readers follow only `next` pointers, loaded with acquire ordering; writers, serialized
//! by the list's own mutex ([`RcuList::lock`]), publish a fully built node with one release
//! store and unlink a node with one store, leaving the node's own `next` intact so that a
//! reader standing on it walks on into the list. Unlinked nodes are reclaimed through
//! [`call_rcu`](crate::call_rcu()) once nothing counts them: the list holds one count,
//! dropped one grace period after unlinking; each [`Counted`] holds another.

mod counted;
mod writer;

pub use counted::Counted;
pub use writer::{CursorMut, ListWriter, WriterIter};

use crate::primitive::{AtomicBool, AtomicPtr, AtomicUsize, Mutex};
use crate::reader::ReadGuard;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

/// One element and its links.
pub(crate) struct Node<T> {
    /// Read by readers (acquire), written by writers (release).
    pub(crate) next: AtomicPtr<Node<T>>,
    /// Writer-only back link: the previous node, or null at the head.
    pub(crate) prev: AtomicPtr<Node<T>>,
    /// The list's count (while linked, and for one grace period after) plus one per
    /// [`Counted`].
    pub(crate) refs: AtomicUsize,
    /// Writer-maintained: whether the node is in its list.
    pub(crate) linked: AtomicBool,
    /// Identifies the list the node was created in.
    pub(crate) list_id: usize,
    pub(crate) value: T,
}

impl<T: Send + Sync + 'static> Node<T> {
    /// Drops one count and frees the node if it was the last.
    ///
    /// Inline freeing is safe whenever the last count goes: the list's own count is given
    /// up only a grace period after unlinking, so by then no reader can reach the node.
    /// With `defer`, the free (and `T`'s drop, say an munmap) still moves to the call_rcu
    /// thread, so that dropping a [`Counted`] never does heavy work on the caller's thread.
    ///
    /// # Safety
    /// `node` must point to a live node and the caller must own one of its counts; `node`
    /// must be derived from the node's `Box::into_raw` through raw pointers only (never
    /// from a `&Node`), as it may be the pointer the node is freed through.
    pub(crate) unsafe fn release(node: NonNull<Node<T>>, defer: bool) {
        // SAFETY: the caller owns a count, so the node is alive.
        if unsafe { node.as_ref() }.refs.fetch_sub(1, AcqRel) != 1 {
            return;
        }
        if !defer {
            // SAFETY: that was the last count, and no reader can reach the node (above).
            drop(unsafe { Box::from_raw(node.as_ptr()) });
            return;
        }
        let node = SendNode(node);
        crate::call_rcu(move || {
            let node = node;
            // SAFETY: as above; nothing has touched the node since its last count went.
            drop(unsafe { Box::from_raw(node.0.as_ptr()) });
        });
    }
}

/// A node pointer sent to the call_rcu thread.
pub(crate) struct SendNode<T>(pub(crate) NonNull<Node<T>>);
// SAFETY: it carries ownership of (one count of) a node whose value is Send + Sync.
unsafe impl<T: Send + Sync> Send for SendNode<T> {}

/// State only writers touch, under the list's mutex.
pub(crate) struct WriterState<T> {
    pub(crate) tail: *mut Node<T>,
}

// SAFETY: the raw tail pointer is only dereferenced by the writer holding the mutex.
unsafe impl<T: Send + Sync> Send for WriterState<T> {}

/// A list readers walk without locks while writers insert and remove.
///
/// ```
/// let list = rcu::RcuList::new();
/// list.lock().push_back(1);
/// list.lock().push_back(2);
/// let guard = rcu::read_lock();
/// let sum: i32 = list.iter(&guard).map(|e| *e).sum();
/// assert_eq!(sum, 3);
/// ```
pub struct RcuList<T: Send + Sync + 'static> {
    pub(crate) head: AtomicPtr<Node<T>>,
    pub(crate) writer: Mutex<WriterState<T>>,
    /// Written by writers under the writer lock, read without lock (a snapshot).
    pub(crate) len: AtomicUsize,
    /// Unique per list, so a writer can tell its own elements from another list's.
    pub(crate) id: usize,
}

static NEXT_LIST_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

// SAFETY: readers on any thread get `&T` (T: Sync); values are moved in and dropped on
// other threads (T: Send).
unsafe impl<T: Send + Sync + 'static> Send for RcuList<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync + 'static> Sync for RcuList<T> {}

impl<T: Send + Sync + 'static> Default for RcuList<T> {
    fn default() -> Self {
        RcuList::new()
    }
}

impl<T: Send + Sync + 'static> RcuList<T> {
    /// An empty list.
    pub fn new() -> RcuList<T> {
        RcuList {
            head: AtomicPtr::new(ptr::null_mut()),
            writer: Mutex::new(WriterState {
                tail: ptr::null_mut(),
            }),
            len: AtomicUsize::new(0),
            id: NEXT_LIST_ID.fetch_add(1, Relaxed),
        }
    }

    /// Walks the list under a read guard; the entries live as long as the guard.
    ///
    /// A walk that races with writers sees each element at most once, sees every element
    /// that stayed in the list for the whole walk, and may or may not see elements
    /// inserted or removed meanwhile.
    #[inline]
    pub fn iter<'g>(&self, _guard: &'g ReadGuard) -> Iter<'g, T> {
        Iter {
            next: self.head.load(Acquire),
            _guard: PhantomData,
        }
    }

    /// The number of elements (a snapshot; writers may change it at any moment).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// True if the list has no elements (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the writer lock: insertions and removals go through the returned writer.
    pub fn lock(&self) -> ListWriter<'_, T> {
        ListWriter::new(self, crate::primitive::lock(&self.writer))
    }
}

impl<T: Send + Sync + 'static> Drop for RcuList<T> {
    fn drop(&mut self) {
        let mut p = self.head.swap(ptr::null_mut(), AcqRel);
        while let Some(node) = NonNull::new(p) {
            // SAFETY: the node is linked in this list, so its list count is alive; we read
            // `next` before giving that count up.
            p = unsafe { node.as_ref() }.next.load(Acquire);
            // SAFETY: as above.
            unsafe { node.as_ref() }.linked.store(false, Relaxed);
            let node = SendNode(node);
            crate::call_rcu(move || {
                let node = node;
                // SAFETY: the node is unreachable from the (dropped) list and a grace
                // period has passed; this gives up the list's count.
                unsafe { Node::release(node.0, false) };
            });
        }
    }
}

/// An iterator over an [`RcuList`] under a read guard.
pub struct Iter<'g, T> {
    next: *mut Node<T>,
    _guard: PhantomData<&'g ReadGuard>,
}

impl<'g, T: Send + Sync + 'static> Iterator for Iter<'g, T> {
    type Item = Entry<'g, T>;

    #[inline]
    fn next(&mut self) -> Option<Entry<'g, T>> {
        let node = NonNull::new(self.next)?;
        // SAFETY: a non-null pointer read from the list under the guard points to a node
        // that is reclaimed only after a grace period that cannot end before 'g does.
        self.next = unsafe { node.as_ref() }.next.load(Acquire);
        Some(Entry {
            node,
            _guard: PhantomData,
        })
    }
}

/// An element seen under a read guard: dereferences to the value, and can take a
/// [`Counted`] reference that outlives the guard.
///
/// It keeps the raw node pointer as loaded from the list (whose provenance goes back to
/// the node's `Box::into_raw`), not a reference: a [`Counted`] taken from it may be the
/// one that frees the node, and freeing through a pointer derived from a shared reference
/// is undefined behaviour (Stacked and Tree Borrows both forbid it).
pub struct Entry<'g, T> {
    node: NonNull<Node<T>>,
    _guard: PhantomData<&'g Node<T>>,
}

// SAFETY: an Entry is a `&'g Node<T>` that also remembers its pointer's provenance, and
// shares that reference's auto traits: it hands out only `&T` (and counts taken with an
// atomic add), so it may move to or be shared with another thread when `T: Sync`.
unsafe impl<T: Sync> Send for Entry<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Entry<'_, T> {}

impl<T> Clone for Entry<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Entry<'_, T> {}

impl<'g, T: Send + Sync + 'static> Entry<'g, T> {
    /// The value, for the guard's whole lifetime.
    #[inline]
    pub fn get(&self) -> &'g T {
        &self.node().value
    }

    /// A counted reference to the element, usable after the read section ends
    /// (QEMU's `foo_ref` taken under `rcu_read_lock`).
    pub fn counted(&self) -> Counted<T> {
        // The list's own count is dropped only a grace period after unlinking, which
        // cannot end while this guard lives, so the count is at least 1 here.
        self.node().refs.fetch_add(1, Relaxed);
        // The raw pointer, not one derived from `node()`: the Counted may free the node.
        Counted::from_node(self.node)
    }
}

impl<'g, T> Entry<'g, T> {
    #[inline]
    fn node(&self) -> &'g Node<T> {
        // SAFETY: the node was reachable from the list under the guard, so it is reclaimed
        // only after a grace period that cannot end before 'g does (see `Iter::next`).
        unsafe { self.node.as_ref() }
    }
}

impl<T> std::ops::Deref for Entry<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.node().value
    }
}
