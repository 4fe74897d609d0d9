//! Exact lookup of a record by its start key: an open-addressing hash table (linear probing)
//! of record ids. Keys stay in the records; a one-byte hash tag per slot lets a probe skip
//! non-matching slots without reading their records, so a hit reads one record and a miss
//! usually none. Slots come in cache-line buckets of 12 tags and 12 ids, so reading a slot
//! is one cache miss; a slot costs 5.3 bytes.

use super::{huge_vec, prefetch, Rec};

/// The table grows past this load factor (4/5)...
const MAX_LOAD: (usize, usize) = (4, 5);
/// ... to twice the number of entries, i.e. load 1/2.
const GROWTH: usize = 2;
/// The tag of an empty slot; entries' tags are never 0.
const EMPTY: u8 = 0;
const BUCKET: usize = 12;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket {
    tags: [u8; BUCKET],
    ids: [u32; BUCKET],
}

// One bucket, one cache line.
const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

const EMPTY_BUCKET: Bucket = Bucket { tags: [EMPTY; BUCKET], ids: [0; BUCKET] };

pub(super) struct KeyIndex {
    buckets: Vec<Bucket>,
    len: usize,
}

impl KeyIndex {
    pub(super) fn new() -> Self {
        KeyIndex { buckets: vec![EMPTY_BUCKET], len: 0 }
    }

    /// Looks up several keys at once, probing them in lockstep so that their cache misses
    /// overlap instead of adding up. `hashes` are the keys' [`hash`]es.
    pub(super) fn get<const N: usize>(&self, recs: &[Rec], keys: [&[u8]; N], hashes: [u64; N]) -> [Option<u32>; N] {
        let mut probes = hashes.map(|h| Some(self.home(h)));
        let mut found = [None; N];
        while probes.iter().any(Option::is_some) {
            let slots = probes.map(|probe| probe.map(|(i, _)| self.slot(i)));
            for (j, slot) in slots.into_iter().enumerate() {
                let (Some((i, tag)), Some((slot_tag, id))) = (probes[j], slot) else { continue };
                if slot_tag == EMPTY {
                    probes[j] = None;
                } else if slot_tag == tag && recs[id as usize].key.as_bytes() == keys[j] {
                    (probes[j], found[j]) = (None, Some(id));
                } else {
                    probes[j] = Some((self.after(i), tag));
                }
            }
        }
        found
    }

    /// Asks the cache for the bucket where the key hashing to `h` is probed first.
    pub(super) fn prefetch(&self, h: u64) {
        prefetch(&self.buckets[self.home(h).0 / BUCKET]);
    }

    /// The first id in the home bucket of the key hashing to `h` whose tag matches, without
    /// reading any record: the key's record if it is present and its probe ends in that
    /// bucket, otherwise most likely nothing (a wrong guess is only a wasted prefetch).
    pub(super) fn guess(&self, h: u64) -> Option<u32> {
        let (i, tag) = self.home(h);
        let bucket = &self.buckets[i / BUCKET];
        (i % BUCKET..BUCKET).find(|&k| bucket.tags[k] == tag).map(|k| bucket.ids[k])
    }

    /// Adds `id` under its record's key, which must not be present yet.
    pub(super) fn insert(&mut self, recs: &[Rec], id: u32) {
        if (self.len + 1) * MAX_LOAD.1 > self.capacity() * MAX_LOAD.0 {
            let buckets = ((self.len + 1) * GROWTH).div_ceil(BUCKET);
            let old = std::mem::replace(&mut self.buckets, huge_vec(buckets));
            self.buckets.resize(buckets, EMPTY_BUCKET);
            for bucket in old {
                for (_, &id) in bucket.tags.iter().zip(&bucket.ids).filter(|&(&tag, _)| tag != EMPTY) {
                    self.place(recs, id);
                }
            }
        }
        self.place(recs, id);
        self.len += 1;
    }

    /// Removes `id`, whose record still holds its key. Later entries of the probe run shift
    /// back into the hole (no tombstones), so lookups never slow down with churn.
    pub(super) fn remove(&mut self, recs: &[Rec], id: u32) {
        let (mut hole, _) = self.home(hash(recs[id as usize].key.as_bytes()));
        while !matches!(self.slot(hole), (tag, other) if tag != EMPTY && other == id) {
            hole = self.after(hole);
        }
        let cap = self.capacity();
        let mut i = hole;
        loop {
            i = self.after(i);
            let (tag, other) = self.slot(i);
            if tag == EMPTY {
                break;
            }
            // The entry at `i` may fill the hole unless its home lies cyclically in (hole, i].
            let (home, _) = self.home(hash(recs[other as usize].key.as_bytes()));
            if (i + cap - home) % cap >= (i + cap - hole) % cap {
                self.set(hole, tag, other);
                hole = i;
            }
        }
        self.set(hole, EMPTY, 0);
        self.len -= 1;
    }

    fn place(&mut self, recs: &[Rec], id: u32) {
        let (mut i, tag) = self.home(hash(recs[id as usize].key.as_bytes()));
        while self.slot(i).0 != EMPTY {
            i = self.after(i);
        }
        self.set(i, tag, id);
    }

    fn capacity(&self) -> usize {
        self.buckets.len() * BUCKET
    }

    /// The tag and id in slot `i`.
    fn slot(&self, i: usize) -> (u8, u32) {
        let bucket = &self.buckets[i / BUCKET];
        (bucket.tags[i % BUCKET], bucket.ids[i % BUCKET])
    }

    fn set(&mut self, i: usize, tag: u8, id: u32) {
        let bucket = &mut self.buckets[i / BUCKET];
        (bucket.tags[i % BUCKET], bucket.ids[i % BUCKET]) = (tag, id);
    }

    /// The slot where the probe of the key hashing to `h` starts (from the hash's high bits
    /// by multiply-shift, so any capacity works) and its tag (from the low bits).
    fn home(&self, h: u64) -> (usize, u8) {
        let slot = ((u128::from(h) * self.capacity() as u128) >> 64) as usize;
        (slot, (h as u8).max(1))
    }

    fn after(&self, i: usize) -> usize {
        if i + 1 == self.capacity() {
            0
        } else {
            i + 1
        }
    }

    #[cfg(test)]
    pub(super) fn check(&self, recs: &[Rec], live: &[u32]) {
        assert_eq!(self.len, live.len(), "index size");
        assert_eq!(self.buckets.iter().flat_map(|b| b.tags).filter(|&tag| tag != EMPTY).count(), live.len());
        for &id in live {
            let key = recs[id as usize].key.as_bytes();
            assert_eq!(self.get(recs, [key], [hash(key)]), [Some(id)], "index lookup");
        }
    }
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
