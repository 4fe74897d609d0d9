//! Failure stories of the core, each a plain unit test: no threads, no clocks.

use std::time::Duration;

use super::config::Config;
use super::core::{Action, Advancer, PollPlan};
use crate::meta::UploadOutcome;
use crate::proto::brpb::StreamBackupTaskInfo;
use crate::types::{compose_ts, KeyRange, Ts};

const MINUTE: u64 = 60_000;

/// A TSO `minutes` after an arbitrary epoch.
fn at(minutes: f64) -> Ts {
    compose_ts(1_700_000_000_000 + (minutes * MINUTE as f64) as u64, 0)
}

fn info(name: &str, start: Ts) -> StreamBackupTaskInfo {
    let mut info = StreamBackupTaskInfo::new();
    info.set_name(name.into());
    info.set_start_ts(start);
    info
}

fn r(start: &str, end: &str) -> KeyRange {
    KeyRange::new(start, end)
}

/// Lag checks off: most stories are about what gets uploaded, not about pausing.
fn config() -> Config {
    Config { lag_limit: Duration::ZERO, ..Config::default() }
}

fn with_lag_limit() -> Config {
    Config { lag_limit: Duration::from_secs(60), ..Config::default() }
}

fn uploads(actions: &[Action]) -> Vec<(String, Ts)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Upload { task, ts, .. } => Some((task.clone(), *ts)),
            _ => None,
        })
        .collect()
}

fn gc(actions: &[Action]) -> Option<&Action> {
    actions.iter().find(|a| matches!(a, Action::BlockGc { .. } | Action::UnblockGc))
}

/// Runs `finish_tick`, acknowledges every upload as written and every pause (asked for at
/// the tick or after an upload) as written; returns the tick's actions and the pauses.
fn tick(adv: &mut Advancer, now: Ts) -> (Vec<Action>, Vec<Action>) {
    let actions = adv.finish_tick(now);
    let pauses = pauses(&actions)
        .into_iter()
        .chain(
            uploads(&actions).into_iter().filter_map(|(task, _)| adv.on_uploaded(&task, UploadOutcome::Written, now)),
        )
        .collect::<Vec<_>>();
    for pause in &pauses {
        if let Action::Pause { task, incarnation, .. } = pause {
            adv.on_paused(task, *incarnation);
        }
    }
    (actions, pauses)
}

fn pauses(actions: &[Action]) -> Vec<Action> {
    actions.iter().filter(|a| matches!(a, Action::Pause { .. })).cloned().collect()
}

#[test]
fn tick_uploads_the_minimum_of_all_regions() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_poll_result("t", [(&r("", "b"), at(3.0)), (&r("b", "d"), at(2.0)), (&r("d", ""), at(4.0))]);
    let (actions, pauses) = tick(&mut adv, at(4.5));
    assert_eq!(uploads(&actions), [("t".to_string(), at(2.0))]);
    assert_eq!(gc(&actions), Some(&Action::BlockGc { safe_point: at(2.0) - 1 }));
    assert!(pauses.is_empty());
}

#[test]
fn a_region_that_did_not_answer_holds_the_checkpoint() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    // [b, d) failed (not leader / epoch mismatch / store down): no value for it.
    adv.on_poll_result("t", [(&r("", "b"), at(3.0)), (&r("d", ""), at(4.0))]);
    assert_eq!(uploads(&tick(&mut adv, at(4.5)).0), [("t".to_string(), at(0.0))]);
    adv.on_poll_result("t", [(&r("b", "d"), at(3.5))]);
    assert_eq!(uploads(&tick(&mut adv, at(4.6)).0), [("t".to_string(), at(3.0))]);
}

#[test]
fn late_lower_reports_never_lower_the_checkpoint() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_poll_result("t", [(&KeyRange::full(), at(5.0))]);
    assert_eq!(uploads(&tick(&mut adv, at(5.5)).0), [("t".to_string(), at(5.0))]);
    adv.on_poll_result("t", [(&r("a", "z"), at(1.0))]);
    adv.on_flush(&r("", "m"), at(2.0), at(2.0));
    tick(&mut adv, at(5.6));
    assert_eq!(adv.status()[0].checkpoint, at(5.0));
}

#[test]
fn split_outside_the_task_ranges_cannot_freeze_the_checkpoint() {
    // tidb#37783: a region straddling the task edge, or lying wholly outside, must neither
    // be required nor leak its value outside the task.
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[r("0002", "0048")], false, 0);
    adv.on_poll_result("t", [(&r("", "0012"), at(5.0)), (&r("0012", "0034"), at(4.0)), (&r("0034", "0049"), at(6.0))]);
    assert_eq!(uploads(&tick(&mut adv, at(6.5)).0), [("t".to_string(), at(4.0))]);
    let status = &adv.status()[0];
    assert_eq!(status.slowest, Some((r("0012", "0034"), at(4.0))));
}

#[test]
fn a_new_owner_does_not_pause_a_healthy_task_from_its_empty_memory() {
    // tidb#58031 / tidb#53561: lag is judged from the stored checkpoint.
    let mut adv = Advancer::new(with_lag_limit());
    let stored = at(10.0);
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, stored);
    let (actions, pauses) = tick(&mut adv, at(10.5));
    assert_eq!(uploads(&actions), [("t".to_string(), stored)], "starts from the stored value, not the start ts");
    assert!(pauses.is_empty());
    // Even if memory lags, a higher stored value decides the lag.
    let mut behind = Advancer::new(with_lag_limit());
    behind.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    behind.finish_tick(at(10.5));
    assert_eq!(behind.on_uploaded("t", UploadOutcome::KeptHigher { stored }, at(10.5)), None);
    assert_eq!(behind.status()[0].checkpoint, stored, "a higher stored checkpoint is adopted");
}

#[test]
fn a_lagging_task_is_paused_once_and_stops_uploading() {
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(1.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_poll_result("t", [(&KeyRange::full(), at(2.0))]);
    assert!(tick(&mut adv, at(2.5)).1.is_empty(), "30 s of lag is within the 1 min limit");
    let (_, pauses) = tick(&mut adv, at(4.0));
    match pauses.as_slice() {
        [Action::Pause { task, pause, .. }] => {
            assert_eq!(task, "t");
            assert_eq!(pause.severity, crate::meta::Severity::Error);
            let text = format!("{:?}", pause.payload().unwrap());
            assert!(text.contains("the lag is too huge (2m0s)"), "{text}");
        }
        other => panic!("expected one pause, got {other:?}"),
    }
    assert!(uploads(&adv.finish_tick(at(5.0))).is_empty(), "a paused task is not uploaded");
    assert!(adv.status()[0].paused);
}

#[test]
fn raising_the_lag_limit_lets_a_resumed_task_run() {
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(1.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_poll_result("t", [(&KeyRange::full(), at(2.0))]);
    assert_eq!(tick(&mut adv, at(4.0)).1.len(), 1);
    adv.update_config_with(|c| c.lag_limit = Duration::from_secs(3600));
    adv.resume_task("t", at(2.0));
    let (actions, pauses) = tick(&mut adv, at(4.1));
    assert_eq!(uploads(&actions), [("t".to_string(), at(2.0))]);
    assert!(pauses.is_empty());
}

#[test]
fn the_paused_flag_does_not_outlive_its_deleted_task() {
    // tidb#53047.
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.set_paused("t", true);
    assert!(adv.remove_task("t"));
    adv.add_task(info("t", at(1.0)), 1, &[KeyRange::full()], false, 0);
    assert_eq!(uploads(&adv.finish_tick(at(1.1))), [("t".to_string(), at(1.0))]);
}

#[test]
fn deleting_one_task_leaves_the_others_alone() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("a", at(0.0)), 1, &[r("a", "b")], false, 0);
    adv.add_task(info("b", at(0.0)), 1, &[r("b", "c")], false, 0);
    adv.on_flush(&r("a", "c"), at(1.0), at(1.0));
    adv.set_paused("c", true); // unknown names are ignored
    assert!(!adv.remove_task("zzz"));
    assert!(adv.remove_task("a"));
    assert_eq!(uploads(&tick(&mut adv, at(1.1)).0), [("b".to_string(), at(1.0))]);
}

#[test]
fn one_gc_safepoint_covers_every_task_and_is_released_with_the_last() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("a", at(2.0)), 1, &[r("a", "b")], false, 0);
    adv.add_task(info("b", at(3.0)), 1, &[r("b", "c")], true, 0);
    assert_eq!(gc(&adv.finish_tick(at(3.1))), Some(&Action::BlockGc { safe_point: at(2.0) - 1 }));
    adv.on_flush(&r("a", "b"), at(5.0), at(5.0));
    assert_eq!(
        gc(&adv.finish_tick(at(5.1))),
        Some(&Action::BlockGc { safe_point: at(3.0) - 1 }),
        "the paused task still holds GC"
    );
    adv.remove_task("a");
    adv.remove_task("b");
    assert_eq!(gc(&adv.finish_tick(at(5.2))), Some(&Action::UnblockGc));
    assert_eq!(gc(&adv.finish_tick(at(5.3))), Some(&Action::UnblockGc), "asked for again until PD confirms");
    adv.on_gc_released();
    assert_eq!(gc(&adv.finish_tick(at(5.4))), None, "released for sure: not asked again");
}

#[test]
fn with_no_task_the_safepoint_is_removed_whoever_set_it() {
    // A fresh advancer (a restart, a new owner) never blocked GC itself, yet an earlier run
    // or owner may have left the safepoint behind.
    let mut adv = Advancer::new(config());
    assert_eq!(gc(&adv.finish_tick(at(1.0))), Some(&Action::UnblockGc));
    adv.on_gc_released();
    assert_eq!(gc(&adv.finish_tick(at(1.1))), None);
    adv.forget_gc_release();
    assert_eq!(gc(&adv.finish_tick(at(1.2))), Some(&Action::UnblockGc), "a new term checks again");
}

#[test]
fn a_broken_subscription_tightens_the_polling_threshold() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_flush(&r("", "m"), at(8.0), at(8.0));
    adv.on_flush(&r("m", ""), at(11.0), at(11.0));
    let now = at(12.0);
    assert_eq!(adv.plan_polls(now), [], "4 min old at most: nothing to poll while subscriptions work");
    adv.set_subscriptions_healthy(false);
    assert_eq!(adv.plan_polls(now), [PollPlan { task: "t".into(), ranges: vec![r("", "m")] }]);
    adv.set_paused("t", true);
    assert_eq!(adv.plan_polls(now), [], "paused tasks are not polled");
}

#[test]
fn an_unchanged_checkpoint_is_uploaded_as_a_heartbeat_only() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_flush(&KeyRange::full(), at(1.0), at(1.0));
    assert_eq!(uploads(&tick(&mut adv, at(1.1)).0).len(), 1);
    assert_eq!(uploads(&tick(&mut adv, at(1.5)).0).len(), 0);
    assert_eq!(uploads(&tick(&mut adv, at(2.2)).0).len(), 1, "one minute later: heartbeat");
}

#[test]
fn a_fenced_upload_changes_nothing() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.finish_tick(at(10.0));
    assert_eq!(adv.on_uploaded("t", UploadOutcome::Fenced, at(10.0)), None, "no lag verdict without a stored value");
    assert_eq!(adv.status()[0].uploaded, None);
}

/// Regions with a true flushed ts; reports are random subsets, stale or fresh; splits move
/// boundaries. After every tick the checkpoint never exceeds the truth and never decreases.
#[test]
fn randomized_reports_never_overclaim_or_regress() {
    let mut seed = 0x5eed_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..50 {
        let task_range = r("b", "x");
        let mut adv = Advancer::new(config());
        adv.add_task(info("t", at(0.0)), 1, std::slice::from_ref(&task_range), false, 0);
        // Boundaries of regions over the whole key space; truth per region.
        let mut bounds: Vec<String> = vec![String::new(), "c".into(), "k".into(), "q".into()];
        let mut truth: Vec<Ts> = vec![at(0.0); bounds.len()];
        let mut last = 0;
        for step in 0..200 {
            let i = rand(bounds.len() as u64) as usize;
            match rand(4) {
                0 => {
                    // Split region i at a new key.
                    let key = format!("{}{}", (b'a' + rand(26) as u8) as char, rand(100));
                    if !bounds.contains(&key) {
                        let pos = bounds.partition_point(|b| *b < key);
                        bounds.insert(pos, key);
                        truth.insert(pos, truth[pos - 1]);
                    }
                }
                1 => truth[i] += rand(MINUTE) << 18,
                _ => {
                    // A report: the truth at some moment (possibly stale).
                    let end = bounds.get(i + 1).cloned().unwrap_or_default();
                    let reported = if rand(2) == 0 { truth[i] } else { at(0.0) + rand(truth[i] - at(0.0) + 1) };
                    let range = r(&bounds[i], &end);
                    if rand(2) == 0 {
                        adv.on_poll_result("t", [(&range, reported)]);
                    } else {
                        adv.on_flush(&range, reported, reported);
                    }
                }
            }
            let actions = adv.finish_tick(at(100.0));
            for (_, ts) in uploads(&actions) {
                adv.on_uploaded("t", UploadOutcome::Written, at(100.0));
                let true_min = (0..bounds.len())
                    .filter(|&j| {
                        let end = bounds.get(j + 1).cloned().unwrap_or_default();
                        r(&bounds[j], &end).overlaps(&task_range)
                    })
                    .map(|j| truth[j])
                    .min()
                    .unwrap();
                assert!(ts <= true_min, "round {round} step {step}: uploaded {ts} above the truth {true_min}");
                assert!(ts >= last, "round {round} step {step}: regressed from {last} to {ts}");
                last = ts;
            }
        }
    }
}

#[test]
fn a_stored_checkpoint_below_the_start_ts_is_not_lag() {
    // Upstream AddTaskWithLongRunTask: a task that starts in the past is judged from its
    // start, not from whatever older value etcd holds.
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(2.0)), 1, &[KeyRange::full()], false, 0);
    adv.finish_tick(at(5.0));
    assert_eq!(adv.on_uploaded("t", UploadOutcome::KeptHigher { stored: at(1.0) }, at(5.0)), None);
}

#[test]
fn flushes_after_the_last_task_is_gone_are_ignored() {
    // Upstream RemoveTaskAndFlush (#50839): stale events of a removed task change nothing.
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.remove_task("t");
    adv.on_flush(&KeyRange::full(), at(3.0), at(3.0));
    adv.on_poll_result("t", [(&KeyRange::full(), at(3.0))]);
    assert!(adv.status().is_empty());
    adv.add_task(info("t", at(1.0)), 1, &[KeyRange::full()], false, 0);
    assert_eq!(
        uploads(&adv.finish_tick(at(1.1))),
        [("t".to_string(), at(1.0))],
        "the new task starts from its own start"
    );
}

#[test]
fn a_re_added_task_is_judged_afresh() {
    // Upstream UnregisterAfterPause: pause, delete, re-add → the new task runs and is paused
    // again only by its own lag.
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.set_paused("t", true);
    adv.remove_task("t");
    adv.add_task(info("t", at(1.0)), 1, &[KeyRange::full()], false, 0);
    let (actions, pauses) = tick(&mut adv, at(1.5));
    assert_eq!(uploads(&actions).len(), 1);
    assert!(pauses.is_empty());
    let (_, pauses) = tick(&mut adv, at(3.0));
    assert_eq!(pauses.len(), 1, "two minutes without progress exceed the 1 min limit");
}

#[test]
fn polling_covers_only_lagging_spans_of_running_tasks() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("a", at(0.0)), 1, &[r("a", "c"), r("x", "z")], false, 0);
    adv.add_task(info("b", at(0.0)), 1, &[r("m", "n")], false, 0);
    adv.on_flush(&r("a", "c"), at(10.0), at(10.0));
    adv.on_flush(&r("m", "n"), at(10.0), at(10.0));
    let plans = adv.plan_polls(at(10.5));
    assert_eq!(plans, [PollPlan { task: "a".into(), ranges: vec![r("x", "z")] }]);
    assert_eq!(adv.checkpoint_in_range("a", &r("b", "y")), Some(at(0.0)));
    assert_eq!(adv.checkpoint_in_range("a", &r("a", "b")), Some(at(10.0)));
}

// Hostile peers (issue 17): nothing above the current time becomes a checkpoint.

#[test]
fn a_flush_from_the_future_is_refused_and_cannot_carry_the_checkpoint() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    assert_eq!(adv.on_flush(&KeyRange::full(), u64::MAX, at(1.0)), 1, "a store answering u64::MAX");
    assert_eq!(adv.on_flush(&r("", "m"), at(3.0), at(1.0)), 1, "two minutes ahead of now");
    assert_eq!(adv.on_flush(&r("m", ""), at(1.0), at(1.0)), 0, "exactly now is believable");
    let (actions, _) = tick(&mut adv, at(1.0));
    assert_eq!(uploads(&actions), [("t".to_string(), at(0.0))], "the refused flushes moved nothing");
    assert_eq!(gc(&actions), Some(&Action::BlockGc { safe_point: at(0.0) - 1 }));
}

#[test]
fn the_checkpoint_never_passes_now_even_if_the_frontier_does() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    // Within the tolerance a flush may be a little ahead of the driver's estimate of now.
    let ahead = at(1.0) + (1 << 18) * 500;
    assert_eq!(adv.on_flush(&KeyRange::full(), ahead, at(1.0)), 0);
    let (actions, _) = tick(&mut adv, at(1.0));
    assert_eq!(uploads(&actions), [("t".to_string(), at(1.0))], "clamped to now");
}

#[test]
fn a_stored_checkpoint_from_the_future_is_never_used_for_the_gc_safepoint() {
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, u64::MAX);
    adv.on_flush(&KeyRange::full(), at(0.5), at(1.0));
    let actions = adv.finish_tick(at(1.0));
    assert_eq!(uploads(&actions), [("t".to_string(), at(0.5))], "back to what the frontier supports");
    assert_eq!(gc(&actions), Some(&Action::BlockGc { safe_point: at(0.5) - 1 }));
    // etcd keeps its bogus value: it is neither adopted nor a reason to pause.
    assert_eq!(adv.on_uploaded("t", UploadOutcome::KeptHigher { stored: u64::MAX }, at(1.0)), None);
    assert_eq!(adv.status()[0].checkpoint, at(0.5));
    let later = adv.finish_tick(at(30.0));
    assert_eq!(gc(&later), Some(&Action::BlockGc { safe_point: at(0.5) - 1 }));
}

#[test]
fn a_kept_higher_value_above_now_is_not_adopted() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.finish_tick(at(1.0));
    assert_eq!(adv.on_uploaded("t", UploadOutcome::KeptHigher { stored: at(60.0) }, at(1.0)), None);
    assert_eq!(adv.status()[0].checkpoint, at(0.0));
    assert_eq!(gc(&adv.finish_tick(at(1.1))), Some(&Action::BlockGc { safe_point: at(0.0) - 1 }));
}

#[test]
fn a_task_without_ranges_is_refused_and_its_last_good_definition_stays() {
    let mut adv = Advancer::new(config());
    adv.add_task(info("empty", at(0.0)), 1, &[], false, 0);
    assert!(adv.status().is_empty(), "not an empty frontier uploading its start ts forever");
    adv.add_task(info("t", at(0.0)), 1, &[r("a", "b")], false, 0);
    adv.on_flush(&r("a", "b"), at(2.0), at(2.0));
    adv.add_task(info("t", at(1.0)), 1, &[], false, 0);
    let (actions, _) = tick(&mut adv, at(2.0));
    assert_eq!(uploads(&actions), [("t".to_string(), at(2.0))], "the earlier definition keeps advancing");
}

#[test]
fn a_jumping_clock_does_not_pause_a_healthy_task() {
    // A PD clock three days ahead paused a healthy task on the first tick (issue 17).
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    adv.on_flush(&KeyRange::full(), at(1.0), at(1.0));
    let jumped = at(3.0 * 24.0 * 60.0);
    adv.hold_lag_verdicts(jumped);
    let (_, pauses) = tick(&mut adv, jumped);
    assert!(pauses.is_empty(), "no verdict from a clock that just jumped");
    // TiKV's next flush carries the new time: the task is healthy.
    adv.on_flush(&KeyRange::full(), jumped + 1, jumped + 1);
    let (_, pauses) = tick(&mut adv, jumped + (1 << 18) * 30_000);
    assert!(pauses.is_empty());
}

#[test]
fn a_task_stuck_across_a_clock_jump_is_paused_one_lag_limit_later() {
    let mut adv = Advancer::new(with_lag_limit());
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    let jumped = at(600.0);
    adv.hold_lag_verdicts(jumped);
    assert!(tick(&mut adv, jumped).1.is_empty());
    assert!(tick(&mut adv, at(600.5)).1.is_empty(), "within one lag limit of the jump");
    assert_eq!(tick(&mut adv, at(601.5)).1.len(), 1, "stuck for real: paused after the grace");
}

#[test]
fn a_frozen_checkpoint_is_paused_at_the_first_tick_past_the_limit_not_at_the_heartbeat() {
    let mut adv = Advancer::new(Config { lag_limit: Duration::from_secs(3), ..Config::default() });
    adv.add_task(info("t", at(0.0)), 1, &[KeyRange::full()], false, 0);
    let (actions, pauses) = tick(&mut adv, at(0.01));
    assert_eq!(uploads(&actions).len(), 1);
    assert!(pauses.is_empty());
    // Ticks every second, nothing flushes, the heartbeat is a minute away.
    for second in 1..=3 {
        let (actions, pauses) = tick(&mut adv, at(second as f64 / 60.0));
        assert!(uploads(&actions).is_empty() && pauses.is_empty(), "second {second}: within the limit");
    }
    let (actions, pauses) = tick(&mut adv, at(4.5 / 60.0));
    assert!(uploads(&actions).is_empty(), "no heartbeat due yet");
    assert_eq!(pauses.len(), 1, "judged from the stored checkpoint at every tick");
    assert!(adv.status()[0].paused);
}

#[test]
fn an_unwritten_pause_is_asked_for_every_tick_and_the_task_runs_until_written() {
    let mut adv = Advancer::new(Config { lag_limit: Duration::from_secs(3), ..Config::default() });
    adv.add_task(info("t", at(0.0)), 7, &[KeyRange::full()], false, 0);
    let first = adv.finish_tick(at(0.1));
    assert_eq!(adv.on_uploaded("t", UploadOutcome::Written, at(0.1)).map(|p| pauses(&[p]).len()), Some(1));
    assert_eq!(uploads(&first).len(), 1);
    for tick in 1..=3 {
        let actions = adv.finish_tick(at(0.1 + tick as f64 / 60.0));
        assert_eq!(pauses(&actions).len(), 1, "tick {tick}: the failed pause is asked for again");
        assert!(!adv.status()[0].paused, "not paused in memory while etcd does not say so");
    }
    adv.on_paused("t", 6);
    assert!(!adv.status()[0].paused, "another incarnation's pause does not count");
    adv.on_paused("t", 7);
    assert!(adv.status()[0].paused);
    assert!(adv.finish_tick(at(1.0)).iter().all(|a| !matches!(a, Action::Pause { .. } | Action::Upload { .. })));
}
