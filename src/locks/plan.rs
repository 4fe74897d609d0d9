//! The I/O-free decisions of lock resolution: when a task is stuck long enough for a round,
//! which pieces of its frontier are targets, the scan's max version (and how far it drops
//! after a "locked" answer), and what a transaction's status means for its locks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::cluster::RegionWithLeader;
use crate::types::{physical_ms, ts_distance, KeyRange, Ts};

/// Scan pages: client-go's GC scan-lock limit.
pub const SCAN_PAGE: u32 = 1024;
/// A "locked" scan answer lowers the max version at most this often per region.
pub const LOCKED_RETRIES: usize = 2;

/// Where a running task stands.
#[derive(Debug, Clone, PartialEq)]
struct TaskClock {
    checkpoint: Ts,
    /// `now` of the first tick that saw this checkpoint.
    since: Ts,
    /// When the last round for this checkpoint ended.
    resolved_at: Option<Ts>,
}

/// When rounds start: one at a time, for tasks whose checkpoint has not moved for the
/// resolve interval, and again for the same checkpoint only an interval after the last
/// round ended.
#[derive(Debug, Default)]
pub struct Schedule {
    tasks: HashMap<String, TaskClock>,
    in_flight: Option<Vec<String>>,
}

impl Schedule {
    /// Records each running task's checkpoint as of `now`; tasks not listed are forgotten.
    pub fn observe<'a>(&mut self, running: impl IntoIterator<Item = (&'a str, Ts)>, now: Ts) {
        let mut seen = HashMap::new();
        for (name, checkpoint) in running {
            let clock = match self.tasks.remove(name) {
                Some(clock) if clock.checkpoint == checkpoint => clock,
                _ => TaskClock { checkpoint, since: now, resolved_at: None },
            };
            seen.insert(name.to_string(), clock);
        }
        self.tasks = seen;
    }

    /// The tasks a round should start for now (none while one runs).
    pub fn due(&self, now: Ts, interval: Duration) -> Vec<String> {
        if self.in_flight.is_some() {
            return Vec::new();
        }
        let mut due: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, c)| {
                ts_distance(now, c.since) >= interval
                    && c.resolved_at.map_or(true, |at| ts_distance(now, at) >= interval)
            })
            .map(|(name, _)| name.clone())
            .collect();
        due.sort();
        due
    }

    pub fn checkpoint(&self, task: &str) -> Option<Ts> {
        self.tasks.get(task).map(|c| c.checkpoint)
    }

    pub fn started(&mut self, tasks: Vec<String>) {
        self.in_flight = Some(tasks);
    }

    /// The running round ended (as seen at `now`).
    pub fn finished(&mut self, now: Ts) {
        for task in self.in_flight.take().unwrap_or_default() {
            if let Some(clock) = self.tasks.get_mut(&task) {
                clock.resolved_at = Some(now);
            }
        }
    }
}

/// Pieces valued below this are targets: they have not advanced for a resolve interval
/// (below `now − interval`), and they are close enough to the checkpoint (below
/// `checkpoint + interval`) to be what holds it back, not merely slow.
pub fn target_bound(checkpoint: Ts, interval: Duration, now: Ts) -> Ts {
    let stale = crate::types::ts_sub(now, interval);
    let near = crate::types::compose_ts(physical_ms(checkpoint) + interval.as_millis() as u64, 0);
    stale.min(near)
}

/// Regions one round scans at most. A crashed transaction holds back the regions of its
/// locks, which are the most lagging ones; a round over every lagging region of a cluster
/// whose polls fall behind was 160 000 ScanLock calls in 10 s at 10^6 regions. The `locks`
/// bench scans 1000 regions in about 250 ms.
pub const ROUND_REGIONS: usize = 4096;

/// ScanLock's max version: just above the largest target value, so every lock that can
/// hold a target back (its start ts is at most the target's value) is seen, and locks of
/// newer transactions are not.
pub fn scan_max_version(targets: &[(KeyRange, Ts)]) -> Ts {
    targets.iter().map(|(_, ts)| *ts).max().unwrap_or(0).saturating_add(1)
}

/// After a "locked" scan answer at `current`: halfway down toward `floor` (just above the
/// lowest target, so the checkpoint's own locks stay in view), or `None` when nothing is
/// left between them.
pub fn lowered_max_version(current: Ts, floor: Ts) -> Option<Ts> {
    (current > floor.saturating_add(1)).then(|| floor + (current - floor) / 2)
}

/// One lock a scan found, with the region it was found in.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundLock {
    pub key: Vec<u8>,
    pub primary: Vec<u8>,
    pub start_ts: Ts,
    pub ttl_ms: u64,
    pub async_commit: bool,
    pub region: RegionWithLeader,
}

impl FoundLock {
    pub fn expired(&self, current_ts: Ts) -> bool {
        physical_ms(current_ts) >= physical_ms(self.start_ts).saturating_add(self.ttl_ms)
    }
}

/// Locks by transaction (start ts), each transaction's locks in key order.
pub fn group_by_txn(locks: Vec<FoundLock>) -> BTreeMap<Ts, Vec<FoundLock>> {
    let mut txns: BTreeMap<Ts, Vec<FoundLock>> = BTreeMap::new();
    for lock in locks {
        txns.entry(lock.start_ts).or_default().push(lock);
    }
    for locks in txns.values_mut() {
        locks.sort_by(|a, b| a.key.cmp(&b.key));
        locks.dedup_by(|a, b| a.key == b.key);
    }
    txns
}

/// What `CheckTxnStatus` said about a transaction's primary.
#[derive(Debug, Clone, PartialEq)]
pub enum PrimaryStatus {
    Locked { ttl_ms: u64, async_commit: bool, min_commit_ts: Ts, secondaries: Vec<Vec<u8>> },
    Committed(Ts),
    RolledBack,
}

/// What to do with a transaction's locks.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Its client is alive (TTL not expired): never touched.
    LeaveAlive,
    Commit(Ts),
    RollBack,
    /// An expired async-commit primary: the secondaries decide (`CheckSecondaryLocks`).
    CheckSecondaries {
        min_commit_ts: Ts,
        secondaries: Vec<Vec<u8>>,
    },
}

/// client-go's reading of `CheckTxnStatus`: TiKV rolls an expired ordinary lock back
/// itself, so a lock still there is alive unless it is async-commit and expired.
pub fn decide(status: PrimaryStatus, lock_ts: Ts, current_ts: Ts) -> Decision {
    match status {
        PrimaryStatus::Committed(ts) => Decision::Commit(ts),
        PrimaryStatus::RolledBack => Decision::RollBack,
        PrimaryStatus::Locked { ttl_ms, async_commit, min_commit_ts, secondaries } => {
            let expired = physical_ms(current_ts) >= physical_ms(lock_ts).saturating_add(ttl_ms);
            if async_commit && expired {
                Decision::CheckSecondaries { min_commit_ts, secondaries }
            } else {
                Decision::LeaveAlive
            }
        }
    }
}

/// One `CheckSecondaryLocks` answer: the locks still there (`min_commit_ts`, async-commit
/// flag) out of `asked` keys, and a commit ts if any key was committed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecondaryAnswer {
    pub asked: usize,
    pub locks: Vec<(Ts, bool)>,
    pub commit_ts: Ts,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AsyncDecision {
    Commit(Ts),
    RollBack,
    /// A secondary is not an async-commit lock: the transaction fell back to ordinary
    /// two-phase commit, and `CheckTxnStatus` with `force_sync_commit` decides.
    FallBackToSync,
}

/// The async-commit rule: committed anywhere → committed at that ts; a lock missing (TiKV
/// left a rollback record for it) → rolled back; otherwise committed at the largest
/// `min_commit_ts` of all locks.
pub fn decide_async(primary_min_commit_ts: Ts, answers: &[SecondaryAnswer]) -> AsyncDecision {
    if let Some(answer) = answers.iter().find(|a| a.commit_ts != 0) {
        return AsyncDecision::Commit(answer.commit_ts);
    }
    if answers.iter().any(|a| a.locks.len() < a.asked) {
        return AsyncDecision::RollBack;
    }
    if answers.iter().flat_map(|a| &a.locks).any(|(_, async_commit)| !async_commit) {
        return AsyncDecision::FallBackToSync;
    }
    let max = answers.iter().flat_map(|a| &a.locks).map(|(ts, _)| *ts).max().unwrap_or(0);
    AsyncDecision::Commit(max.max(primary_min_commit_ts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::compose_ts;

    fn at(ms: u64) -> Ts {
        compose_ts(ms, 0)
    }

    const SEC: u64 = 1000;

    #[test]
    fn a_round_is_due_once_the_checkpoint_stood_still_for_an_interval() {
        let interval = Duration::from_secs(30);
        let mut schedule = Schedule::default();
        schedule.observe([("t", at(100 * SEC))], at(1000 * SEC));
        assert!(schedule.due(at(1029 * SEC), interval).is_empty());
        schedule.observe([("t", at(100 * SEC))], at(1029 * SEC));
        assert_eq!(schedule.due(at(1030 * SEC), interval), vec!["t".to_string()]);
        schedule.started(vec!["t".into()]);
        assert!(schedule.due(at(1040 * SEC), interval).is_empty(), "one round at a time");
        schedule.finished(at(1040 * SEC));
        assert!(schedule.due(at(1069 * SEC), interval).is_empty(), "the same checkpoint waits an interval");
        assert_eq!(schedule.due(at(1070 * SEC), interval).len(), 1);
        schedule.observe([("t", at(200 * SEC))], at(1070 * SEC));
        assert!(schedule.due(at(1071 * SEC), interval).is_empty(), "a moved checkpoint starts the clock again");
        schedule.observe([], at(1200 * SEC));
        assert!(schedule.due(at(1300 * SEC), interval).is_empty(), "a removed or paused task is forgotten");
    }

    #[test]
    fn targets_are_stale_and_near_the_checkpoint() {
        let c = at(100 * SEC);
        let interval = Duration::from_secs(20);
        assert_eq!(target_bound(c, interval, at(110 * SEC)), at(90 * SEC), "nothing is stale yet");
        assert_eq!(target_bound(c, interval, at(127 * SEC)), at(107 * SEC));
        assert_eq!(target_bound(c, interval, at(500 * SEC)), at(120 * SEC), "slow pieces far above are not targets");
        let targets = vec![(KeyRange::new("a", "b"), c), (KeyRange::new("c", "d"), c + 5)];
        assert_eq!(scan_max_version(&targets), c + 6);
    }

    #[test]
    fn locked_scans_step_down_halfway_and_stop_at_the_floor() {
        let floor = at(100 * SEC);
        let v = at(130 * SEC);
        assert_eq!(lowered_max_version(v, floor), Some(at(115 * SEC)));
        assert_eq!(lowered_max_version(at(115 * SEC), floor), Some(at(107_500)));
        assert_eq!(lowered_max_version(floor + 1, floor), None);
    }

    #[test]
    fn transaction_status_decisions_follow_client_go() {
        let lock_ts = at(100 * SEC);
        let locked = |async_commit| PrimaryStatus::Locked {
            ttl_ms: 3000,
            async_commit,
            min_commit_ts: lock_ts + 1,
            secondaries: vec![b"s".to_vec()],
        };
        assert_eq!(decide(PrimaryStatus::Committed(7), lock_ts, at(200 * SEC)), Decision::Commit(7));
        assert_eq!(decide(PrimaryStatus::RolledBack, lock_ts, at(200 * SEC)), Decision::RollBack);
        assert_eq!(decide(locked(false), lock_ts, at(200 * SEC)), Decision::LeaveAlive);
        assert_eq!(decide(locked(true), lock_ts, at(102 * SEC)), Decision::LeaveAlive, "TTL not expired");
        assert!(matches!(decide(locked(true), lock_ts, at(103 * SEC)), Decision::CheckSecondaries { .. }));

        let all = |locks: Vec<(Ts, bool)>| SecondaryAnswer { asked: locks.len(), locks, commit_ts: 0 };
        assert_eq!(decide_async(5, &[all(vec![(7, true)]), all(vec![(6, true)])]), AsyncDecision::Commit(7));
        assert_eq!(decide_async(9, &[all(vec![(7, true)])]), AsyncDecision::Commit(9));
        let missing = SecondaryAnswer { asked: 2, locks: vec![(7, true)], commit_ts: 0 };
        assert_eq!(decide_async(5, std::slice::from_ref(&missing)), AsyncDecision::RollBack);
        let committed = SecondaryAnswer { asked: 2, locks: vec![], commit_ts: 8 };
        assert_eq!(decide_async(5, &[missing, committed]), AsyncDecision::Commit(8));
        assert_eq!(decide_async(5, &[all(vec![(7, false)])]), AsyncDecision::FallBackToSync);
    }
}
