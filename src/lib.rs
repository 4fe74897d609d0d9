//! streamhelper: the log-backup (PITR) checkpoint advancer of TiDB/TiKV, synchronous and
//! thread-based. See `docs/architecture.md` for the module map and the data flow, and
//! `docs/api.md` for the Go names of `br/pkg/streamhelper` and their Rust items.
//!
//! A host program starts a [`Daemon`] with a [`DaemonConfig`] and keeps the [`DaemonHandle`];
//! one that wants to drive ticks on its own thread builds a [`CheckpointAdvancer`] over an
//! [`Env`]. The public modules are the clients and the pieces those are built from: the
//! metadata client ([`meta`]), etcd ([`etcd`]), PD/TiKV ([`cluster`]), the span frontier
//! ([`spans`]), the I/O-free core ([`advancer`]), lock resolution ([`locks`]), the backup
//! storage copy ([`storage`]) and the wire types ([`proto`]). Every item has one path.
//!
//! The simulated cluster ([`sim`]), the etcd launcher ([`etcd::EtcdProcess`]) and the helpers
//! tests share ([`testing`]) are behind the default-on `sim` feature.

pub mod advancer;
pub mod cluster;
pub mod codec;
mod daemon;
mod error;
pub mod etcd;
pub mod locks;
pub mod meta;
pub mod proto;
mod security;
#[cfg(feature = "sim")]
pub mod sim;
pub mod spans;
pub mod storage;
mod text;
mod timefmt;
mod types;
mod worker;

#[cfg(test)]
mod outside_input_tests;

pub use advancer::config::{settings_markdown, Config, Kind as SettingKind, Section, Setting, Settings, SETTINGS};
pub use daemon::metrics;
pub use daemon::{
    is_our_owner_id, new_owner_id, random_uuid, CheckpointAdvancer, Daemon, DaemonConfig, DaemonHandle, DaemonStatus,
    Env, RegionHint, RegionView, TaskView,
};
pub use error::{Error, Result, ResultExt};
pub use security::{Security, SecurityConfig};
pub use types::{DisplayKey, KeyRange, RegionId, StoreId, Ts};
pub use worker::{stop_pair, Interrupt, StopHandle, StopToken};

/// TSO arithmetic: a [`Ts`] is `physical_ms << 18 | logical`.
pub mod ts {
    pub use crate::types::{
        compose_ts, local_now_ts, physical_ms, system_time_of, ts_add, ts_distance, ts_from_system_time, ts_sub,
    };
}

/// Text forms shared by the library and the `streamhelper` binary: Go-style durations (the
/// config file's and every flag's), RFC 3339 and BR's date layout, and text from peers made
/// safe for terminals and logs.
pub mod format {
    pub use crate::text::{printable, redact_url, shown_url};
    pub use crate::timefmt::{
        format_br_date, format_duration, format_rfc3339, local_offset_secs, parse_duration, parse_rfc3339, MAX_DURATION,
    };
}

#[cfg(any(test, feature = "sim"))]
mod rng;
#[cfg(any(test, feature = "sim"))]
pub mod testing;
