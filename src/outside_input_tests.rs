//! Every parser of outside input (etcd values and keys, region boundaries, times, addresses)
//! over arbitrary bytes: never a panic, and every error names what it could not read.

use proptest::prelude::*;

use crate::codec::{decode_boundary, encode_bytes};
use crate::meta::client::{decode_ranges, decode_task_info, name_under};
use crate::meta::keys::{self, decode_u64};
use crate::meta::{PauseState, PauseV2};
use crate::proto::mvccpb::KeyValue;
use crate::security::strip_scheme;
use crate::timefmt::{parse_duration, parse_rfc3339, MAX_DURATION};
use crate::Settings;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..96)
}

/// Text near the accepted forms: mutations of an RFC 3339 time with ASCII and multi-byte
/// characters where digits and separators go.
fn time_like() -> impl Strategy<Value = String> {
    let piece =
        prop_oneof![Just("2024-05-01T12:00:00".to_string()), "[0-9:T.+Z-]{0,8}", "[é日\u{1b}\0]{1,2}", ".{0,6}",];
    prop::collection::vec(piece, 1..4).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn task_info_values(value in bytes()) {
        if let Err(e) = decode_task_info("t", b"/tidb/br-stream/info/t", &value) {
            prop_assert!(e.to_string().contains("/tidb/br-stream/info/t"), "{e}");
        }
    }

    #[test]
    fn range_keys(suffixes in prop::collection::vec((bytes(), bytes()), 0..4), foreign in bytes()) {
        let mut kvs: Vec<KeyValue> = suffixes
            .into_iter()
            .map(|(start, end)| {
                let mut kv = KeyValue::default();
                let mut key = keys::ranges_of("t").into_bytes();
                key.extend_from_slice(&start);
                kv.set_key(key);
                kv.set_value(end);
                kv
            })
            .collect();
        let mut stray = KeyValue::default();
        stray.set_key(foreign);
        kvs.push(stray);
        match decode_ranges("t", &kvs) {
            Ok(ranges) => prop_assert!(ranges.iter().all(|r| r.end.is_empty() || r.start < r.end)),
            Err(e) => prop_assert!(e.to_string().contains("task t"), "{e}"),
        }
    }

    #[test]
    fn task_names_under_a_prefix(key in bytes()) {
        if let Some(name) = name_under("/tidb/br-stream/info/", &key) {
            prop_assert!(!name.is_empty() && !name.contains('/'));
        }
    }

    #[test]
    fn pause_values(value in bytes()) {
        // Any value is a pause; describing it never fails.
        let _ = PauseState::from_value(&value).describe();
        if let Err(e) = PauseV2::from_json(&value) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn pause_values_with_odd_times(time in time_like(), payload in ".{0,12}") {
        let json = serde_json::json!({
            "severity": "ERROR",
            "operation_hostname": "h",
            "operation_pid": 1,
            "operation_time": time,
            "payload_type": "text/plain;charset=UTF-8",
            "payload": payload,
        });
        let state = PauseState::from_value(json.to_string().as_bytes());
        let _ = state.describe();
    }

    #[test]
    fn checkpoint_values(value in bytes()) {
        prop_assert_eq!(decode_u64(&value).is_some(), value.len() == 8);
    }

    #[test]
    fn region_boundaries(encoded in bytes()) {
        if let Ok(raw) = decode_boundary(&encoded) {
            // What decodes re-encodes to a prefix of the input (trailing bytes are ignored).
            if !encoded.is_empty() {
                prop_assert!(encoded.starts_with(&encode_bytes(&raw)));
            }
        }
    }

    #[test]
    fn times(text in time_like()) {
        if let Err(e) = parse_rfc3339(&text) {
            prop_assert!(e.contains(&format!("{text:?}")), "{e}");
        }
    }

    /// Durations come from flags, the config file and TiKV's `/config` page; long digit runs
    /// reach past what `Instant` arithmetic takes.
    #[test]
    fn durations(text in prop_oneof![
        "[0-9.]{0,6}(ns|us|µs|ms|s|m|h|d|x|é)?[0-9.]{0,4}[a-zé]{0,2}",
        "[0-9.]{0,30}(ms|s|m|h|d)?([0-9.]{0,6}(ms|s|m|h|d))?",
        ".{0,8}",
    ]) {
        match parse_duration(&text) {
            Ok(d) => {
                prop_assert!(d <= MAX_DURATION);
                // Whatever parses is a value the settings take or refuse by name, never a panic.
                if let Err(e) = Settings::default().set_by_key("check-point-lag-limit", &text) {
                    prop_assert!(e.to_string().contains("check-point-lag-limit"), "{e}");
                }
            }
            Err(e) => prop_assert!(e.contains(&format!("{text:?}")), "{e}"),
        }
    }

    #[test]
    fn config_files(text in "(\\[[a-zé-]{0,9}\\]\n)?[a-zé-]{0,14} ?= ?(\"[0-9.a-zé]{0,5}\"|[0-9]{0,3}|\\[\\])\n.{0,12}") {
        if let Err(e) = Settings::default().apply_toml(&text, "f.toml") {
            prop_assert!(e.to_string().contains("f.toml"), "{e}");
        }
    }

    #[test]
    fn addresses(text in "(https?://)?[a-z0-9.\\[\\]:é\0\u{1b} /-]{0,24}") {
        if let Err(e) = strip_scheme(&text) {
            prop_assert!(e.to_string().contains(&format!("{text:?}")), "{e}");
        }
    }
}

#[test]
fn a_non_ascii_time_offset_is_an_error_not_a_panic() {
    // A pause value like this crashed `task status` and `task list`.
    for text in ["2024-05-01T12:00:00+0é00", "2024-05-01T12:00:0é+08:00", "2024-05-01T12:00:00.日"] {
        let err = parse_rfc3339(text).unwrap_err();
        assert!(err.contains(&format!("{text:?}")), "{err}");
    }
}
