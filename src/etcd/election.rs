//! Leader election, etcd's `concurrency.Election` recipe as TiDB uses it for the advancer
//! owner: each candidate writes `<prefix>/<lease id in hex>` bound to its lease; the key with
//! the lowest create revision leads; the others wait for the deletion of the key just ahead.

use std::time::Duration;

use super::client::{Cmp, EtcdClient, GetOptions, KeySpan, Txn, TxnOp};
use super::watch::{EventKind, WatchOptions, Watcher};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{Compare_CompareResult, RangeRequest_SortOrder, RangeRequest_SortTarget};
use crate::proto::mvccpb::KeyValue;
use crate::worker::StopToken;

/// How often a waiting candidate re-checks for a stop or a lost key.
const POLL: Duration = Duration::from_millis(200);

/// The longest wait between two take-over rounds.
const MAX_TAKE_OVER_BACKOFF: Duration = Duration::from_secs(30);

pub struct Election {
    client: EtcdClient,
    /// The directory of candidate keys, with a trailing `/` so `owner` never matches `owner2`.
    prefix: String,
}

/// Proof of leadership: our key and its create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub lease: i64,
}

impl Leadership {
    /// A transaction condition that holds only while we still lead; a deposed leader's
    /// writes guarded by it fail instead of landing.
    pub fn fence(&self) -> Cmp {
        Cmp::create_revision(&self.key, Compare_CompareResult::EQUAL, self.create_revision)
    }
}

/// One candidate key under the election prefix, whoever wrote it (TiDB or us).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub lease: i64,
    pub create_revision: i64,
}

impl Candidate {
    fn of(mut kv: KeyValue) -> Self {
        Candidate {
            lease: kv.get_lease(),
            create_revision: kv.get_create_revision(),
            key: kv.take_key(),
            value: kv.take_value(),
        }
    }
}

/// How a campaign takes over instead of waiting its turn.
#[derive(Clone, Copy)]
pub struct TakeOver {
    /// Wait before evicting again while someone evictable is still ahead (doubles).
    pub backoff: Duration,
    /// Which candidates' values may be evicted. Candidates it spares are waited for as
    /// usual, so that two taking-over advancers of the same kind queue instead of
    /// evicting each other forever.
    pub evictable: fn(&[u8]) -> bool,
}

/// The candidates a take-over deletes: older than ours and evictable.
fn to_evict(candidates: Vec<Candidate>, our_create_revision: i64, evictable: fn(&[u8]) -> bool) -> Vec<Candidate> {
    candidates.into_iter().filter(|c| c.create_revision < our_create_revision && evictable(&c.value)).collect()
}

impl Election {
    pub fn new(client: EtcdClient, prefix: &str) -> Self {
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        Election { client, prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    /// The first candidate in `options`' order and the revision it was read at (a watch
    /// from the next one misses nothing and is not compacted away yet).
    fn first_candidate(&self, options: GetOptions) -> Result<(Option<KeyValue>, i64)> {
        let mut result = self.client.range(KeySpan::prefix(self.prefix.as_bytes()), &options)?;
        Ok((result.kvs.pop(), result.revision))
    }

    /// Every candidate, the leader first (ascending create revision).
    pub fn candidates(&self) -> Result<Vec<Candidate>> {
        let options = GetOptions {
            sort: Some((RangeRequest_SortTarget::CREATE, RangeRequest_SortOrder::ASCEND)),
            ..Default::default()
        };
        let kvs = self.client.range(KeySpan::prefix(self.prefix.as_bytes()), &options)?.kvs;
        Ok(kvs.into_iter().map(Candidate::of).collect())
    }

    /// Deletes a candidate's key, but only the incarnation given (same create revision), so
    /// a candidate that has already re-campaigned is left alone. False if it was gone.
    pub fn evict(&self, candidate: &Candidate) -> Result<bool> {
        let txn = Txn::new()
            .when([Cmp::create_revision(&candidate.key, Compare_CompareResult::EQUAL, candidate.create_revision)])
            .and_then([TxnOp::delete(KeySpan::key(candidate.key.clone()))]);
        Ok(self.client.txn(txn)?.succeeded)
    }

    /// The current leader's key and value, if any candidate exists.
    pub fn leader(&self) -> Result<Option<KeyValue>> {
        Ok(self.leader_at()?.0)
    }

    fn leader_at(&self) -> Result<(Option<KeyValue>, i64)> {
        self.first_candidate(GetOptions {
            limit: 1,
            sort: Some((RangeRequest_SortTarget::CREATE, RangeRequest_SortOrder::ASCEND)),
            ..Default::default()
        })
    }

    /// Blocks until this candidate leads, `stop` fires (`Error::Stopped`), or its key
    /// disappears (the lease died: `Error::LeaseLost`).
    pub fn campaign(&self, lease: i64, value: &[u8], stop: &StopToken) -> Result<Leadership> {
        self.campaign_with(lease, value, stop, None)
    }

    /// [`Election::campaign`]; with a [`TakeOver`] it does not wait behind older evictable
    /// candidates but deletes their keys (a TiDB re-campaigns behind us), again after a
    /// doubling backoff while one is still ahead.
    pub fn campaign_with(
        &self,
        lease: i64,
        value: &[u8],
        stop: &StopToken,
        mut take_over: Option<TakeOver>,
    ) -> Result<Leadership> {
        let key = format!("{}{:x}", self.prefix, lease).into_bytes();
        let txn = Txn::new()
            .when([Cmp::absent(&key)])
            .and_then([TxnOp::put(key.clone(), value.to_vec(), lease)])
            .or_else([TxnOp::get(KeySpan::key(key.clone()), &GetOptions::default())]);
        let result = self.client.txn(txn)?;
        let create_revision = if result.succeeded {
            result.revision
        } else {
            // Our key already exists (a retried campaign on the same lease): keep its place.
            let existing = result.ranges.into_iter().next().and_then(|r| r.kvs.into_iter().next());
            let existing = existing.ok_or_else(|| self.key_lost(lease))?;
            if existing.get_value() != value {
                self.client.put(key.clone(), value.to_vec(), lease)?;
            }
            existing.get_create_revision()
        };
        let leadership = Leadership { key, create_revision, lease };
        let mut take_over_rounds = 0;
        loop {
            if stop.is_stopped() {
                return Err(Error::Stopped("owner campaign".into()));
            }
            let (ahead, read_at) = self.first_candidate(GetOptions {
                limit: 1,
                max_create_revision: create_revision - 1,
                sort: Some((RangeRequest_SortTarget::CREATE, RangeRequest_SortOrder::DESCEND)),
                ..Default::default()
            })?;
            let Some(ahead) = ahead else {
                // Nobody older: we lead, provided our own key survived the wait.
                return if self.is_leader(&leadership)? { Ok(leadership) } else { Err(self.key_lost(lease)) };
            };
            if let Some(policy) = &mut take_over {
                let targets = to_evict(self.candidates()?, create_revision, policy.evictable);
                if !targets.is_empty() {
                    if take_over_rounds > 0 {
                        if stop.sleep(policy.backoff) {
                            return Err(Error::Stopped("owner take-over".into()));
                        }
                        policy.backoff = (policy.backoff * 2).min(MAX_TAKE_OVER_BACKOFF);
                    }
                    take_over_rounds += 1;
                    self.evict_loudly(&targets, &leadership)?;
                    continue;
                }
            }
            log::info!("waiting for the owner key {} to go away", String::from_utf8_lossy(ahead.get_key()));
            self.wait_deleted(&ahead, read_at, &leadership, stop)?;
        }
    }

    /// Take-over: deletes the candidates ahead of ours, each with a warning.
    fn evict_loudly(&self, targets: &[Candidate], ours: &Leadership) -> Result<()> {
        for candidate in targets {
            if self.evict(candidate)? {
                log::warn!(
                    "TAKE-OVER: evicted owner candidate {} (value {:?}, lease {:x}) so that {} leads",
                    String::from_utf8_lossy(&candidate.key),
                    String::from_utf8_lossy(&candidate.value),
                    candidate.lease,
                    String::from_utf8_lossy(&ours.key),
                );
            }
        }
        Ok(())
    }

    /// Waits until `ahead` (seen at revision `read_at`) is deleted, our own key vanishes,
    /// or stop fires. The watch starts after the read, not after `ahead`'s last change: that
    /// one may be compacted long ago.
    fn wait_deleted(&self, ahead: &KeyValue, read_at: i64, ours: &Leadership, stop: &StopToken) -> Result<()> {
        let watcher: Watcher = self.client.watch(
            KeySpan::key(ahead.get_key().to_vec()),
            WatchOptions { start_revision: read_at + 1, prev_kv: false },
        )?;
        loop {
            if stop.is_stopped() {
                return Err(Error::Stopped("owner campaign".into()));
            }
            match watcher.batches().recv_timeout(POLL) {
                Ok(Ok(batch)) => {
                    if batch.events.iter().any(|e| e.kind == EventKind::Delete) {
                        return Ok(());
                    }
                }
                // A compaction or a closed watch: re-check from scratch after a pause, so that
                // a watch that keeps failing is not re-created in a loop.
                Ok(Err(_)) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return if stop.sleep(POLL) { Err(Error::Stopped("owner campaign".into())) } else { Ok(()) };
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if !self.exists(&ours.key, ours.create_revision)? {
                        return Err(self.key_lost(ours.lease));
                    }
                }
            }
        }
    }

    fn exists(&self, key: &[u8], create_revision: i64) -> Result<bool> {
        Ok(self.client.get(key.to_vec())?.is_some_and(|kv| kv.get_create_revision() == create_revision))
    }

    fn key_lost(&self, lease: i64) -> Error {
        Error::LeaseLost { lease_id: lease, reason: format!("its election key under {} disappeared", self.prefix) }
    }

    /// True while `leadership` is still the oldest live candidate.
    pub fn is_leader(&self, leadership: &Leadership) -> Result<bool> {
        Ok(self.leading_at(leadership)?.is_some())
    }

    /// The revision of a read that found `leadership` still the oldest live candidate;
    /// `None` when it no longer is.
    pub fn leading_at(&self, leadership: &Leadership) -> Result<Option<i64>> {
        let (leader, revision) = self.leader_at()?;
        Ok(leader
            .is_some_and(|kv| {
                kv.get_key() == leadership.key.as_slice() && kv.get_create_revision() == leadership.create_revision
            })
            .then_some(revision))
    }

    /// Gives up leadership (or candidacy) so that the next candidate takes over at once.
    pub fn resign(&self, leadership: &Leadership) -> Result<()> {
        let txn = Txn::new().when([leadership.fence()]).and_then([TxnOp::delete(KeySpan::key(leadership.key.clone()))]);
        self.client.txn(txn).map(drop)
    }

    /// Watches our key from `start_revision` (after a read that found us leading): a delete
    /// event means leadership is lost.
    pub fn watch_leadership(&self, leadership: &Leadership, start_revision: i64) -> Result<Watcher> {
        self.client.watch(KeySpan::key(leadership.key.clone()), WatchOptions { start_revision, prev_kv: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(create_revision: i64, value: &str) -> Candidate {
        Candidate {
            key: format!("/o/{create_revision:x}").into_bytes(),
            value: value.into(),
            lease: 1,
            create_revision,
        }
    }

    #[test]
    fn take_over_evicts_only_older_evictable_candidates() {
        let all = vec![candidate(5, "tidb"), candidate(7, "ours"), candidate(9, "tidb"), candidate(12, "tidb")];
        let not_ours = |v: &[u8]| v != b"ours";
        let revisions = |c: Vec<Candidate>| c.iter().map(|c| c.create_revision).collect::<Vec<_>>();
        assert_eq!(revisions(to_evict(all.clone(), 10, not_ours)), [5, 9], "an older advancer of ours is waited for");
        assert_eq!(revisions(to_evict(all, 5, not_ours)), Vec::<i64>::new(), "nobody older");
    }
}
