//! The KV half of the synchronous etcd client: endpoint failover, deadlines, range, put,
//! delete and transactions.

use std::sync::Arc;
use std::time::Duration;

use grpcio::{CallOption, Channel, MetadataBuilder, RpcStatusCode};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    CompactionRequest, Compare, Compare_CompareResult, Compare_CompareTarget, DeleteRangeRequest, PutRequest,
    RangeRequest, RangeRequest_SortOrder, RangeRequest_SortTarget, RequestOp, ResponseOp_oneof_response, TxnRequest,
    TxnResponse,
};
use crate::proto::etcdserverpb_grpc::{KvClient, LeaseClient, WatchClient};
use crate::proto::mvccpb::KeyValue;
use crate::security::{grpc_env, Security};

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port` (or `http://host:port`) of every member; tried in order, rotating on failure.
    pub endpoints: Vec<String>,
    pub security: Security,
    /// How long to wait for a member to accept a connection before trying the next one.
    pub connect_timeout: Duration,
    /// Deadline of every unary request.
    pub request_timeout: Duration,
    /// How long a watch may hear nothing before it asks etcd for progress; after
    /// [`WATCH_SILENT_INTERVALS`] such intervals without any answer it is reopened on the
    /// next member (a member whose disk hangs keeps its connections open but answers nothing).
    pub watch_progress_interval: Duration,
}

/// Intervals of silence, progress requested at each, after which a watch is reopened elsewhere.
pub const WATCH_SILENT_INTERVALS: u32 = 3;

impl EtcdConfig {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            security: Security::insecure(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            watch_progress_interval: Duration::from_secs(5),
        }
    }
}

/// The three etcd services over one channel to the member in use.
#[derive(Clone)]
pub(crate) struct Connection {
    pub endpoint: String,
    pub kv: KvClient,
    pub watch: WatchClient,
    pub lease: LeaseClient,
}

struct Shared {
    config: EtcdConfig,
    /// Index of the member in use and its connection; `None` until first use or after a
    /// failure, so the next call dials afresh.
    current: Mutex<(usize, Option<Connection>)>,
}

/// A synchronous etcd v3 client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdClient {
    shared: Arc<Shared>,
}

/// The result of a range request.
#[derive(Debug, Clone, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Keys in the range, ignoring `limit`.
    pub count: i64,
    /// More keys exist beyond `limit`.
    pub more: bool,
    /// The store revision the answer was read at.
    pub revision: i64,
}

/// Which keys a request covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpan {
    Single(Vec<u8>),
    /// Every key that starts with the bytes.
    Prefix(Vec<u8>),
    /// `[start, end)`.
    Range(Vec<u8>, Vec<u8>),
}

impl KeySpan {
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        KeySpan::Single(key.into())
    }
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        KeySpan::Prefix(prefix.into())
    }

    /// etcd's `(key, range_end)` encoding of the span.
    pub fn to_wire(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            KeySpan::Single(k) => (k.clone(), Vec::new()),
            KeySpan::Prefix(p) => (p.clone(), prefix_end(p)),
            KeySpan::Range(s, e) => (s.clone(), e.clone()),
        }
    }
}

/// The smallest key greater than every key with this prefix (`"\0"` = to the end).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Options of a range request beyond the key span.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    pub limit: i64,
    pub revision: i64,
    pub keys_only: bool,
    pub count_only: bool,
    pub sort: Option<(RangeRequest_SortTarget, RangeRequest_SortOrder)>,
    pub max_create_revision: i64,
}

/// One condition of a transaction.
#[derive(Debug, Clone)]
pub struct Cmp(Compare);

impl Cmp {
    fn compare(key: &[u8], result: Compare_CompareResult, target: Compare_CompareTarget) -> Compare {
        let mut c = Compare::new();
        c.set_key(key.to_vec());
        c.set_result(result);
        c.set_target(target);
        c
    }
    pub fn value(key: impl AsRef<[u8]>, result: Compare_CompareResult, value: impl Into<Vec<u8>>) -> Self {
        let mut c = Self::compare(key.as_ref(), result, Compare_CompareTarget::VALUE);
        c.set_value(value.into());
        Cmp(c)
    }
    pub fn version(key: impl AsRef<[u8]>, result: Compare_CompareResult, version: i64) -> Self {
        let mut c = Self::compare(key.as_ref(), result, Compare_CompareTarget::VERSION);
        c.set_version(version);
        Cmp(c)
    }
    pub fn create_revision(key: impl AsRef<[u8]>, result: Compare_CompareResult, revision: i64) -> Self {
        let mut c = Self::compare(key.as_ref(), result, Compare_CompareTarget::CREATE);
        c.set_create_revision(revision);
        Cmp(c)
    }
    pub fn mod_revision(key: impl AsRef<[u8]>, result: Compare_CompareResult, revision: i64) -> Self {
        let mut c = Self::compare(key.as_ref(), result, Compare_CompareTarget::MOD);
        c.set_mod_revision(revision);
        Cmp(c)
    }
    /// True when the key does not exist (its create revision is 0).
    pub fn absent(key: impl AsRef<[u8]>) -> Self {
        Self::create_revision(key, Compare_CompareResult::EQUAL, 0)
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub struct TxnOp(RequestOp);

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        let mut op = RequestOp::new();
        op.set_request_put(put_request(key.into(), value.into(), lease));
        TxnOp(op)
    }
    pub fn delete(span: KeySpan) -> Self {
        let mut op = RequestOp::new();
        op.set_request_delete_range(delete_request(&span));
        TxnOp(op)
    }
    pub fn get(span: KeySpan, options: &GetOptions) -> Self {
        let mut op = RequestOp::new();
        op.set_request_range(range_request(&span, options));
        TxnOp(op)
    }
    /// A nested transaction, evaluated atomically with the outer one.
    pub fn txn(txn: Txn) -> Self {
        let mut op = RequestOp::new();
        op.set_request_txn(txn_request(txn));
        TxnOp(op)
    }
}

/// `if all(compares) { success } else { failure }`, atomically.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compares: Vec<Cmp>,
    success: Vec<TxnOp>,
    failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }
    pub fn when(mut self, compares: impl IntoIterator<Item = Cmp>) -> Self {
        self.compares.extend(compares);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// What a transaction did: which branch ran, and the results of its get operations and
/// nested transactions, each in order.
#[derive(Debug, Clone, Default)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
    pub ranges: Vec<RangeResult>,
    pub txns: Vec<TxnResult>,
}

fn txn_request(txn: Txn) -> TxnRequest {
    let mut req = TxnRequest::new();
    req.set_compare(txn.compares.into_iter().map(|c| c.0).collect());
    req.set_success(txn.success.into_iter().map(|o| o.0).collect());
    req.set_failure(txn.failure.into_iter().map(|o| o.0).collect());
    req
}

fn txn_result(mut resp: TxnResponse) -> TxnResult {
    let mut result =
        TxnResult { succeeded: resp.get_succeeded(), revision: resp.get_header().get_revision(), ..Default::default() };
    for mut op in resp.take_responses().into_iter() {
        match op.response.take() {
            Some(ResponseOp_oneof_response::response_range(r)) => result.ranges.push(range_result(r)),
            Some(ResponseOp_oneof_response::response_txn(t)) => result.txns.push(txn_result(t)),
            _ => {}
        }
    }
    result
}

fn range_request(span: &KeySpan, options: &GetOptions) -> RangeRequest {
    let (key, end) = span.to_wire();
    let mut req = RangeRequest::new();
    req.set_key(key);
    req.set_range_end(end);
    req.set_limit(options.limit);
    req.set_revision(options.revision);
    req.set_keys_only(options.keys_only);
    req.set_count_only(options.count_only);
    req.set_max_create_revision(options.max_create_revision);
    if let Some((target, order)) = options.sort {
        req.set_sort_target(target);
        req.set_sort_order(order);
    }
    req
}

fn put_request(key: Vec<u8>, value: Vec<u8>, lease: i64) -> PutRequest {
    let mut req = PutRequest::new();
    req.set_key(key);
    req.set_value(value);
    req.set_lease(lease);
    req
}

fn delete_request(span: &KeySpan) -> DeleteRangeRequest {
    let (key, end) = span.to_wire();
    let mut req = DeleteRangeRequest::new();
    req.set_key(key);
    req.set_range_end(end);
    req
}

fn range_result(mut resp: crate::proto::etcdserverpb::RangeResponse) -> RangeResult {
    RangeResult {
        kvs: resp.take_kvs().into_vec(),
        count: resp.get_count(),
        more: resp.get_more(),
        revision: resp.get_header().get_revision(),
    }
}

/// etcd's `WithRequireLeader`: a member without a raft leader refuses the stream, and closes
/// it when it loses its leader later, instead of keeping it open with nothing to say.
pub(crate) fn require_leader(option: CallOption) -> CallOption {
    let mut metadata = MetadataBuilder::with_capacity(1);
    // A constant lowercase ASCII key and value, which gRPC always accepts.
    metadata.add_str("hasleader", "true").expect("hasleader is a valid metadata key");
    option.headers(metadata.build())
}

/// Failures worth trying another member for: the member is down, unreachable or
/// restarting. Application errors are not retried.
fn is_member_failure(err: &grpcio::Error) -> bool {
    match err {
        grpcio::Error::RpcFailure(status) => {
            matches!(status.code(), RpcStatusCode::UNAVAILABLE | RpcStatusCode::DEADLINE_EXCEEDED)
        }
        grpcio::Error::RpcFinished(_) | grpcio::Error::RemoteStopped => true,
        _ => false,
    }
}

impl EtcdClient {
    /// Validates the endpoints; connections are made lazily by the first request so that a
    /// client can be built while etcd is still starting.
    pub fn new(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoint given".into()));
        }
        for endpoint in &config.endpoints {
            config.security.target(endpoint)?;
        }
        Ok(EtcdClient { shared: Arc::new(Shared { config, current: Mutex::new((0, None)) }) })
    }

    /// A client with default deadlines and no TLS.
    pub fn connect_plain(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Self> {
        Self::new(EtcdConfig::new(endpoints))
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.shared.config
    }

    pub(crate) fn request_option(&self) -> CallOption {
        CallOption::default().timeout(self.shared.config.request_timeout)
    }

    fn dial(&self, endpoint: &str) -> Result<Connection> {
        let config = &self.shared.config;
        let channel: Channel = config.security.channel(grpc_env(), endpoint, Duration::from_secs(10))?;
        if !futures_executor::block_on(channel.wait_for_connected(config.connect_timeout)) {
            return Err(Error::Etcd {
                endpoint: endpoint.to_string(),
                reason: format!(
                    "no connection within {:?}: {}",
                    config.connect_timeout,
                    config.security.diagnose(endpoint, config.connect_timeout)
                ),
            });
        }
        Ok(Connection {
            endpoint: endpoint.to_string(),
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        })
    }

    /// The connection to the member in use, dialing members in turn until one answers.
    pub(crate) fn connection(&self) -> Result<Connection> {
        let endpoints = &self.shared.config.endpoints;
        let mut current = self.shared.current.lock();
        if let Some(conn) = &current.1 {
            return Ok(conn.clone());
        }
        let mut last = String::new();
        for attempt in 0..endpoints.len() {
            let index = (current.0 + attempt) % endpoints.len();
            match self.dial(&endpoints[index]) {
                Ok(conn) => {
                    if attempt > 0 {
                        log::info!("etcd: switched to endpoint {}", endpoints[index]);
                    }
                    *current = (index, Some(conn.clone()));
                    return Ok(conn);
                }
                Err(e) => {
                    log::warn!("etcd: endpoint {} unusable: {e}", endpoints[index]);
                    last = e.to_string();
                }
            }
        }
        Err(Error::Unreachable { service: "etcd", endpoints: endpoints.join(","), last })
    }

    /// Forgets the member in use if it is still `endpoint`, so the next call moves on.
    pub(crate) fn mark_failed(&self, endpoint: &str) {
        let mut current = self.shared.current.lock();
        if current.1.as_ref().is_some_and(|c| c.endpoint == endpoint) {
            let next = (current.0 + 1) % self.shared.config.endpoints.len();
            *current = (next, None);
        }
    }

    /// Runs a unary call, moving to the next member when the one in use fails; every member
    /// gets one try.
    pub(crate) fn call<T>(
        &self,
        call: &'static str,
        f: impl Fn(&Connection, CallOption) -> grpcio::Result<T>,
    ) -> Result<T> {
        let attempts = self.shared.config.endpoints.len();
        let mut last_err = None;
        for _ in 0..attempts {
            let conn = self.connection()?;
            match f(&conn, self.request_option()) {
                Ok(resp) => return Ok(resp),
                Err(e) if is_member_failure(&e) => {
                    log::warn!("etcd {call} on {} failed, trying the next member: {e}", conn.endpoint);
                    self.mark_failed(&conn.endpoint);
                    last_err = Some(Error::rpc(call, conn.endpoint.clone(), e));
                }
                Err(e) => return Err(Error::rpc(call, conn.endpoint.clone(), e)),
            }
        }
        Err(last_err.expect("at least one endpoint"))
    }

    pub fn range(&self, span: KeySpan, options: &GetOptions) -> Result<RangeResult> {
        let req = range_request(&span, options);
        self.call("etcd Range", |c, opt| c.kv.range_opt(&req, opt)).map(range_result)
    }

    /// The value of one key, if it exists.
    pub fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>> {
        Ok(self.range(KeySpan::Single(key.into()), &GetOptions::default())?.kvs.pop())
    }

    /// Every key under `prefix`, read in pages at one revision so the result is a
    /// consistent snapshot however large it is. Returns the pairs and that revision.
    pub fn scan_prefix(&self, prefix: &[u8], page: i64) -> Result<(Vec<KeyValue>, i64)> {
        self.scan_prefix_at(prefix, page, 0)
    }

    /// [`Self::scan_prefix`] at a given revision (0 = the latest).
    pub fn scan_prefix_at(&self, prefix: &[u8], page: i64, revision: i64) -> Result<(Vec<KeyValue>, i64)> {
        let endpoints = self.shared.config.endpoints.join(",");
        scan_pages(&endpoints, prefix, revision, |span, revision| {
            self.range(span, &GetOptions { limit: page, revision, ..Default::default() })
        })
    }

    /// Writes a key; returns the revision of the write.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Result<i64> {
        let req = put_request(key.into(), value.into(), lease);
        Ok(self.call("etcd Put", |c, opt| c.kv.put_opt(&req, opt))?.get_header().get_revision())
    }

    /// Deletes the keys of `span`; returns how many were deleted.
    pub fn delete(&self, span: KeySpan) -> Result<i64> {
        let req = delete_request(&span);
        Ok(self.call("etcd DeleteRange", |c, opt| c.kv.delete_range_opt(&req, opt))?.get_deleted())
    }

    pub fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let req = txn_request(txn);
        self.call("etcd Txn", |c, opt| c.kv.txn_opt(&req, opt)).map(txn_result)
    }

    /// Compacts history up to `revision` (tests use it to exercise re-listing).
    pub fn compact(&self, revision: i64) -> Result<()> {
        let mut req = CompactionRequest::new();
        req.set_revision(revision);
        req.set_physical(true);
        self.call("etcd Compact", |c, opt| c.kv.compact_opt(&req, opt)).map(drop)
    }
}

/// Reads every key under `prefix` page by page with `fetch`. Each page must move forward
/// within the prefix: an answer that claims more keys without giving a later one would
/// otherwise be asked again forever.
fn scan_pages(
    endpoint: &str,
    prefix: &[u8],
    mut revision: i64,
    mut fetch: impl FnMut(KeySpan, i64) -> Result<RangeResult>,
) -> Result<(Vec<KeyValue>, i64)> {
    let end = prefix_end(prefix);
    let mut out: Vec<KeyValue> = Vec::new();
    let mut start = prefix.to_vec();
    loop {
        let result = fetch(KeySpan::Range(start.clone(), end.clone()), revision)?;
        revision = result.revision;
        let outside = result.kvs.iter().find(|kv| kv.get_key() < start.as_slice() || !kv.get_key().starts_with(prefix));
        if let Some(kv) = outside {
            let reason = format!(
                "scanning {}: key {} is outside the range asked",
                String::from_utf8_lossy(prefix),
                String::from_utf8_lossy(kv.get_key())
            );
            return Err(Error::Etcd { endpoint: endpoint.to_string(), reason });
        }
        let more = result.more;
        let last = result.kvs.last().map(|kv| kv.get_key().to_vec());
        out.extend(result.kvs);
        match (more, last) {
            (false, _) => return Ok((out, revision)),
            (true, Some(mut last)) => {
                last.push(0);
                start = last;
            }
            (true, None) => {
                let reason = format!("scanning {}: more keys announced, none given", String::from_utf8_lossy(prefix));
                return Err(Error::Etcd { endpoint: endpoint.to_string(), reason });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str) -> KeyValue {
        let mut kv = KeyValue::default();
        kv.set_key(key.as_bytes().to_vec());
        kv
    }

    fn page(keys: &[&str], more: bool) -> RangeResult {
        RangeResult { kvs: keys.iter().map(|k| kv(k)).collect(), count: 0, more, revision: 5 }
    }

    #[test]
    fn a_scan_that_does_not_move_forward_ends_in_an_error() {
        // A malformed answer repeated forever: the old scan asked for the same page again
        // without end. Asked at most a few times here.
        let mut asked = 0;
        let mut stuck = |_: KeySpan, _: i64| {
            asked += 1;
            assert!(asked < 10, "the scan loops");
            Ok(page(&[], true))
        };
        let err = scan_pages("e", b"/p/", 0, &mut stuck).unwrap_err().to_string();
        assert!(err.contains("/p/") && err.contains("none given"), "{err}");

        let mut backwards = |span: KeySpan, _: i64| {
            let KeySpan::Range(start, _) = span else { unreachable!() };
            Ok(if start == b"/p/" { page(&["/p/b"], true) } else { page(&["/p/a"], true) })
        };
        assert!(scan_pages("e", b"/p/", 0, &mut backwards).unwrap_err().to_string().contains("/p/a"));
        let mut foreign = |_: KeySpan, _: i64| Ok(page(&["/q"], false));
        assert!(scan_pages("e", b"/p/", 0, &mut foreign).is_err());

        let mut pages = vec![page(&["/p/c"], false), page(&["/p/a", "/p/b"], true)];
        let (kvs, revision) = scan_pages("e", b"/p/", 0, |_, _| Ok(pages.pop().unwrap())).unwrap();
        assert_eq!((kvs.len(), revision), (3, 5));
    }

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/x/t1/"), b"/x/t10".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn bad_endpoints_are_named() {
        let err = EtcdClient::connect_plain(["127.0.0.1:2379", "nonsense"]).err().unwrap().to_string();
        assert!(err.contains("nonsense"), "{err}");
        assert!(EtcdClient::connect_plain(Vec::<String>::new()).is_err());
    }
}
