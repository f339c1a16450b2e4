//! Userspace read-copy-update, QEMU style.
//!
//! # The problem
//!
//! Some data is read all the time and changed rarely: the list of guest RAM blocks that
//! every device access and every migration pass walks, say. A reader-writer lock makes
//! each reader write to a shared lock word, so readers on different CPUs fight over one
//! cache line, and a writer stalls them all. RCU ("read, copy, update") lets readers take
//! no lock at all: a writer never changes what a reader may be looking at, it *publishes*
//! a new version with one pointer store and *reclaims* the old one only after every reader
//! that could have seen it is gone.
//!
//! # The pieces
//!
//! - [`read_lock`] opens a read-side critical section and returns a [`ReadGuard`];
//!   sections nest and end when the guard drops. Everything read through RCU pointers
//!   borrows the guard, so the compiler refuses a reference that outlives its section.
//! - A *grace period* is a span of time in which every thread has left every section that
//!   started before it. [`synchronize`] waits for one. It never waits for sections that
//!   start after it, so readers can never starve a writer.
//! - [`call_rcu()`] runs a closure after a grace period, on a thread of its own, without
//!   blocking the writer; [`drain_call_rcu`] waits for those queued so far.
//! - [`RcuCell`] is an RCU-protected pointer, [`RcuList`] an RCU-protected list,
//!   [`RcuArray`] an RCU-protected resizable array, [`Counted`] a reference that outlives
//!   a section.
//! - [`QsbrReader`] makes a thread that loops (a vCPU) a *quiescent-state* reader
//!   (liburcu's qsbr flavour): its reads cost nothing, it reports quiescent states between
//!   units of work and goes offline around blocking calls; it shares grace periods with
//!   `read_lock` readers.
//!
//! Readers cost a load, a store and a compiler barrier (see [`BarrierMode`]); the writer
//! pays instead, with one `membarrier` system call per grace period.
//!
//! # Pattern: replace and free
//!
//! A value that is read often and replaced whole:
//!
//! ```
//! use rcu::RcuCell;
//! struct Config { mtu: u32 }
//! let config = RcuCell::new(Config { mtu: 1500 });
//!
//! // Reader.
//! {
//!     let guard = rcu::read_lock();
//!     let c = config.load(&guard);
//!     assert!(c.mtu >= 1500);
//! }
//! // Writer: publish the new value; the old one is freed after a grace period.
//! config.store(Config { mtu: 9000 });
//! ```
//!
//! With a reader-writer lock the same would read `config.read().mtu` and
//! `*config.write() = Config { .. }`: the writer waits for readers and readers for the
//! writer. With RCU neither waits; the old `Config` lingers until readers move on. A
//! writer that needs the old value (to reuse it, or to free it synchronously) calls
//! [`RcuCell::replace`] and then [`Retired::synchronize`], which waits for a grace period
//! before handing it back — QEMU's `atomic_rcu_set(&p, new); synchronize_rcu(); g_free(old)`.
//!
//! # Pattern: a list readers walk while writers change it
//!
//! ```
//! let list = rcu::RcuList::new();
//! {
//!     let mut w = list.lock(); // the writer lock; readers never take it
//!     w.push_back("ram0");
//!     w.push_back("ram1");
//! }
//! {
//!     let guard = rcu::read_lock();
//!     assert_eq!(list.iter(&guard).count(), 2);
//! }
//! list.lock().remove_first(|id| *id == "ram0"); // reclaimed after a grace period
//! ```
//!
//! The rwlock equivalent holds the read lock across the walk and the write lock across
//! the removal; here a walk that races with the removal either sees the element or not,
//! and in both cases reads valid memory.
//!
//! # Pattern: refcount plus RCU
//!
//! A reader that must keep an element after its section ends (migration holding its
//! current RAM block between passes) takes a count under the guard — QEMU's `foo_ref()`
//! inside `rcu_read_lock()`:
//!
//! ```
//! let list = rcu::RcuList::new();
//! list.lock().push_back(String::from("pc.ram"));
//! let kept: rcu::Counted<String> = {
//!     let guard = rcu::read_lock();
//!     list.iter(&guard).next().unwrap().counted()
//! };
//! list.lock().remove_first(|_| true); // unlinked; still alive through `kept`
//! assert_eq!(*kept, "pc.ram");
//! drop(kept); // the last count: reclaimed through call_rcu
//! ```
//!
//! Under a reader-writer lock one would hold the read lock for as long as the element is
//! needed, blocking every writer; here the writer unlinks at once and only the memory waits.
//!
//! # Pattern: resizable arrays
//!
//! An array that grows while readers index it is copied, the copy published, and the old
//! copy reclaimed after a grace period:
//!
//! ```
//! let sizes = rcu::RcuArray::new(vec![4096u64]);
//! sizes.grow_with(3, |i| 4096 * (i as u64 + 1));
//! let guard = rcu::read_lock();
//! assert_eq!(sizes.load(&guard), &[4096, 8192, 12288]);
//! ```
//!
//! The rwlock version takes the write lock to `Vec::resize` and every indexer takes the
//! read lock; here indexers read whichever copy was current when they looked.
//!
//! # Rules
//!
//! - [`synchronize`] and [`drain_call_rcu`] panic inside a read section, or on a thread
//!   whose [`QsbrReader`] is online: they would wait for it forever
//!   ([`QsbrReader::synchronize`] goes offline around the wait).
//! - A lock handed to the call_rcu thread ([`set_call_rcu_lock`], normally a [`BigLock`],
//!   the VMM's big lock) is held around each batch of callbacks; [`drain_call_rcu`] on a
//!   thread that holds it releases it while it waits, as QEMU's does with the BQL.
//! - Sections should be short; a long one delays every reclamation (migration holds one
//!   per batch, not per pass).
//! - Threads register on their first `read_lock` and unregister at exit; nothing to do.
//!   A thread that exits inside a section (its guard leaked) aborts the process: what it
//!   read could otherwise be freed under references that outlive it (see `reader.rs`).
//! - `fork` is handled (`pthread_atfork`, as QEMU does): in the child, only the forking
//!   thread is a reader, grace periods and call_rcu work, and pending callbacks run there.
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

mod array;
mod barrier;
mod big_lock;
mod call_rcu;
mod callback;
mod cell;
mod domain;
mod event;
#[cfg(not(loom))]
mod fork;
mod grace;
mod list;
mod primitive;
mod qsbr;
mod reader;

pub use array::RcuArray;
pub use barrier::{barrier_mode, set_barrier_mode, BarrierMode, BarrierModeLocked};
pub use big_lock::{BigLock, BigLockGuard};
#[cfg(loom)]
pub use call_rcu::shutdown_call_rcu_thread;
pub use call_rcu::{
    call_rcu, call_rcu_stats, drain_call_rcu, set_call_rcu_lock, BatchLock, CallRcuStats,
    BATCH_SIZE, BATCH_WINDOW, MAX_BATCH_SIZE,
};
pub use cell::{RcuCell, Retired};
pub use grace::{grace_periods_completed, synchronize, synchronize_waiters};
pub use list::{Counted, CursorMut, Entry, Iter, ListWriter, RcuList, WriterIter};
pub use qsbr::{QsbrOffline, QsbrReader};
pub use reader::{in_read_section, read_lock, registered_readers, ReadGuard};
