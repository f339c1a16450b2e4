//! [`Counted`]: the refcount-plus-RCU pattern's reference to an [`RcuList`](crate::RcuList)
//! element.

use super::Node;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;

/// A counted reference to a list element, taken under a read guard and usable after it.
///
/// The element stays alive while any `Counted` exists, even once removed from the list;
/// the last drop reclaims it through call_rcu.
pub struct Counted<T: Send + Sync + 'static> {
    /// Derived from the node's `Box::into_raw` through raw pointers only, never from a
    /// reference: the last count frees the node through it (see `Node::release`).
    node: NonNull<Node<T>>,
}

// SAFETY: a Counted gives shared access to `T` from any thread (T: Sync) and may free the
// node (dropping `T`) on another thread (T: Send).
unsafe impl<T: Send + Sync + 'static> Send for Counted<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync + 'static> Sync for Counted<T> {}

impl<T: Send + Sync + 'static> Counted<T> {
    /// Wraps a node whose count the caller has just incremented. `node` must carry the
    /// provenance of the node's allocation (a raw pointer as loaded from the list, not one
    /// made from a `&Node`), since the last `Counted` may deallocate through it.
    pub(crate) fn from_node(node: NonNull<Node<T>>) -> Counted<T> {
        Counted { node }
    }

    pub(crate) fn node(&self) -> &Node<T> {
        // SAFETY: our count keeps the node alive.
        unsafe { self.node.as_ref() }
    }

    pub(crate) fn node_ptr(&self) -> NonNull<Node<T>> {
        self.node
    }

    /// Whether the element is still in its list (a snapshot).
    pub fn is_linked(&self) -> bool {
        self.node().linked.load(Relaxed)
    }

    /// True if both refer to the same element.
    pub fn ptr_eq(a: &Counted<T>, b: &Counted<T>) -> bool {
        a.node == b.node
    }
}

impl<T: Send + Sync + 'static> Clone for Counted<T> {
    fn clone(&self) -> Self {
        self.node().refs.fetch_add(1, Relaxed);
        Counted { node: self.node }
    }
}

impl<T: Send + Sync + 'static> std::ops::Deref for Counted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.node().value
    }
}

impl<T: Send + Sync + 'static> Drop for Counted<T> {
    fn drop(&mut self) {
        // SAFETY: we own one count of a live node.
        unsafe { Node::release(self.node, true) };
    }
}

impl<T: Send + Sync + fmt::Debug + 'static> fmt::Debug for Counted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Counted").field(&**self).finish()
    }
}
