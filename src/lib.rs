//! streamhelper: the log-backup (PITR) checkpoint advancer of TiDB/TiKV, synchronous and
//! thread-based. See `docs/architecture.md` for the module map and the data flow.

pub mod advancer;
pub mod cluster;
pub mod codec;
pub mod daemon;
pub mod error;
pub mod etcd;
pub mod locks;
pub mod meta;
pub mod proto;
pub mod security;
#[cfg(feature = "sim")]
pub mod sim;
pub mod spans;
pub mod storage;
pub mod text;
pub mod timefmt;
pub mod types;
pub mod worker;

#[cfg(test)]
mod outside_input_tests;

pub use error::{Error, Result, ResultExt};
pub use types::{KeyRange, RegionId, StoreId, Ts};
