//! Exact lookup of a record by its start key, with the records themselves as the hash
//! table: a record's id is its slot, and a key's record lives in the group of `GROUP` slots
//! its hash picks (or, when that group is full, in one of the next, linear probing by group).
//! Finding an exact key therefore reads the home group's records directly, a few adjacent
//! cache lines fetched in parallel, and nothing before them: one memory round trip, where a
//! separate index (bucket, then record) takes two.
//!
//! Free slots are marked by `next == FREE`. Each group has a one-byte count of the live keys
//! whose probe passed over it (saturating; a saturated count is never decremented), so a
//! lookup stops at the first group with a zero count, and removals need no tombstones. The
//! counts are only read when the key is not in its home group.

use super::mem::prefetch_line;
use super::{Rec, FREE};

/// Slots per group: 4 records of 48 bytes are 3 cache lines, all asked for at once.
pub(super) const GROUP: usize = 4;
const SATURATED: u8 = u8::MAX;

pub(super) struct KeyIndex {
    /// Per group: how many live keys were placed past it by their probe.
    over: Vec<u8>,
    /// The slot where group 0 starts: up to 3 slots before it are left unused so that groups
    /// start on cache lines (4 records, 192 bytes, are then exactly 3 lines).
    base: usize,
}

impl KeyIndex {
    /// An index of `groups` groups starting at slot `base` of the records.
    pub(super) fn new(groups: usize, base: usize) -> Self {
        KeyIndex { over: vec![0; groups], base }
    }

    /// The number of slots to leave unused at the start of records at `ptr` so that groups
    /// start on cache lines (0 if no number does).
    pub(super) fn align(ptr: *const Rec) -> usize {
        let size = std::mem::size_of::<Rec>();
        (0..GROUP).find(|k| (ptr as usize + k * size) % 64 == 0).unwrap_or(0)
    }

    /// The slots of group `g`, as a range of ids.
    fn slots(&self, g: usize) -> std::ops::Range<usize> {
        self.base + g * GROUP..self.base + (g + 1) * GROUP
    }

    /// The number of usable slots.
    pub(super) fn capacity(&self) -> usize {
        self.groups() * GROUP
    }

    fn groups(&self) -> usize {
        self.over.len()
    }

    /// The group where the probe of the key hashing to `h` starts (multiply-shift on the
    /// hash's high bits, so any number of groups works).
    fn home(&self, h: u64) -> usize {
        ((u128::from(h) * self.groups() as u128) >> 64) as usize
    }

    fn after(&self, g: usize) -> usize {
        if g + 1 == self.groups() {
            0
        } else {
            g + 1
        }
    }

    /// The record whose key is `key` (hashing to `h`). A key's record is in its home group
    /// or, less often, the next one: both are asked for at once, so that a displaced key
    /// costs no second round trip.
    pub(super) fn get(&self, recs: &[Rec], key: &[u8], h: u64) -> Option<u32> {
        let home = self.home(h);
        prefetch_group(&recs[self.slots(home)]);
        prefetch_group(&recs[self.slots(self.after(home))]);
        self.probe(recs, key, home)
    }

    fn probe(&self, recs: &[Rec], key: &[u8], home: usize) -> Option<u32> {
        let mut g = home;
        loop {
            let slots = self.slots(g);
            for (id, rec) in slots.clone().zip(&recs[slots]) {
                if rec.next != FREE && rec.key.is(key) {
                    return Some(id as u32);
                }
            }
            if self.over[g] == 0 {
                return None;
            }
            g = self.after(g);
            if g == home {
                return None;
            }
        }
    }

    /// Asks the cache for the home group of the key hashing to `h`.
    pub(super) fn prefetch(&self, recs: &[Rec], h: u64) {
        prefetch_group(&recs[self.slots(self.home(h))]);
    }

    /// A free slot for a new record whose key hashes to `h`; the caller fills it. There
    /// must be one.
    pub(super) fn place(&mut self, recs: &[Rec], h: u64) -> u32 {
        let home = self.home(h);
        let mut g = home;
        loop {
            if let Some(k) = recs[self.slots(g)].iter().position(|rec| rec.next == FREE) {
                return (self.slots(g).start + k) as u32;
            }
            if self.over[g] != SATURATED {
                self.over[g] += 1;
            }
            g = self.after(g);
            assert!(g != home, "the table has a free slot");
        }
    }

    /// Forgets the probe of the record in slot `id`, whose key hashes to `h`; the caller
    /// frees the slot.
    pub(super) fn remove(&mut self, h: u64, id: u32) {
        let target = (id as usize - self.base) / GROUP;
        let mut g = self.home(h);
        while g != target {
            if self.over[g] != SATURATED {
                self.over[g] -= 1;
            }
            g = self.after(g);
        }
    }

    #[cfg(test)]
    pub(super) fn check(&self, recs: &[Rec], live: &[u32]) {
        assert_eq!(recs.len(), self.base + self.groups() * GROUP, "slots come in whole groups");
        assert!(recs[..self.base].iter().all(|rec| rec.next == FREE), "alignment slots unused");
        let free = recs.iter().filter(|rec| rec.next == FREE).count();
        assert_eq!(free + live.len(), recs.len(), "every slot is live or free");
        let mut over = vec![0usize; self.groups()];
        for &id in live {
            let key = recs[id as usize].key.as_bytes();
            assert_eq!(self.get(recs, key, hash(key)), Some(id), "index lookup");
            let mut g = self.home(hash(key));
            while g != (id as usize - self.base) / GROUP {
                over[g] += 1;
                g = self.after(g);
            }
        }
        for (g, &count) in over.iter().enumerate() {
            let stored = self.over[g];
            assert!(stored == SATURATED && count >= SATURATED as usize || stored as usize == count, "overflow count");
        }
    }
}

fn prefetch_group(slots: &[Rec]) {
    let start = slots.as_ptr().cast::<u8>();
    let bytes = std::mem::size_of_val(slots);
    let mut off = 0;
    while off < bytes {
        prefetch_line(start.wrapping_add(off));
        off += 64;
    }
    prefetch_line(start.wrapping_add(bytes - 1));
}

/// Word-at-a-time multiply-rotate mixing with a murmur3 finalizer: fast on ~20-byte keys and
/// well spread in all bits. Independent of the table's size, so it can be computed ahead.
pub(super) fn hash(key: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = key.len() as u64;
    for chunk in key.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}
