//! The writer side of [`RcuList`]: [`ListWriter`] (the held writer lock) and [`CursorMut`].

use super::{Counted, Node, RcuList, SendNode, WriterState};
use crate::primitive::{AtomicBool, AtomicPtr, AtomicUsize, MutexGuard};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// The list's writer lock, held: every insertion and removal goes through it.
///
/// Readers keep walking meanwhile; removed elements are reclaimed after a grace period.
pub struct ListWriter<'a, T: Send + Sync + 'static> {
    list: &'a RcuList<T>,
    state: MutexGuard<'a, WriterState<T>>,
}

impl<'a, T: Send + Sync + 'static> ListWriter<'a, T> {
    pub(crate) fn new(list: &'a RcuList<T>, state: MutexGuard<'a, WriterState<T>>) -> Self {
        ListWriter { list, state }
    }

    fn new_node(&self, value: T) -> *mut Node<T> {
        Box::into_raw(Box::new(Node {
            next: AtomicPtr::new(ptr::null_mut()),
            prev: AtomicPtr::new(ptr::null_mut()),
            refs: AtomicUsize::new(1),
            linked: AtomicBool::new(true),
            list_id: self.list.id,
            value,
        }))
    }

    /// Links a new node between `prev` (null: at the head) and `next` (null: at the tail).
    fn link(&mut self, prev: *mut Node<T>, next: *mut Node<T>, value: T) {
        let node = self.new_node(value);
        // SAFETY: `node` is fresh and unpublished; `prev` and `next` are null or linked
        // nodes of this list, alive while we hold the writer lock.
        unsafe {
            (*node).next.store(next, Relaxed);
            (*node).prev.store(prev, Relaxed);
            // The release store publishes the node fully built.
            match prev.as_ref() {
                None => self.list.head.store(node, Release),
                Some(p) => p.next.store(node, Release),
            }
            match next.as_ref() {
                None => self.state.tail = node,
                Some(n) => n.prev.store(node, Relaxed),
            }
        }
        // Only writers change it, under the lock: no read-modify-write needed.
        self.list.len.store(self.len() + 1, Relaxed);
    }

    /// Unlinks a linked node of this list and schedules the list's count for release.
    ///
    /// # Safety
    /// `node` must be linked in this list.
    unsafe fn unlink(&mut self, node: NonNull<Node<T>>) {
        // SAFETY: the node is linked, so alive, as are its neighbours.
        unsafe {
            let n = node.as_ref();
            let next = n.next.load(Relaxed);
            let prev = n.prev.load(Relaxed);
            // `n.next` stays as it is: a reader standing on `n` walks on into the list.
            match prev.as_ref() {
                None => self.list.head.store(next, Release),
                Some(p) => p.next.store(next, Release),
            }
            match next.as_ref() {
                None => self.state.tail = prev,
                Some(nx) => nx.prev.store(prev, Relaxed),
            }
            n.linked.store(false, Relaxed);
        }
        self.list.len.store(self.len() - 1, Relaxed);
        let node = SendNode(node);
        crate::call_rcu(move || {
            let node = node;
            // SAFETY: a grace period has passed since the unlink; this drops the list's
            // own count.
            unsafe { Node::release(node.0, false) };
        });
    }

    /// Inserts at the head (QLIST_INSERT_HEAD_RCU).
    pub fn push_front(&mut self, value: T) {
        let head = self.list.head.load(Relaxed);
        self.link(ptr::null_mut(), head, value);
    }

    /// Inserts at the tail.
    pub fn push_back(&mut self, value: T) {
        let tail = self.state.tail;
        self.link(tail, ptr::null_mut(), value);
    }

    /// Inserts before the first element for which `pred` holds, or at the tail — the way
    /// to keep a list sorted.
    pub fn insert_before_first(&mut self, pred: impl FnMut(&T) -> bool, value: T) {
        let mut pred = pred;
        let mut c = self.cursor_front();
        while let Some(v) = c.current() {
            if pred(v) {
                break;
            }
            c.move_next();
        }
        c.insert_before(value);
    }

    /// Removes the first element for which `pred` holds; true if one was removed.
    pub fn remove_first(&mut self, mut pred: impl FnMut(&T) -> bool) -> bool {
        let mut c = self.cursor_front();
        while let Some(v) = c.current() {
            if pred(v) {
                c.remove_current();
                return true;
            }
            c.move_next();
        }
        false
    }

    /// Removes every element for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut c = self.cursor_front();
        while let Some(v) = c.current() {
            if keep(v) {
                c.move_next();
            } else {
                c.remove_current();
            }
        }
    }

    /// Removes the element `which` refers to; false if it is no longer in this list.
    pub fn remove(&mut self, which: &Counted<T>) -> bool {
        let node = which.node();
        if node.list_id != self.list.id || !node.linked.load(Relaxed) {
            return false;
        }
        // SAFETY: the node belongs to this list and is linked (checked under the lock).
        unsafe { self.unlink(which.node_ptr()) };
        true
    }

    /// Walks the list; the writer lock keeps every element alive meanwhile.
    pub fn iter(&self) -> WriterIter<'_, T> {
        WriterIter {
            next: self.list.head.load(Relaxed),
            _writer: PhantomData,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.list.len.load(Relaxed)
    }

    /// True if the list has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cursor at the first element (or past the end of an empty list).
    pub fn cursor_front(&mut self) -> CursorMut<'_, 'a, T> {
        let current = self.list.head.load(Relaxed);
        CursorMut {
            writer: self,
            current,
        }
    }
}

/// Walks a list under its writer lock.
pub struct WriterIter<'w, T> {
    next: *mut Node<T>,
    _writer: PhantomData<&'w ()>,
}

impl<'w, T: 'w> Iterator for WriterIter<'w, T> {
    type Item = &'w T;
    fn next(&mut self) -> Option<&'w T> {
        // SAFETY: linked nodes are freed only after a writer unlinks them, and the writer
        // lock this iterator borrows excludes every other writer.
        let node: &'w Node<T> = unsafe { self.next.as_ref()? };
        self.next = node.next.load(Acquire);
        Some(&node.value)
    }
}

/// A position in the list under its writer lock, for insertions and removals in place.
///
/// The cursor stands on an element or past the end; [`insert_before`](Self::insert_before)
/// past the end appends, [`insert_after`](Self::insert_after) past the end prepends
/// (std's `LinkedList` cursor convention).
pub struct CursorMut<'w, 'a, T: Send + Sync + 'static> {
    writer: &'w mut ListWriter<'a, T>,
    current: *mut Node<T>,
}

impl<T: Send + Sync + 'static> CursorMut<'_, '_, T> {
    /// The element under the cursor; None past the end.
    pub fn current(&self) -> Option<&T> {
        // SAFETY: the cursor stands on a linked node (or null), alive under the lock.
        unsafe { self.current.as_ref() }.map(|n| &n.value)
    }

    /// A counted reference to the element under the cursor.
    pub fn counted(&self) -> Option<Counted<T>> {
        let node = NonNull::new(self.current)?;
        // SAFETY: as in `current`.
        unsafe { node.as_ref() }.refs.fetch_add(1, Relaxed);
        // The raw pointer keeps the provenance of the node's Box::into_raw: the Counted
        // may be the one that frees it.
        Some(Counted::from_node(node))
    }

    /// Moves to the next element (from past the end: to the first).
    pub fn move_next(&mut self) {
        // SAFETY: as in `current`.
        self.current = match unsafe { self.current.as_ref() } {
            Some(n) => n.next.load(Relaxed),
            None => self.writer.list.head.load(Relaxed),
        };
    }

    /// Inserts before the cursor (at the tail when past the end).
    pub fn insert_before(&mut self, value: T) {
        // SAFETY: as in `current`.
        let prev = match unsafe { self.current.as_ref() } {
            Some(n) => n.prev.load(Relaxed),
            None => self.writer.state.tail,
        };
        self.writer.link(prev, self.current, value);
    }

    /// Inserts after the cursor (at the head when past the end).
    pub fn insert_after(&mut self, value: T) {
        // SAFETY: as in `current`.
        match unsafe { self.current.as_ref() } {
            Some(n) => {
                let next = n.next.load(Relaxed);
                self.writer.link(self.current, next, value);
            }
            None => self.writer.push_front(value),
        }
    }

    /// Removes the element under the cursor and moves to the next; false past the end.
    pub fn remove_current(&mut self) -> bool {
        let Some(node) = NonNull::new(self.current) else {
            return false;
        };
        // SAFETY: the cursor stands on a linked node of this list.
        self.current = unsafe { node.as_ref() }.next.load(Relaxed);
        // SAFETY: as above.
        unsafe { self.writer.unlink(node) };
        true
    }
}
