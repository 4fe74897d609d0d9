//! The crate's one error type. Every variant names the thing that failed (endpoint, task,
//! store, region, key range, file) so that a log line alone tells the operator where to look.

use std::path::PathBuf;

use crate::types::{KeyRange, RegionId, StoreId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A gRPC call failed at the transport or status level.
    #[error("{call} to {target} failed: {source}")]
    Rpc {
        call: &'static str,
        target: String,
        /// Boxed: a gRPC status is large and every `Result` would carry its size.
        #[source]
        source: Box<grpcio::Error>,
    },

    /// etcd answered, but not with what the request needed.
    #[error("etcd {endpoint}: {reason}")]
    Etcd { endpoint: String, reason: String },

    /// None of the configured endpoints answered.
    #[error("no {service} endpoint reachable (tried {endpoints}); last error: {last}. Check that the cluster is up and the addresses are right")]
    Unreachable { service: &'static str, endpoints: String, last: String },

    /// A watch asked for a revision etcd has already compacted away; re-list, then watch
    /// from the revision of the listing.
    #[error("etcd watch on {key} from revision {requested} failed: compacted up to revision {compact_revision}; re-list and watch again")]
    Compacted { key: String, requested: i64, compact_revision: i64 },

    /// A lease expired or was revoked: keys bound to it are gone.
    #[error("etcd lease {lease_id:x} lost: {reason}")]
    LeaseLost { lease_id: i64, reason: String },

    /// An address or URL that cannot be used to dial.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },

    /// A TLS file (CA, certificate, key) that cannot be read.
    #[error("cannot read TLS {role} file {path}: {source}")]
    TlsFile {
        role: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Metadata in etcd that does not decode; the task and key say what to inspect or delete.
    #[error("task {task}: bad value at etcd key {key}: {reason}")]
    BadMeta { task: String, key: String, reason: String },

    #[error("task {0} not found in etcd")]
    TaskNotFound(String),

    /// A task definition rejected before it is written.
    #[error("invalid task {task}: {reason}")]
    InvalidTask { task: String, reason: String },

    /// PD answered with something inconsistent.
    #[error("PD {endpoint}: {reason}")]
    Pd { endpoint: String, reason: String },

    /// PD answered with an application error in its response header, kept as PD typed it.
    #[error("PD {endpoint}: {kind:?}: {message}")]
    PdHeader { endpoint: String, kind: crate::proto::pdpb::ErrorType, message: String },

    /// A TiKV store failed as a whole (dial, RPC, stream).
    #[error("store {store_id} ({address}): {reason}")]
    Store { store_id: StoreId, address: String, reason: String },

    /// A single region could not be served.
    #[error("region {region_id}: {reason}")]
    Region { region_id: RegionId, reason: String },

    /// The regions PD returned for a key range do not tile it.
    #[error("regions of {range} are inconsistent: {reason}")]
    RegionScan { range: KeyRange, reason: String },

    /// A program this crate runs is not installed.
    #[error("the {program} binary was not found on PATH; {hint}")]
    MissingProgram { program: &'static str, hint: &'static str },

    /// A checkpoint claimed more than the truth or went backwards (the demo's check).
    #[error("checkpoint safety violated: {0}")]
    SafetyViolation(String),

    /// A bad flag, config file entry or argument.
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// An external storage (a task's backup destination) failed; `url` never holds credentials.
    #[error("external storage {url}: {reason}")]
    Storage { url: String, reason: String },

    /// A task's storage kind this advancer cannot write to.
    #[error("{backend} storage is not supported for the checkpoint copy (only local and s3 are)")]
    StorageUnsupported { backend: &'static str },

    /// A blocking operation hit its deadline.
    #[error("{0} timed out")]
    Timeout(String),

    /// The component was asked to stop while the operation was in flight.
    #[error("{0} was stopped")]
    Stopped(String),

    /// Another error, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Wraps the error with what the caller was doing.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context { context: context.into(), source: Box::new(self) }
    }

    /// The innermost error, skipping context layers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    pub fn rpc(call: &'static str, target: impl Into<String>, source: grpcio::Error) -> Error {
        Error::Rpc { call, target: target.into(), source: Box::new(source) }
    }

    /// The gRPC failure at the root, if any.
    pub fn grpc_source(&self) -> Option<&grpcio::Error> {
        match self.root() {
            Error::Rpc { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The gRPC status code, if the root cause is an RPC status.
    pub fn rpc_status(&self) -> Option<grpcio::RpcStatusCode> {
        match self.grpc_source()? {
            grpcio::Error::RpcFailure(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// `result.context("uploading checkpoint of task t1")?`
pub trait ResultExt<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.context(context))
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| e.context(f()))
    }
}
