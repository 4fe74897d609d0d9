//! The sim's controls as text commands, one per line: what the `streamhelper sim` command
//! reads from its control file (and from a terminal). `help` lists them.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::timefmt::parse_duration;
use crate::types::{DisplayKey, KeyRange, RegionId, StoreId, Ts};

use super::{record_key, table_prefix, SimCluster};

pub const HELP: &str = "\
controls (one per line; # starts a comment):
  flush [STORE]                 one flush round on every store, or on STORE
  split KEY                     KEY: t<table>, t<table>_r<row>, 0x<hex> or plain text
  merge LEFT RIGHT              merge region RIGHT into its left neighbour LEFT
  transfer-leader REGION STORE
  remove-leader REGION
  scatter                       seeded random leader moves
  stop-store STORE | hang-store STORE | resume-store STORE | restart-store STORE
  fail-over STORE               its leaders move to other live replicas (a Raft election)
  never-flush REGION on|off
  subscription STORE on|off     off: SubscribeFlushEvent answers UNIMPLEMENTED
  reset-subscriptions STORE     end the store's flush streams with UNAVAILABLE
  delay-store STORE DURATION    e.g. 500ms, 2s; 0 removes the delay
  stop-pd | start-pd
  gc-safe-point TS              move the cluster GC safe point
  status                        stores, regions and the true checkpoint
  quit";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Flush(Option<StoreId>),
    Split(Vec<u8>),
    Merge(RegionId, RegionId),
    TransferLeader(RegionId, StoreId),
    RemoveLeader(RegionId),
    Scatter,
    StopStore(StoreId),
    HangStore(StoreId),
    ResumeStore(StoreId),
    RestartStore(StoreId),
    FailOver(StoreId),
    NeverFlush(RegionId, bool),
    Subscription(StoreId, bool),
    ResetSubscriptions(StoreId),
    DelayStore(StoreId, Duration),
    StopPd,
    StartPd,
    GcSafePoint(Ts),
    Status,
    Help,
    Quit,
}

/// A split key: `t<table>`, `t<table>_r<row>` (TiDB's encoding), `0x<hex>`, or the text.
pub fn parse_key(text: &str) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::Config(format!("bad key {text:?}: {why}"));
    if let Some(hex) = text.strip_prefix("0x") {
        if hex.len() % 2 != 0 || !hex.is_ascii() {
            return Err(bad("expected an even number of hex digits"));
        }
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad("not hex")))
            .collect();
    }
    if let Some(rest) = text.strip_prefix('t') {
        let (table, row) = rest.split_once("_r").map_or((rest, None), |(t, r)| (t, Some(r)));
        if let Ok(table) = table.parse::<u64>() {
            return match row.map(str::parse::<u64>) {
                None => Ok(table_prefix(table)),
                Some(Ok(row)) => Ok(record_key(table, row)),
                Some(Err(_)) => Err(bad("the row after _r is not a number")),
            };
        }
    }
    Ok(text.as_bytes().to_vec())
}

fn number<T: std::str::FromStr>(word: Option<&str>, what: &str, line: &str) -> Result<T> {
    word.and_then(|w| w.parse().ok()).ok_or_else(|| Error::Config(format!("{line:?}: expected {what}")))
}

fn switch(word: Option<&str>, line: &str) -> Result<bool> {
    match word {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        _ => Err(Error::Config(format!("{line:?}: expected on or off"))),
    }
}

/// One control line; `None` for blank and comment lines.
pub fn parse_line(line: &str) -> Result<Option<Control>> {
    let text = line.split('#').next().unwrap_or("").trim();
    let mut words = text.split_whitespace();
    let Some(verb) = words.next() else { return Ok(None) };
    let mut next = || words.next();
    let control = match verb {
        "flush" => Control::Flush(next().map(|w| number(Some(w), "a store id", line)).transpose()?),
        "split" => {
            Control::Split(parse_key(next().ok_or_else(|| Error::Config(format!("{line:?}: expected a key")))?)?)
        }
        "merge" => Control::Merge(number(next(), "a region id", line)?, number(next(), "a region id", line)?),
        "transfer-leader" => {
            Control::TransferLeader(number(next(), "a region id", line)?, number(next(), "a store id", line)?)
        }
        "remove-leader" => Control::RemoveLeader(number(next(), "a region id", line)?),
        "scatter" => Control::Scatter,
        "stop-store" => Control::StopStore(number(next(), "a store id", line)?),
        "hang-store" => Control::HangStore(number(next(), "a store id", line)?),
        "resume-store" => Control::ResumeStore(number(next(), "a store id", line)?),
        "restart-store" => Control::RestartStore(number(next(), "a store id", line)?),
        "fail-over" => Control::FailOver(number(next(), "a store id", line)?),
        "never-flush" => Control::NeverFlush(number(next(), "a region id", line)?, switch(next(), line)?),
        "subscription" => Control::Subscription(number(next(), "a store id", line)?, switch(next(), line)?),
        "reset-subscriptions" => Control::ResetSubscriptions(number(next(), "a store id", line)?),
        "delay-store" => Control::DelayStore(
            number(next(), "a store id", line)?,
            parse_duration(next().ok_or_else(|| Error::Config(format!("{line:?}: expected a duration")))?)
                .map_err(Error::Config)?,
        ),
        "stop-pd" => Control::StopPd,
        "start-pd" => Control::StartPd,
        "gc-safe-point" => Control::GcSafePoint(number(next(), "a TSO", line)?),
        "status" => Control::Status,
        "help" => Control::Help,
        "quit" | "exit" => Control::Quit,
        other => return Err(Error::Config(format!("unknown control {other:?}; `help` lists them"))),
    };
    Ok(Some(control))
}

impl Control {
    /// Applies the control; the text says what happened, for the operator.
    pub fn apply(&self, sim: &SimCluster) -> Result<String> {
        Ok(match self {
            Control::Flush(None) => {
                sim.flush_all();
                "flushed every store".into()
            }
            Control::Flush(Some(store)) => {
                sim.flush_store(*store);
                format!("flushed store {store}")
            }
            Control::Split(key) => {
                let (left, right) = sim.split(key)?;
                format!("split at {}: regions {left} and {right}", DisplayKey(key))
            }
            Control::Merge(left, right) => format!("merged into region {}", sim.merge(*left, *right)?),
            Control::TransferLeader(region, store) => {
                sim.transfer_leader(*region, *store)?;
                format!("region {region} now led by store {store}")
            }
            Control::RemoveLeader(region) => {
                sim.remove_leader(*region);
                format!("region {region} has no leader")
            }
            Control::Scatter => {
                sim.scatter();
                "leaders scattered".into()
            }
            Control::StopStore(store) => {
                sim.stop_store(*store);
                format!("store {store} stopped")
            }
            Control::HangStore(store) => {
                sim.hang_store(*store);
                format!("store {store} hung")
            }
            Control::ResumeStore(store) => {
                sim.resume_store(*store);
                format!("store {store} resumed")
            }
            Control::RestartStore(store) => format!("store {store} restarted at {}", sim.restart_store(*store)?),
            Control::FailOver(store) => format!("store {store}: {} leaders moved off", sim.fail_over(*store)?),
            Control::NeverFlush(region, never) => {
                sim.set_never_flush(*region, *never);
                format!("region {region} never-flush {never}")
            }
            Control::Subscription(store, on) => {
                sim.set_subscription_supported(*store, *on);
                format!("store {store} subscription supported: {on}")
            }
            Control::ResetSubscriptions(store) => {
                sim.reset_subscriptions(*store);
                format!("store {store} subscriptions reset")
            }
            Control::DelayStore(store, delay) => {
                sim.set_store_delay(*store, *delay);
                format!("store {store} replies delayed by {delay:?}")
            }
            Control::StopPd => {
                sim.stop_pd();
                "PD stopped".into()
            }
            Control::StartPd => {
                sim.start_pd()?;
                format!("PD serving at {}", sim.pd_endpoint())
            }
            Control::GcSafePoint(ts) => {
                sim.set_gc_safe_point(*ts);
                format!("cluster GC safe point at {ts}")
            }
            Control::Status => status(sim),
            Control::Help => HELP.into(),
            Control::Quit => "quitting".into(),
        })
    }
}

fn status(sim: &SimCluster) -> String {
    let mut text = format!(
        "PD {}; {} regions; true checkpoint {}",
        sim.pd_endpoint(),
        sim.region_count(),
        sim.true_checkpoint(&KeyRange::full())
    );
    let (scans, scanned) = sim.pd_scans();
    text.push_str(&format!("\nPD region scans: {scans} calls, {scanned} regions"));
    for store in sim.store_ids() {
        let flushed = sim.last_flush_ts(store).map_or("never".to_string(), |ts| ts.to_string());
        text.push_str(&format!("\nstore {store} at {}: last flush {flushed}", sim.store_address(store)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(parse_line("  # comment").unwrap(), None);
        assert_eq!(parse_line("flush").unwrap(), Some(Control::Flush(None)));
        assert_eq!(parse_line("flush 2 # again").unwrap(), Some(Control::Flush(Some(2))));
        assert_eq!(parse_line("split t100_r5").unwrap(), Some(Control::Split(record_key(100, 5))));
        assert_eq!(parse_line("split t7").unwrap(), Some(Control::Split(table_prefix(7))));
        assert_eq!(parse_line("split 0x61ff").unwrap(), Some(Control::Split(vec![0x61, 0xff])));
        assert_eq!(parse_line("split abc").unwrap(), Some(Control::Split(b"abc".to_vec())));
        assert_eq!(parse_line("transfer-leader 1001 2").unwrap(), Some(Control::TransferLeader(1001, 2)));
        assert_eq!(parse_line("fail-over 3").unwrap(), Some(Control::FailOver(3)));
        assert_eq!(parse_line("never-flush 1001 on").unwrap(), Some(Control::NeverFlush(1001, true)));
        assert_eq!(
            parse_line("delay-store 3 250ms").unwrap(),
            Some(Control::DelayStore(3, Duration::from_millis(250)))
        );
        assert!(parse_line("split 0x6").is_err());
        assert!(parse_line("stop-store x").unwrap_err().to_string().contains("store id"));
        assert!(parse_line("frobnicate").unwrap_err().to_string().contains("frobnicate"));
        assert!(parse_line("delay-store 3 soon").unwrap_err().to_string().contains("soon"));
    }
}
