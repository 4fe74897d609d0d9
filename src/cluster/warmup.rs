//! The region-cache warm-up: the tasks' ranges listed from PD in the background, a page at a
//! time, so that later polls find their regions cached. A new owner that takes in its
//! stores' flush snapshots polls only what they left lagging at its first tick, which lists
//! next to nothing; without the warm-up, the pieces that lagged later (between flush merges,
//! or every region once subscriptions went off) were thousands of scattered regions no poll
//! had listed (1 238 and 4 752 PD calls a tick at 10^6 regions).
//!
//! Pages go to whoever owns the cache (the ticker) through a channel of one, and the thread
//! rests as long as each page took: the listing (a CPU second at 10^6 regions, between PD
//! and the advancer) takes at most about half of what it could, and never a tick's time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use log::{debug, info, warn};

use super::region_iter::{RegionIter, ScanRetry, DEFAULT_PAGE_SIZE};
use super::{deadline, ClusterMeta, RegionWithLeader};
use crate::error::Result;
use crate::types::KeyRange;
use crate::worker::{Interrupt, StopToken, Worker};

#[derive(Clone, Debug)]
pub struct WarmupConfig {
    pub page_size: usize,
    /// Each PD call's deadline.
    pub call_deadline: Duration,
    /// Wait before asking again for a page that failed; doubles per failure in a row up to
    /// `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            page_size: DEFAULT_PAGE_SIZE,
            call_deadline: Duration::from_secs(10),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A warm-up in progress; dropping it stops the listing (a PD call in flight included) and
/// joins its thread.
pub struct RegionWarmup {
    pages: Receiver<Vec<RegionWithLeader>>,
    interrupt: Interrupt,
    _worker: Worker,
}

impl RegionWarmup {
    /// Lists `ranges` page by page on a thread of its own until every page is taken.
    pub fn start(meta: Arc<dyn ClusterMeta>, ranges: Vec<KeyRange>, config: WarmupConfig) -> Result<RegionWarmup> {
        let (sender, pages) = bounded(1);
        let interrupt = Interrupt::default();
        let scope = deadline::Scope { deadline: None, interrupt: Some(interrupt.clone()) };
        let worker = Worker::spawn("sh-region-warmup", move |stop| {
            scope.run(|| list_paced(meta.as_ref(), &ranges, &config, &sender, &stop))
        })?;
        Ok(RegionWarmup { pages, interrupt, _worker: worker })
    }

    /// For `select!`: the pages listed, in key order per range; disconnected once all are.
    pub fn pages(&self) -> &Receiver<Vec<RegionWithLeader>> {
        &self.pages
    }
}

impl Drop for RegionWarmup {
    fn drop(&mut self) {
        // Ends a PD call in flight; the worker's own stop ends the waits between pages.
        self.interrupt.fire();
    }
}

fn list_paced(
    meta: &dyn ClusterMeta,
    ranges: &[KeyRange],
    config: &WarmupConfig,
    pages: &Sender<Vec<RegionWithLeader>>,
    stop: &StopToken,
) {
    let started = Instant::now();
    let mut listed = 0;
    for range in ranges {
        let mut iter = RegionIter::new(meta, range);
        iter.page_size = config.page_size;
        // Retried here, after a backoff of our own: a failed page is asked for again, never
        // skipped.
        iter.retry = ScanRetry { attempts: 1, ..ScanRetry::default() };
        let (mut backoff, mut failures) = (config.backoff, 0);
        while !iter.done() {
            let began = Instant::now();
            match deadline::within(Some(began + config.call_deadline), || iter.next_page()) {
                Ok(page) => {
                    let took = began.elapsed();
                    if failures > 0 {
                        info!("region cache warm-up: listing again after {failures} failed attempts");
                    }
                    (backoff, failures) = (config.backoff, 0);
                    listed += page.len();
                    if !stop.send(pages, page) || stop.sleep(took) {
                        return;
                    }
                }
                Err(e) => {
                    if stop.is_stopped() {
                        return;
                    }
                    failures += 1;
                    if failures == 1 {
                        warn!("region cache warm-up: {e}; retrying with backoff");
                    } else {
                        debug!("region cache warm-up: attempt {failures} failed: {e}");
                    }
                    if stop.sleep(backoff) {
                        return;
                    }
                    backoff = (backoff * 2).min(config.max_backoff);
                }
            }
        }
    }
    info!("region cache warmed up: {listed} regions of {} ranges listed in {:?}", ranges.len(), started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{regions_from_boundaries, MemMeta};
    use crate::error::Error;

    #[test]
    fn every_page_comes_once_in_order_and_a_failed_page_is_asked_for_again() {
        let keys: Vec<Vec<u8>> = (0..19).map(|i| format!("{i:02}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let all = regions_from_boundaries(&boundaries, &[1, 2]);
        let meta = Arc::new(MemMeta::new(all.clone()));
        meta.script(Ok(all[..4].to_vec()));
        meta.script(Err(Error::Timeout("PD ScanRegions (its deadline has passed)".into())));
        meta.script(Err(Error::Timeout("PD ScanRegions (its deadline has passed)".into())));
        let config = WarmupConfig { page_size: 4, backoff: Duration::from_millis(10), ..WarmupConfig::default() };
        let warmup = RegionWarmup::start(meta.clone(), vec![KeyRange::full()], config).unwrap();
        let mut listed = Vec::new();
        for page in warmup.pages().iter() {
            listed.extend(page);
        }
        assert_eq!(listed, all, "the two failures cost nothing but time");
        let scans = meta.scans.lock();
        assert_eq!(scans.len(), 2 + all.len().div_ceil(4));
        assert_eq!(scans[1].0, scans[2].0, "the failed page asked for again from where it was");
        assert_eq!(scans[2].0, scans[3].0);
    }

    #[test]
    fn dropping_it_ends_a_warm_up_waiting_on_pd_or_on_its_taker() {
        let all = regions_from_boundaries(&[b"b", b"c", b"d"], &[1]);
        let meta = Arc::new(MemMeta::new(all));
        // Nobody takes the pages: the thread waits to hand over the second.
        let config = WarmupConfig { page_size: 1, ..WarmupConfig::default() };
        let warmup = RegionWarmup::start(meta.clone(), vec![KeyRange::full()], config).unwrap();
        crate::testing::wait_until("the second page listed", Duration::from_secs(10), || meta.scans.lock().len() >= 2);
        let began = Instant::now();
        drop(warmup);
        assert!(began.elapsed() < Duration::from_secs(5), "stopping took {:?}", began.elapsed());
    }
}
