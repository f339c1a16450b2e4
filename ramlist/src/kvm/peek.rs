//! [`KvmRam::peek_dirty_log`]: what the guest wrote since the last sync, read without
//! taking it (see [`RecentWrites`]).

use super::{KvmRam, KvmRamError};
use crate::recent::RecentWrites;

impl KvmRam {
    /// The pages the guest wrote since the last [`KvmRam::sync_dirty_log`], per logging
    /// slot, without clearing or re-arming anything: with manual protect,
    /// `KVM_GET_DIRTY_LOG` only reads KVM's log, whose bits stay until a sync clears
    /// them, so every page in the answer is reported by the next sync too. `None` when
    /// the log cannot be read without being cleared ([`DirtyLogMode::GetClears`]).
    ///
    /// [`DirtyLogMode::GetClears`]: super::DirtyLogMode::GetClears
    pub fn peek_dirty_log(&self) -> Result<Option<RecentWrites>, KvmRamError> {
        if !self.mode.is_manual() {
            return Ok(None);
        }
        let mut table = self.table();
        let mut recent = RecentWrites::new();
        for slot in table.iter_mut().filter(|s| s.logging()) {
            let (id, number, ram_addr) = (&slot.id, slot.slot, slot.ram_addr);
            let Some(log) = slot.log.as_mut() else {
                continue;
            };
            log.get(&self.vm).map_err(|source| KvmRamError::DirtyLog {
                id: id.clone(),
                slot: number,
                op: "KVM_GET_DIRTY_LOG",
                source,
            })?;
            // Slots never overlap in ram_addr space (each is one block's span).
            let added = recent.add(ram_addr, log.pages(), log.bits().to_vec());
            debug_assert!(added, "slot {number} overlaps another in ram_addr space");
        }
        Ok(Some(recent))
    }
}
