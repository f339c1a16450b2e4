//! The device map: which device answers a port or an MMIO address, published under RCU
//! (QEMU's FlatView), so that a vCPU exit finds its device with no lock.
//!
//! A [`FlatView`] is an immutable snapshot: per address space (port I/O, MMIO), the claimed
//! ranges sorted by base, looked up by binary search. [`DeviceMap`] holds the current view
//! in an [`rcu::RcuCell`]. Adding a device copies the view, inserts the range and publishes
//! the copy with one pointer store; the old view is freed after a grace period, once no
//! vCPU can still be dispatching through it (writers are serialized by a mutex that readers
//! never touch). vCPU threads read it through their [`rcu::QsbrReader`] (`&reader` is the
//! guard), other threads under `rcu::read_lock()`.
//!
//! Devices keep whatever locking their own state needs (the serial behind a mutex); the
//! map only finds them. A device stays alive while any view holds it (`Arc`), so a vCPU
//! that found it may finish its access after the device was removed from the map.

use rcu::{RcuCell, ReadGuard};
use std::fmt;
use std::sync::{Arc, Mutex};

/// A device on a bus: accesses arrive with their offset inside the device's range.
pub trait BusDevice: Send + Sync {
    /// An access reading `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// An access writing `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// The two address spaces a vCPU exit can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// x86 port I/O (`in`/`out`), 16-bit addresses.
    Pio,
    /// Memory-mapped I/O, guest-physical addresses.
    Mmio,
}

/// Why a range could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Zero length, or a range that wraps the address space.
    #[error("bad {space:?} range {base:#x}+{len:#x}")]
    BadRange {
        /// The space asked for.
        space: Space,
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one a device already claims.
    #[error("{space:?} range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// The space asked for.
        space: Space,
        /// First address.
        base: u64,
        /// Length.
        len: u64,
        /// The claimed range it overlaps.
        other_base: u64,
        /// Its length.
        other_len: u64,
    },
}

/// One claimed range.
#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    dev: Arc<dyn BusDevice>,
}

/// An immutable snapshot of the device map (QEMU's FlatView): claimed ranges per space,
/// sorted by base, non-overlapping.
#[derive(Clone, Default)]
pub struct FlatView {
    pio: Vec<Range>,
    mmio: Vec<Range>,
}

impl FlatView {
    fn ranges(&self, space: Space) -> &[Range] {
        match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        }
    }

    /// The device claiming `addr` in `space`, and the offset of `addr` in its range.
    #[inline]
    pub fn find(&self, space: Space, addr: u64) -> Option<(&dyn BusDevice, u64)> {
        let ranges = self.ranges(space);
        // The last range starting at or below `addr`.
        let i = ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = &ranges[i];
        let offset = addr - r.base;
        (offset < r.len).then(|| (&*r.dev, offset))
    }

    /// Dispatches a read of `data.len()` bytes at `addr`; false if no device claims it.
    #[inline]
    pub fn read(&self, space: Space, addr: u64, data: &mut [u8]) -> bool {
        match self.find(space, addr) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write of `data` at `addr`; false if no device claims it.
    #[inline]
    pub fn write(&self, space: Space, addr: u64, data: &[u8]) -> bool {
        match self.find(space, addr) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Number of claimed ranges in `space`.
    pub fn len(&self, space: Space) -> usize {
        self.ranges(space).len()
    }

    /// True if nothing is claimed in either space.
    pub fn is_empty(&self) -> bool {
        self.pio.is_empty() && self.mmio.is_empty()
    }

    fn insert(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
    ) -> Result<(), MapError> {
        let limit = match space {
            Space::Pio => 1 << 16,
            Space::Mmio => u64::MAX,
        };
        let end = base.checked_add(len).filter(|&e| len != 0 && e <= limit);
        let Some(end) = end else {
            return Err(MapError::BadRange { space, base, len });
        };
        let ranges = match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        let at = ranges.partition_point(|r| r.base < base);
        // Only the neighbours can overlap: the ranges are sorted and disjoint.
        let before = at.checked_sub(1).map(|i| &ranges[i]);
        let after = ranges.get(at);
        for other in before.into_iter().chain(after) {
            if other.base < end && base < other.base + other.len {
                return Err(MapError::Overlap {
                    space,
                    base,
                    len,
                    other_base: other.base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(at, Range { base, len, dev });
        Ok(())
    }

    fn remove(&mut self, space: Space, base: u64) -> Option<Arc<dyn BusDevice>> {
        let ranges = match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        let i = ranges.iter().position(|r| r.base == base)?;
        Some(ranges.remove(i).dev)
    }
}

impl fmt::Debug for FlatView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |rs: &[Range]| rs.iter().map(|r| (r.base, r.len)).collect::<Vec<_>>();
        f.debug_struct("FlatView")
            .field("pio", &list(&self.pio))
            .field("mmio", &list(&self.mmio))
            .finish()
    }
}

/// The VM's device map: the current [`FlatView`], replaced whole (copy, insert, publish)
/// when devices come and go; looked up with no lock.
pub struct DeviceMap {
    view: RcuCell<FlatView>,
    writer: Mutex<()>,
}

impl Default for DeviceMap {
    fn default() -> Self {
        DeviceMap::new()
    }
}

impl DeviceMap {
    /// An empty map.
    pub fn new() -> DeviceMap {
        DeviceMap {
            view: RcuCell::new(FlatView::default()),
            writer: Mutex::new(()),
        }
    }

    /// The current view, valid for the read section `guard` proves (on a vCPU thread,
    /// `&reader`: until its next quiescent state).
    #[inline]
    pub fn view<'g>(&self, guard: &'g ReadGuard) -> &'g FlatView {
        self.view.load(guard)
    }

    /// Claims `len` addresses from `base` in `space` for `dev`, publishing a new view.
    pub fn add(
        &self,
        space: Space,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
    ) -> Result<(), MapError> {
        self.update(|v| v.insert(space, base, len, dev))
    }

    /// Releases the range starting at `base` in `space`, publishing a new view; the device
    /// it held, if any. vCPUs dispatching through an older view may still reach it.
    pub fn remove(&self, space: Space, base: u64) -> Option<Arc<dyn BusDevice>> {
        let mut out = None;
        let _ = self.update(|v| {
            out = v.remove(space, base);
            Ok(())
        });
        out
    }

    /// Copy, change, publish; writers are serialized, readers never wait.
    fn update(
        &self,
        f: impl FnOnce(&mut FlatView) -> Result<(), MapError>,
    ) -> Result<(), MapError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.view.load(&rcu::read_lock()).clone();
        f(&mut next)?;
        self.view.store(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// Records the last offset written, answers reads with its tag.
    #[derive(Default)]
    struct Probe {
        tag: u8,
        last: AtomicU64,
    }

    impl BusDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(self.tag.wrapping_add(offset as u8));
        }
        fn write(&self, offset: u64, _data: &[u8]) {
            self.last.store(offset, Relaxed);
        }
    }

    fn probe(tag: u8) -> Arc<Probe> {
        Arc::new(Probe {
            tag,
            ..Probe::default()
        })
    }

    #[test]
    fn lookup_finds_the_claiming_device_and_offset() {
        let map = DeviceMap::new();
        let (a, b) = (probe(0x10), probe(0x20));
        map.add(Space::Pio, 0x3f8, 8, a.clone()).unwrap();
        map.add(Space::Pio, 0x60, 1, b.clone()).unwrap();
        map.add(Space::Mmio, 0xd000_0000, 0x1000, probe(0x30))
            .unwrap();
        let g = rcu::read_lock();
        let v = map.view(&g);
        let mut byte = [0];
        assert!(v.read(Space::Pio, 0x3fd, &mut byte));
        assert_eq!(byte, [0x15]);
        assert!(v.write(Space::Pio, 0x3ff, &[1]));
        assert_eq!(a.last.load(Relaxed), 7);
        assert!(v.write(Space::Pio, 0x60, &[1]));
        for unclaimed in [0, 0x5f, 0x61, 0x3f7, 0x400, 0xffff] {
            assert!(!v.write(Space::Pio, unclaimed, &[1]), "{unclaimed:#x}");
        }
        assert!(v.read(Space::Mmio, 0xd000_0fff, &mut byte));
        assert!(!v.read(Space::Mmio, 0xd000_1000, &mut byte));
        assert!(!v.read(Space::Mmio, 0x3f8, &mut byte));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused_and_change_nothing() {
        let map = DeviceMap::new();
        map.add(Space::Pio, 0x3f8, 8, probe(0)).unwrap();
        for (base, len) in [(0x3f0, 9), (0x3ff, 1), (0x3f8, 8), (0x3f0, 0x20)] {
            assert!(matches!(
                map.add(Space::Pio, base, len, probe(0)),
                Err(MapError::Overlap { .. })
            ));
        }
        for (base, len) in [(0x10, 0), (0xffff, 2)] {
            assert!(matches!(
                map.add(Space::Pio, base, len, probe(0)),
                Err(MapError::BadRange { .. })
            ));
        }
        map.add(Space::Pio, 0x3f0, 8, probe(0)).unwrap();
        map.add(Space::Pio, 0x400, 1, probe(0)).unwrap();
        assert_eq!(map.view(&rcu::read_lock()).len(Space::Pio), 3);
    }

    #[test]
    fn a_view_read_before_a_change_stays_valid_and_unchanged() {
        let map = DeviceMap::new();
        let a = probe(1);
        map.add(Space::Pio, 0x80, 1, a.clone()).unwrap();
        let mut reader = rcu::QsbrReader::register();
        let old = map.view(&reader);
        // Another thread changes the map meanwhile: the vCPU's view is not freed under it.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(map.remove(Space::Pio, 0x80).is_some());
                map.add(Space::Pio, 0x81, 1, probe(2)).unwrap();
            });
        });
        assert!(old.write(Space::Pio, 0x80, &[0]));
        assert!(!old.write(Space::Pio, 0x81, &[0]));
        reader.quiescent_state();
        let new = map.view(&reader);
        assert!(!new.write(Space::Pio, 0x80, &[0]));
        assert!(new.write(Space::Pio, 0x81, &[0]));
    }
}
