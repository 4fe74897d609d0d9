//! The sim's timestamp oracle: TSOs from the wall clock, strictly increasing across every
//! caller (PD's `Tso` stream, flushes, `SimCluster::now_ts`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::types::{compose_ts, local_now_ts, physical_ms, Ts};

const LOGICAL_MASK: u64 = (1 << 18) - 1;

/// The logical part of a TSO.
pub fn logical(ts: Ts) -> u64 {
    ts & LOGICAL_MASK
}

#[derive(Debug, Default)]
pub struct Tso {
    last: AtomicU64,
    /// How far PD's clock runs ahead of this machine's (a clock jump), in milliseconds.
    ahead_ms: AtomicU64,
}

impl Tso {
    /// PD's clock jumps `by` ahead, for good: every later timestamp is that much later.
    pub fn jump(&self, by: Duration) {
        self.ahead_ms.fetch_add(by.as_millis().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn clock(&self) -> Ts {
        compose_ts(physical_ms(local_now_ts()) + self.ahead_ms.load(Ordering::Relaxed), 0)
    }

    /// One fresh timestamp.
    pub fn next(&self) -> Ts {
        self.next_batch(1)
    }

    /// Reserves `count` consecutive timestamps (`1..=2^18`) sharing one physical part, as PD
    /// does, and returns the largest; the first is `largest - count + 1`.
    pub fn next_batch(&self, count: u32) -> Ts {
        let count = u64::from(count.max(1)).min(LOGICAL_MASK + 1);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let mut candidate = (last + count).max(self.clock() + count - 1);
            if logical(candidate) < count - 1 {
                // The batch would straddle a millisecond: start it at the next one.
                candidate = compose_ts(physical_ms(candidate), count - 1);
            }
            match self.last.compare_exchange_weak(last, candidate, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return candidate,
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_and_batches_share_physical() {
        let tso = Tso::default();
        let mut prev = tso.next();
        for count in [1, 5, 1, 1000, 3] {
            let last = tso.next_batch(count);
            let first = last - u64::from(count) + 1;
            assert!(first > prev, "batch must start after the previous answer");
            assert_eq!(physical_ms(first), physical_ms(last));
            prev = last;
        }
        // Near the end of a millisecond's logical space the batch moves to the next one.
        tso.last.store(compose_ts(physical_ms(prev) + 10_000, LOGICAL_MASK - 1), Ordering::Relaxed);
        let last = tso.next_batch(4);
        assert_eq!(logical(last), 3);
        assert_eq!(physical_ms(last), physical_ms(prev) + 10_001);
    }
}
