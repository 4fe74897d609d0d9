//! The region table: what PD knows (boundaries, epochs, peers, leaders) plus, per region,
//! the ground truth of how far its keys are flushed. One `BTreeMap` keyed by raw start key
//! keeps regions contiguous by construction: a region ends where the next one starts.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::types::{DisplayKey, KeyRange, RegionId, StoreId, Ts};

use super::oracle::{overlaps, Truth};
use crate::rng::Rng;

/// A raw key shared between the table, the flush maps and events without copying.
pub type Key = Arc<[u8]>;

/// Replicas per region, as in a default TiKV deployment.
pub const MAX_REPLICAS: usize = 3;
/// Region ids start here so that they never read like store ids in logs and tests.
pub const FIRST_REGION_ID: RegionId = 1000;
/// The first table id of the generated key space (user tables start near 100 in TiDB).
const FIRST_TABLE_ID: u64 = 100;

/// The stores holding a region's replicas, inline: a million regions must not mean a
/// million small heap vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peers {
    stores: [StoreId; MAX_REPLICAS],
    len: u8,
}

impl Peers {
    fn new(stores: &[StoreId]) -> Peers {
        let mut peers = Peers { stores: [0; MAX_REPLICAS], len: stores.len() as u8 };
        peers.stores[..stores.len()].copy_from_slice(stores);
        peers
    }

    pub fn as_slice(&self) -> &[StoreId] {
        &self.stores[..self.len as usize]
    }

    pub fn contains(&self, store: StoreId) -> bool {
        self.as_slice().contains(&store)
    }
}

#[derive(Debug, Clone)]
pub struct RegionMeta {
    pub id: RegionId,
    /// Exclusive raw end key; empty = +inf.
    pub end: Key,
    pub version: u64,
    pub conf_ver: u64,
    pub peers: Peers,
    pub leader: Option<StoreId>,
    /// Excluded from every flush: its leader never reports it and its truth never rises.
    pub never_flush: bool,
    pub truth: Truth,
}

impl RegionMeta {
    /// Peer ids are derived rather than stored: no client on the advancer's path reads them,
    /// but they must be stable and distinct per (region, store).
    pub fn peer_id(&self, store: StoreId) -> u64 {
        self.id << 16 | (store & 0xFFFF)
    }
}

/// One region as a store recorded it in a flush: what `GetLastFlushTSOfRegion` and flush
/// events report until the store's next flush.
#[derive(Debug, Clone)]
pub struct FlushedRegion {
    pub id: RegionId,
    pub version: u64,
    pub start: Key,
    pub end: Key,
    /// The flush ts, or less when a lock holds the region's resolved ts back.
    pub checkpoint: Ts,
}

pub struct RegionTable {
    by_start: BTreeMap<Key, RegionMeta>,
    start_of: HashMap<RegionId, Key>,
    stores: Vec<StoreId>,
    next_id: u64,
    rng: Rng,
}

/// TiDB's `codec.EncodeInt`: big-endian with the sign bit flipped, so keys sort like ids.
fn encode_int(v: u64) -> [u8; 8] {
    (v ^ (1 << 63)).to_be_bytes()
}

/// `t{table}`: where TiDB starts a table's region.
pub fn table_prefix(table: u64) -> Vec<u8> {
    let mut key = b"t".to_vec();
    key.extend_from_slice(&encode_int(table));
    key
}

/// `t{table}_r{row}`: a record key, as TiDB's tablecodec builds it.
pub fn record_key(table: u64, row: u64) -> Vec<u8> {
    let mut key = table_prefix(table);
    key.extend_from_slice(b"_r");
    key.extend_from_slice(&encode_int(row));
    key
}

/// `count - 1` increasing split keys that look like a TiDB cluster's: each table starts a
/// region, and its records are split at random row ids.
fn boundaries(count: usize, rng: &mut Rng) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::with_capacity(count.saturating_sub(1));
    let (mut table, mut row) = (FIRST_TABLE_ID, 0);
    if count > 1 {
        keys.push(table_prefix(table).into());
    }
    while keys.len() + 1 < count {
        if rng.below(64) == 0 {
            table += 1 + rng.below(3);
            row = 0;
            keys.push(table_prefix(table).into());
        } else {
            row += 1 + rng.below(10_000);
            keys.push(record_key(table, row).into());
        }
    }
    keys
}

impl RegionTable {
    /// `regions` regions over `stores` (ids `1..=stores`), every key's truth at `start_ts`.
    pub fn build(stores: usize, regions: usize, seed: u64, start_ts: Ts) -> RegionTable {
        let mut rng = Rng::new(seed);
        let store_ids: Vec<StoreId> = (1..=stores as StoreId).collect();
        let replicas = stores.min(MAX_REPLICAS);
        let mut starts: Vec<Key> = vec![Key::from(&b""[..])];
        starts.extend(boundaries(regions.max(1), &mut rng));
        let mut start_of = HashMap::with_capacity(starts.len());
        let mut entries = Vec::with_capacity(starts.len());
        for (i, start) in starts.iter().enumerate() {
            let id = FIRST_REGION_ID + i as u64;
            let peers: Vec<StoreId> = rng.pick_distinct(stores, replicas).into_iter().map(|s| store_ids[s]).collect();
            let meta = RegionMeta {
                id,
                end: starts.get(i + 1).cloned().unwrap_or_else(|| Key::from(&b""[..])),
                version: 1,
                conf_ver: 1,
                peers: Peers::new(&peers),
                leader: peers.first().copied(),
                never_flush: false,
                truth: Truth::Uniform(start_ts),
            };
            start_of.insert(id, start.clone());
            entries.push((start.clone(), meta));
        }
        RegionTable {
            next_id: FIRST_REGION_ID + entries.len() as u64,
            by_start: entries.into_iter().collect(),
            start_of,
            stores: store_ids,
            rng,
        }
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &RegionMeta)> {
        self.by_start.iter()
    }

    pub fn has_store(&self, store: StoreId) -> bool {
        self.stores.contains(&store)
    }

    /// The region containing `raw` (there always is one: the table tiles the key space).
    pub fn region_at(&self, raw: &[u8]) -> (&Key, &RegionMeta) {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(raw)))
            .next_back()
            .expect("the first region starts at the empty key")
    }

    pub fn get(&self, id: RegionId) -> Option<(&Key, &RegionMeta)> {
        let start = self.start_of.get(&id)?;
        self.by_start.get_key_value(start)
    }

    /// Regions from the one containing `start` on, in key order, as PD's scans see them.
    pub fn scan_from(&self, start: &[u8]) -> impl Iterator<Item = (&Key, &RegionMeta)> {
        let first = self.region_at(start).0.clone();
        self.by_start.range(first..)
    }

    /// Regions overlapping `range`, in key order.
    pub fn overlapping<'a>(&'a self, range: &'a KeyRange) -> impl Iterator<Item = (&'a Key, &'a RegionMeta)> {
        self.scan_from(&range.start).take_while(move |(start, meta)| overlaps(start, &meta.end, range))
    }

    /// The oracle: the lowest truth over `range`.
    pub fn true_checkpoint(&self, range: &KeyRange) -> Ts {
        self.overlapping(range)
            .filter_map(|(start, meta)| meta.truth.min_within(start, &meta.end, range))
            .min()
            .unwrap_or(Ts::MAX)
    }

    fn meta_mut(&mut self, id: RegionId) -> Result<&mut RegionMeta> {
        let start = self.start_of.get(&id).ok_or_else(|| no_region(id))?;
        Ok(self.by_start.get_mut(start).expect("start_of indexes by_start"))
    }

    fn check_store(&self, store: StoreId) -> Result<()> {
        if self.has_store(store) {
            Ok(())
        } else {
            Err(Error::Store { store_id: store, address: String::new(), reason: "no such store in the sim".into() })
        }
    }

    /// Splits the region containing `at` there. As TiKV does by default (right-derive), the
    /// right half keeps the old id and the left half gets a new one; both bump `version`.
    /// Returns `(left, right)`.
    pub fn split(&mut self, at: &[u8]) -> Result<(RegionId, RegionId)> {
        let (start, meta) = self.region_at(at);
        if start.as_ref() == at {
            return Err(Error::Region {
                region_id: meta.id,
                reason: format!("cannot split at {}: it is already the region's start key", DisplayKey(at)),
            });
        }
        let (start, right_id) = (start.clone(), meta.id);
        let at: Key = at.into();
        let left_id = self.next_id;
        self.next_id += 1;
        let left = self.by_start.get_mut(&start).expect("region_at returned it");
        let (left_truth, right_truth) = left.truth.split(&start, &at);
        let mut right = left.clone();
        left.id = left_id;
        left.end = at.clone();
        left.version += 1;
        left.truth = left_truth;
        right.version += 1;
        right.truth = right_truth;
        self.start_of.insert(left_id, start);
        self.start_of.insert(right_id, at.clone());
        self.by_start.insert(at, right);
        Ok((left_id, right_id))
    }

    /// Merges `right` into its left neighbour `left`, which survives with both ranges, the
    /// larger version + 1, and its own peers and leader.
    pub fn merge(&mut self, left: RegionId, right: RegionId) -> Result<RegionId> {
        let right_start = self.start_of.get(&right).cloned().ok_or_else(|| no_region(right))?;
        let left_start = self.start_of.get(&left).cloned().ok_or_else(|| no_region(left))?;
        if self.by_start[&left_start].end != right_start {
            return Err(Error::Region {
                region_id: left,
                reason: format!("cannot merge region {right} into it: region {right} is not its right neighbour"),
            });
        }
        let absorbed = self.by_start.remove(&right_start).expect("start_of indexes by_start");
        self.start_of.remove(&right);
        let survivor = self.by_start.get_mut(&left_start).expect("checked above");
        survivor.truth = survivor.truth.join(&left_start, &absorbed.truth, &right_start);
        survivor.end = absorbed.end;
        survivor.version = survivor.version.max(absorbed.version) + 1;
        survivor.conf_ver = survivor.conf_ver.max(absorbed.conf_ver);
        Ok(left)
    }

    /// Makes `to` the leader. When `to` holds no replica, one follower replica moves there
    /// first (a membership change: `conf_ver` bumps), as PD would schedule it.
    pub fn transfer_leader(&mut self, region: RegionId, to: StoreId) -> Result<()> {
        self.check_store(to)?;
        let meta = self.meta_mut(region)?;
        if !meta.peers.contains(to) {
            let (leader, len) = (meta.leader, meta.peers.len as usize);
            let slot = meta.peers.stores[..len]
                .iter_mut()
                .rev()
                .find(|s| Some(**s) != leader)
                .ok_or_else(|| Error::Region { region_id: region, reason: "no follower replica to move".into() })?;
            *slot = to;
            meta.conf_ver += 1;
        }
        meta.leader = Some(to);
        Ok(())
    }

    pub fn remove_leader(&mut self, region: RegionId) -> Result<()> {
        self.meta_mut(region)?.leader = None;
        Ok(())
    }

    pub fn set_never_flush(&mut self, region: RegionId, never: bool) -> Result<()> {
        self.meta_mut(region)?.never_flush = never;
        Ok(())
    }

    /// Gives every region a random leader among its replicas on stores where `alive` holds
    /// (PD never elects a leader on a dead store); regions without such a replica keep theirs.
    pub fn scatter(&mut self, alive: impl Fn(StoreId) -> bool) {
        self.elect_leaders(|_| true, alive);
    }

    /// Every region `store` leads elects a random leader among its other replicas on stores
    /// where `alive` holds, as Raft does once the leader is lost (and PD's evict-leader
    /// before a planned restart); regions without such a replica keep theirs. Returns how
    /// many regions moved.
    pub fn move_leaders_off(&mut self, store: StoreId, alive: impl Fn(StoreId) -> bool) -> usize {
        self.elect_leaders(|leader| leader == Some(store), |s| s != store && alive(s))
    }

    /// A random leader among the `alive` replicas for each region whose leader is `chosen`;
    /// returns how many got one.
    fn elect_leaders(&mut self, chosen: impl Fn(Option<StoreId>) -> bool, alive: impl Fn(StoreId) -> bool) -> usize {
        let mut elected = 0;
        for meta in self.by_start.values_mut().filter(|meta| chosen(meta.leader)) {
            let candidates: Vec<StoreId> = meta.peers.as_slice().iter().copied().filter(|&s| alive(s)).collect();
            if !candidates.is_empty() {
                meta.leader = Some(candidates[self.rng.below(candidates.len() as u64) as usize]);
                elected += 1;
            }
        }
        elected
    }

    /// One flush by each store in `flush_ts`: its leader regions (never-flush ones aside)
    /// become truly flushed up to its ts, or up to the oldest lock in them (`locks`: key
    /// order, `(key, start ts)`), as TiKV's resolver holds resolved ts at a lock's start ts.
    /// They are returned as the store's new flushed set.
    pub fn flush(
        &mut self,
        flush_ts: &HashMap<StoreId, Ts>,
        locks: &[(Key, Ts)],
    ) -> HashMap<StoreId, Vec<FlushedRegion>> {
        let mut flushed: HashMap<StoreId, Vec<FlushedRegion>> = flush_ts.keys().map(|&s| (s, Vec::new())).collect();
        let mut next_lock = 0;
        for (start, meta) in self.by_start.iter_mut() {
            // Regions tile the key space in order, and so do the locks: one merge walk.
            let mut oldest_lock = Ts::MAX;
            while let Some((key, ts)) = locks.get(next_lock) {
                if !meta.end.is_empty() && key.as_ref() >= meta.end.as_ref() {
                    break;
                }
                oldest_lock = oldest_lock.min(*ts);
                next_lock += 1;
            }
            let Some(leader) = meta.leader else { continue };
            let (Some(&ts), false) = (flush_ts.get(&leader), meta.never_flush) else { continue };
            let checkpoint = ts.min(oldest_lock);
            meta.truth.raise(checkpoint);
            flushed.get_mut(&leader).expect("one entry per flushing store").push(FlushedRegion {
                id: meta.id,
                version: meta.version,
                start: start.clone(),
                end: meta.end.clone(),
                checkpoint,
            });
        }
        flushed
    }
}

fn no_region(id: RegionId) -> Error {
    Error::Region { region_id: id, reason: "no such region in the sim".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(regions: usize) -> RegionTable {
        RegionTable::build(4, regions, 42, 100)
    }

    fn assert_tiles(t: &RegionTable) {
        let mut expected_start: Vec<u8> = Vec::new();
        for (start, meta) in t.iter() {
            assert_eq!(start.as_ref(), expected_start.as_slice());
            assert!(meta.end.is_empty() || meta.end.as_ref() > start.as_ref());
            expected_start = meta.end.to_vec();
        }
        assert!(expected_start.is_empty(), "the last region ends at +inf");
    }

    #[test]
    fn builds_region_like_keys_that_tile_the_key_space() {
        let t = table(1000);
        assert_eq!(t.len(), 1000);
        assert_tiles(&t);
        let task = KeyRange::new("t", "u");
        assert_eq!(t.overlapping(&task).count(), 1000, "every region holds table keys");
        assert!(t.iter().all(|(_, m)| m.peers.as_slice().len() == 3 && m.leader.is_some()));
        assert_eq!(t.region_at(&record_key(100, 1)).1.id, FIRST_REGION_ID + 1);
    }

    #[test]
    fn split_and_merge_keep_tiling_epochs_and_truth() {
        let mut t = table(3);
        let key = record_key(100, 0);
        let before = t.region_at(&key).1.clone();
        let (left, right) = t.split(&key).unwrap();
        assert_eq!(right, before.id, "right-derive keeps the old id on the right");
        assert_tiles(&t);
        assert_eq!(t.get(left).unwrap().1.version, before.version + 1);
        assert!(t.split(&key).is_err(), "already a boundary");

        let mut flush = HashMap::new();
        flush.insert(t.get(left).unwrap().1.leader.unwrap(), 500);
        t.flush(&flush, &[]);
        let merged = t.merge(left, right).unwrap();
        assert_tiles(&t);
        let meta = t.get(merged).unwrap().1;
        assert_eq!(meta.version, before.version + 2);
        assert!(t.get(right).is_none());
        assert!(t.merge(merged, FIRST_REGION_ID).is_err(), "not the right neighbour");
        assert_eq!(t.true_checkpoint(&KeyRange::full()), 100);
    }

    #[test]
    fn leaders_move_off_a_lost_store_to_live_replicas_only() {
        let mut t = table(200);
        let lost = 1;
        let led_before: Vec<RegionId> = t.iter().filter(|(_, m)| m.leader == Some(lost)).map(|(_, m)| m.id).collect();
        let others_before: Vec<_> =
            t.iter().filter(|(_, m)| m.leader != Some(lost)).map(|(_, m)| (m.id, m.leader)).collect();
        assert!(!led_before.is_empty());
        let dead = 2;
        let moved = t.move_leaders_off(lost, |s| s != dead);
        let stuck = led_before.iter().filter(|&&id| t.get(id).unwrap().1.leader == Some(lost)).count();
        assert_eq!(moved + stuck, led_before.len());
        for &id in &led_before {
            let meta = t.get(id).unwrap().1;
            let leader = meta.leader.unwrap();
            assert!(meta.peers.contains(leader), "a leader is one of the replicas");
            assert_ne!(leader, dead, "never elected on a dead store");
            if leader == lost {
                assert!(
                    meta.peers.as_slice().iter().all(|&s| s == lost || s == dead),
                    "kept only without a live replica"
                );
            }
        }
        let others_after: Vec<_> =
            t.iter().filter(|(_, m)| !led_before.contains(&m.id)).map(|(_, m)| (m.id, m.leader)).collect();
        assert_eq!(others_after, others_before, "regions led elsewhere keep their leader");
    }

    #[test]
    fn transfer_to_non_replica_moves_a_follower() {
        let mut t = table(2);
        let id = FIRST_REGION_ID;
        let meta = t.get(id).unwrap().1.clone();
        let outsider = (1..=4).find(|s| !meta.peers.contains(*s)).unwrap();
        t.transfer_leader(id, outsider).unwrap();
        let after = t.get(id).unwrap().1;
        assert_eq!(after.leader, Some(outsider));
        assert!(after.peers.contains(meta.leader.unwrap()), "the old leader stays a replica");
        assert_eq!(after.conf_ver, meta.conf_ver + 1);
        assert!(t.transfer_leader(id, 99).is_err());
        assert!(t.transfer_leader(1, 1).is_err());
    }
}
