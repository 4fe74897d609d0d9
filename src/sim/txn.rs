//! Transactions of the simulated cluster: keys written by two-phase commit (a primary and
//! secondaries, some async-commit), their locks, and TiKV's answers to the lock-resolution
//! RPCs (`KvScanLock`, `KvCheckTxnStatus`, `KvCheckSecondaryLocks`, `KvResolveLock`) with
//! TiKV's semantics. A lock holds back its region's resolved ts, so the region never
//! flushes past the lock's start ts while it stays.
//!
//! The table knows each transaction's fate (its client alive, or crashed) and checks every
//! resolution against it: rolling back a committed or alive transaction, or committing one
//! at a wrong ts, is recorded as a violation that tests assert never happens.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::types::{physical_ms, DisplayKey, Ts};

use super::model::Key;

/// How a test writes a transaction.
#[derive(Debug, Clone)]
pub struct TxnSpec {
    /// The first key is the primary.
    pub keys: Vec<Vec<u8>>,
    pub async_commit: bool,
    /// The lock TTL; an alive client keeps renewing it, a crashed one does not.
    pub ttl: Duration,
    /// How many keys (in order) got their lock before the client stopped prewriting; the
    /// rest were never prewritten. `None`: all of them.
    pub prewritten: Option<usize>,
}

impl TxnSpec {
    pub fn new(keys: Vec<Vec<u8>>) -> TxnSpec {
        TxnSpec { keys, async_commit: false, ttl: Duration::from_secs(3), prewritten: None }
    }
}

/// What became of a transaction as TiKV records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Committed(Ts),
    RolledBack,
}

#[derive(Debug, Clone)]
struct Txn {
    keys: Vec<Key>,
    async_commit: bool,
    ttl_ms: u64,
    /// The client still runs (and renews the TTL).
    alive: bool,
    /// Every lock was written: an async-commit transaction is then committed by definition,
    /// at the largest `min_commit_ts` of its locks.
    complete: bool,
    outcome: Outcome,
}

impl Txn {
    fn primary(&self) -> &Key {
        &self.keys[0]
    }

    /// The commit ts an async-commit transaction gets once all its locks exist.
    fn async_commit_ts(&self, start_ts: Ts) -> Ts {
        start_ts + self.keys.len() as u64
    }
}

/// One lock as TiKV stores it (secondaries only on an async-commit primary).
#[derive(Debug, Clone, PartialEq)]
pub struct SimLock {
    pub key: Key,
    pub primary: Key,
    pub start_ts: Ts,
    pub ttl_ms: u64,
    pub async_commit: bool,
    pub min_commit_ts: Ts,
    pub secondaries: Vec<Key>,
}

/// TiKV's answer to `CheckTxnStatus`.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnStatus {
    /// Still locked (not expired, or an expired async-commit lock left to the caller).
    Locked(SimLock),
    Committed(Ts),
    /// Rolled back now (`true`: by this request) or earlier.
    RolledBack {
        now: bool,
    },
    /// No lock and no record (`rollback_if_not_exist` unset).
    NotFound,
}

/// TiKV's answer to `CheckSecondaryLocks`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecondaryStatus {
    pub locks: Vec<SimLock>,
    pub commit_ts: Ts,
}

#[derive(Default)]
pub struct TxnTable {
    /// key → start ts of the lock on it (one lock per key).
    locks: BTreeMap<Key, Ts>,
    txns: HashMap<Ts, Txn>,
    /// In-memory locks (`key → ts`) that make `ScanLock` answer "locked" for any max version
    /// at or above their ts, as TiKV's concurrency manager does.
    memory_locks: BTreeMap<Key, Ts>,
    violations: Vec<String>,
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

impl TxnTable {
    /// Prewrites a transaction at `start_ts`. Fails (naming the key) when a key is locked.
    pub fn begin(&mut self, spec: &TxnSpec, start_ts: Ts) -> Result<(), String> {
        if spec.keys.is_empty() {
            return Err("a transaction needs at least one key".into());
        }
        let keys: Vec<Key> = spec.keys.iter().map(|k| Key::from(k.as_slice())).collect();
        if let Some(busy) = keys.iter().find(|k| self.locks.contains_key(*k)) {
            return Err(format!("key {} is locked by another transaction", DisplayKey(busy)));
        }
        let written = spec.prewritten.unwrap_or(keys.len()).min(keys.len());
        for key in &keys[..written] {
            self.locks.insert(key.clone(), start_ts);
        }
        let txn = Txn {
            keys,
            async_commit: spec.async_commit,
            ttl_ms: spec.ttl.as_millis() as u64,
            alive: true,
            complete: written == spec.keys.len(),
            outcome: Outcome::Pending,
        };
        self.txns.insert(start_ts, txn);
        Ok(())
    }

    /// The client stops: its TTL is no longer renewed from `now` on.
    pub fn crash(&mut self, start_ts: Ts, now: Ts) {
        if let Some(txn) = self.txns.get_mut(&start_ts) {
            txn.ttl_ms = renewed_ttl(txn, start_ts, now);
            txn.alive = false;
        }
    }

    /// The client commits the primary at `commit_ts`, and the secondaries too unless
    /// `primary_only` (a client that dies right after its primary committed).
    pub fn commit(&mut self, start_ts: Ts, commit_ts: Ts, primary_only: bool) -> Result<(), String> {
        let txn = self.txns.get_mut(&start_ts).ok_or_else(|| format!("no transaction {start_ts}"))?;
        match txn.outcome {
            Outcome::Pending if self.locks.get(txn.primary()) == Some(&start_ts) => {}
            Outcome::Committed(_) => return Err(format!("transaction {start_ts} is already committed")),
            _ => return Err(format!("transaction {start_ts} was rolled back: its primary lock is gone")),
        }
        txn.outcome = Outcome::Committed(commit_ts);
        txn.alive = !primary_only;
        let keys: Vec<Key> = if primary_only { vec![txn.primary().clone()] } else { txn.keys.clone() };
        for key in keys {
            self.unlock(&key, start_ts);
        }
        Ok(())
    }

    /// The client rolls the transaction back itself.
    pub fn rollback(&mut self, start_ts: Ts) {
        if let Some(txn) = self.txns.get_mut(&start_ts) {
            if txn.outcome == Outcome::Pending {
                txn.outcome = Outcome::RolledBack;
                for key in txn.keys.clone() {
                    self.unlock(&key, start_ts);
                }
            }
        }
    }

    pub fn outcome(&self, start_ts: Ts) -> Option<Outcome> {
        self.txns.get(&start_ts).map(|t| t.outcome)
    }

    pub fn set_memory_lock(&mut self, key: &[u8], ts: Option<Ts>) {
        match ts {
            Some(ts) => self.memory_locks.insert(key.into(), ts),
            None => self.memory_locks.remove(key),
        };
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.clone()
    }

    /// Every lock, as `(key, start ts)` in key order: what resolved ts is computed from.
    pub fn lock_starts(&self) -> Vec<(Key, Ts)> {
        self.locks.iter().map(|(k, ts)| (k.clone(), *ts)).collect()
    }

    fn unlock(&mut self, key: &Key, start_ts: Ts) {
        if self.locks.get(key) == Some(&start_ts) {
            self.locks.remove(key);
        }
    }

    fn lock_on(&self, key: &[u8], now: Ts) -> Option<SimLock> {
        let start_ts = *self.locks.get(key)?;
        let txn = &self.txns[&start_ts];
        let (key, primary) = (Key::from(key), txn.primary().clone());
        let is_primary = key == primary;
        let position = txn.keys.iter().position(|k| *k == key).unwrap_or(0) as u64;
        Some(SimLock {
            secondaries: if txn.async_commit && is_primary { txn.keys[1..].to_vec() } else { Vec::new() },
            ttl_ms: renewed_ttl(txn, start_ts, now),
            async_commit: txn.async_commit,
            // The largest of these is the async commit ts: one per key, the last key's largest.
            min_commit_ts: start_ts + 1 + position,
            key,
            primary,
            start_ts,
        })
    }

    /// `ScanLock` over `[start, end)`: locks with start ts ≤ `max_version`, at most `limit`.
    /// `Err(ts)`: an in-memory lock at `ts` makes the scan answer "locked".
    pub fn scan(&self, start: &[u8], end: &[u8], max_version: Ts, limit: usize, now: Ts) -> Result<Vec<SimLock>, Ts> {
        if let Some((_, ts)) = self.memory_locks.iter().find(|(k, ts)| in_range(k, start, end) && **ts <= max_version) {
            return Err(*ts);
        }
        Ok(self
            .locks
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| end.is_empty() || k.as_ref() < end)
            .filter(|(_, ts)| **ts <= max_version)
            .take(limit)
            .filter_map(|(k, _)| self.lock_on(k, now))
            .collect())
    }

    /// `CheckTxnStatus` on the primary key with TiKV's rules: an expired lock is rolled back
    /// (unless async-commit and not forced to sync), a missing one is looked up.
    pub fn check_txn_status(
        &mut self,
        primary: &[u8],
        lock_ts: Ts,
        current_ts: Ts,
        rollback_if_not_exist: bool,
        force_sync_commit: bool,
    ) -> TxnStatus {
        if let Some(lock) = self.lock_on(primary, current_ts).filter(|l| l.start_ts == lock_ts) {
            let expired = physical_ms(current_ts) >= physical_ms(lock_ts) + lock.ttl_ms;
            if !expired || (lock.async_commit && !force_sync_commit) {
                return TxnStatus::Locked(lock);
            }
            self.roll_back(lock_ts, "CheckTxnStatus found its primary lock expired");
            self.unlock(&lock.key, lock_ts);
            return TxnStatus::RolledBack { now: true };
        }
        match self.txns.get(&lock_ts).map(|t| t.outcome) {
            Some(Outcome::Committed(ts)) => TxnStatus::Committed(ts),
            Some(Outcome::RolledBack) => TxnStatus::RolledBack { now: false },
            _ if rollback_if_not_exist => {
                self.roll_back(lock_ts, "CheckTxnStatus found no primary lock");
                TxnStatus::RolledBack { now: true }
            }
            _ => TxnStatus::NotFound,
        }
    }

    /// `CheckSecondaryLocks`: each key's lock if the transaction still holds it; a key
    /// neither locked nor committed gets a rollback record, so the transaction can never
    /// commit.
    pub fn check_secondary_locks(&mut self, keys: &[Vec<u8>], start_ts: Ts, now: Ts) -> SecondaryStatus {
        let mut status = SecondaryStatus::default();
        for key in keys {
            match self.lock_on(key, now).filter(|l| l.start_ts == start_ts) {
                Some(lock) => status.locks.push(lock),
                None => match self.txns.get(&start_ts).map(|t| t.outcome) {
                    Some(Outcome::Committed(ts)) => status.commit_ts = ts,
                    Some(Outcome::RolledBack) => {}
                    _ => self.roll_back(start_ts, "CheckSecondaryLocks found a secondary never prewritten"),
                },
            }
        }
        status
    }

    /// `ResolveLock` in `[start, end)` (a region): `keys` (or every lock of the transaction
    /// there) committed at `commit_ts`, or rolled back when it is 0.
    pub fn resolve(&mut self, start: &[u8], end: &[u8], start_ts: Ts, commit_ts: Ts, keys: &[Vec<u8>]) -> usize {
        let targets: Vec<Key> = if keys.is_empty() {
            self.locks
                .iter()
                .filter(|(k, ts)| **ts == start_ts && in_range(k, start, end))
                .map(|(k, _)| k.clone())
                .collect()
        } else {
            keys.iter().filter(|k| in_range(k, start, end)).map(|k| Key::from(k.as_slice())).collect()
        };
        if commit_ts == 0 {
            self.roll_back(start_ts, "ResolveLock rolled it back");
        } else {
            self.commit_by_resolver(start_ts, commit_ts);
        }
        let before = self.locks.len();
        for key in &targets {
            self.unlock(key, start_ts);
        }
        before - self.locks.len()
    }

    fn commit_by_resolver(&mut self, start_ts: Ts, commit_ts: Ts) {
        let Some(txn) = self.txns.get_mut(&start_ts) else { return };
        if txn.alive && txn.outcome == Outcome::Pending {
            self.violations.push(format!("alive transaction {start_ts} committed by a resolver at {commit_ts}"));
        }
        let expected = match txn.outcome {
            Outcome::Committed(ts) => Some(ts),
            Outcome::Pending if txn.async_commit && txn.complete => Some(txn.async_commit_ts(start_ts)),
            _ => None,
        };
        if expected != Some(commit_ts) {
            self.violations.push(format!(
                "transaction {start_ts} committed by a resolver at {commit_ts}, but its commit ts is {expected:?}"
            ));
        }
        txn.outcome = Outcome::Committed(commit_ts);
    }

    fn roll_back(&mut self, start_ts: Ts, why: &str) {
        let Some(txn) = self.txns.get_mut(&start_ts) else { return };
        let committed = matches!(txn.outcome, Outcome::Committed(_)) || (txn.async_commit && txn.complete);
        if committed || txn.alive {
            let what = if committed { "committed" } else { "alive" };
            self.violations.push(format!("{what} transaction {start_ts} rolled back: {why}"));
        }
        if txn.outcome == Outcome::Pending {
            txn.outcome = Outcome::RolledBack;
        }
    }
}

/// An alive client's heartbeats keep its lock from expiring: its TTL always reaches past
/// `now`. A crashed client's TTL stays what it was.
fn renewed_ttl(txn: &Txn, start_ts: Ts, now: Ts) -> u64 {
    if txn.alive {
        txn.ttl_ms.max(physical_ms(now).saturating_sub(physical_ms(start_ts)) + txn.ttl_ms)
    } else {
        txn.ttl_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::compose_ts;

    fn ts(ms: u64) -> Ts {
        compose_ts(ms, 0)
    }

    fn spec(keys: &[&str]) -> TxnSpec {
        TxnSpec {
            ttl: Duration::from_millis(100),
            ..TxnSpec::new(keys.iter().map(|k| k.as_bytes().to_vec()).collect())
        }
    }

    #[test]
    fn expired_crashed_transactions_roll_back_and_alive_ones_stay_locked() {
        let mut table = TxnTable::default();
        table.begin(&spec(&["a", "b"]), ts(1000)).unwrap();
        assert!(table.begin(&spec(&["b"]), ts(1001)).unwrap_err().contains("locked"));
        let alive = table.check_txn_status(b"a", ts(1000), ts(5000), false, false);
        assert!(matches!(alive, TxnStatus::Locked(ref l) if l.ttl_ms > 4000), "{alive:?}");
        table.crash(ts(1000), ts(1050));
        assert!(matches!(table.check_txn_status(b"a", ts(1000), ts(1100), false, false), TxnStatus::Locked(_)));
        assert_eq!(table.check_txn_status(b"a", ts(1000), ts(1200), false, false), TxnStatus::RolledBack { now: true });
        let left = table.scan(b"", b"", Ts::MAX, 10, ts(1200)).unwrap();
        assert_eq!(left.len(), 1, "only the primary lock goes: secondaries wait for ResolveLock");
        assert_eq!(table.resolve(b"", b"", ts(1000), 0, &[]), 1);
        assert!(table.commit(ts(1000), ts(1300), false).unwrap_err().contains("rolled back"));
        assert!(table.violations().is_empty());
    }

    #[test]
    fn wrong_resolutions_are_violations() {
        let mut table = TxnTable::default();
        table.begin(&spec(&["a", "b"]), ts(1000)).unwrap();
        table.commit(ts(1000), ts(1100), true).unwrap();
        assert_eq!(table.check_txn_status(b"a", ts(1000), ts(9000), false, false), TxnStatus::Committed(ts(1100)));
        assert_eq!(table.resolve(b"", b"", ts(1000), 0, &[]), 1);
        assert!(table.violations()[0].contains("committed transaction"), "{:?}", table.violations());

        let mut table = TxnTable::default();
        table.begin(&TxnSpec { async_commit: true, ..spec(&["x"]) }, ts(900)).unwrap();
        table.resolve(b"", b"", ts(900), ts(900) + 1, &[]);
        assert!(table.violations()[0].contains("alive transaction"), "{:?}", table.violations());

        let mut table = TxnTable::default();
        table.begin(&TxnSpec { async_commit: true, ..spec(&["p", "s1", "s2"]) }, ts(1000)).unwrap();
        table.crash(ts(1000), ts(1000));
        let status = table.check_txn_status(b"p", ts(1000), ts(9000), false, false);
        let TxnStatus::Locked(primary) = status else { panic!("{status:?}") };
        assert_eq!(primary.secondaries.len(), 2);
        let secondaries = table.check_secondary_locks(&[b"s1".to_vec(), b"s2".to_vec()], ts(1000), ts(9000));
        let commit_ts = secondaries.locks.iter().chain([&primary]).map(|l| l.min_commit_ts).max().unwrap();
        assert_eq!(commit_ts, ts(1000) + 3);
        assert_eq!(table.resolve(b"", b"", ts(1000), commit_ts, &[]), 3);
        assert!(table.violations().is_empty(), "{:?}", table.violations());
        assert_eq!(table.outcome(ts(1000)), Some(Outcome::Committed(commit_ts)));
    }

    #[test]
    fn an_async_commit_transaction_missing_a_secondary_is_rolled_back() {
        let mut table = TxnTable::default();
        let partial = TxnSpec { async_commit: true, prewritten: Some(2), ..spec(&["p", "s1", "s2"]) };
        table.begin(&partial, ts(1000)).unwrap();
        table.crash(ts(1000), ts(1000));
        let status = table.check_secondary_locks(&[b"s1".to_vec(), b"s2".to_vec()], ts(1000), ts(9000));
        assert_eq!(status.locks.len(), 1);
        assert_eq!(table.outcome(ts(1000)), Some(Outcome::RolledBack));
        assert_eq!(table.resolve(b"", b"", ts(1000), 0, &[]), 2);
        assert!(table.violations().is_empty(), "{:?}", table.violations());
        assert_eq!(table.scan(b"", b"", Ts::MAX, 10, ts(9000)).unwrap(), vec![]);
    }

    #[test]
    fn memory_locks_make_scans_fail_until_the_max_version_is_below_them() {
        let mut table = TxnTable::default();
        table.begin(&spec(&["k"]), ts(1000)).unwrap();
        table.set_memory_lock(b"m", Some(ts(2000)));
        assert_eq!(table.scan(b"", b"", ts(3000), 10, ts(3000)), Err(ts(2000)));
        assert_eq!(table.scan(b"", b"", ts(1500), 10, ts(3000)).unwrap().len(), 1);
        assert_eq!(table.scan(b"l", b"", ts(3000), 10, ts(3000)), Err(ts(2000)));
        assert_eq!(table.scan(b"n", b"", ts(3000), 10, ts(3000)).unwrap().len(), 0);
    }
}
