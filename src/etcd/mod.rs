//! A small synchronous etcd v3 client on grpcio (KV, Txn, Watch, Lease, election), and a
//! launcher for a real etcd server used by the demo and the tests.

mod client;
mod election;
mod lease;
#[cfg(feature = "sim")]
pub(crate) mod process;
mod watch;

pub use client::{prefix_end, Cmp, EtcdClient, EtcdConfig, GetOptions, KeySpan, RangeResult, Txn, TxnOp, TxnResult};
pub use election::{Candidate, Election, Leadership, TakeOver};
pub use lease::LeaseKeeper;
#[cfg(feature = "sim")]
pub use process::{EtcdProcess, ServerTls};
pub use watch::{EventKind, WatchBatch, WatchEvent, WatchOptions, Watcher};

pub use crate::proto::etcdserverpb::{
    Compare_CompareResult as CompareResult, RangeRequest_SortOrder as SortOrder, RangeRequest_SortTarget as SortTarget,
};
pub use crate::proto::mvccpb::KeyValue;
