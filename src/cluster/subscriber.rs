//! The push side of checkpoint collection (upstream's `FlushSubscriber`, tidb
//! `br/pkg/streamhelper/flush_subscriber.go`): one
//! SubscribeFlushEvent stream per store, each read by its own thread, all feeding one bounded
//! channel of flush events: one [`FlushBatch`] per stream message, since handing events over
//! one at a time cost a thread wake-up each (most of the advancer's CPU at 10^6 regions).
//!
//! The stream is lossy upstream (TiKV drops batches when its queue is full), so events are
//! only ever hints: each says what one store flushed for one region, nothing more, and the
//! advancer keeps polling whatever events leave behind. Failed streams are reported through
//! [`FlushSubscriber::pending_errors`] and reopened by [`FlushSubscriber::handle_errors`]
//! with backoff; a store without the service (`UNIMPLEMENTED`) stays reported until it
//! restarts.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::poll_fn;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender};
use futures_util::Stream;
use grpcio::{
    CallOption, ClientSStreamReceiver, GrpcSlice, Marshaller, MessageReader, Method, MethodType, RpcStatusCode,
};
use log::{info, warn};
use parking_lot::Mutex;

use super::{ClusterMeta, LogBackupService, StoreInfo};
use crate::codec::decode_boundary_into;
use crate::error::{Error, Result, ResultExt};
use crate::proto::logbackuppb::SubscribeFlushEventRequest;
use crate::types::{DisplayKey, KeyRange, StoreId, Ts};
use crate::worker::{block_on_by, catch_panic, StopToken, Worker};

/// TiKV puts at most this many events in one `SubscribeFlushEventResponse` (wire-spec 4.2):
/// a flush or snapshot is split into messages this full, so a message with fewer ends it.
pub const EVENTS_PER_MESSAGE: usize = 1024;

#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    /// Bound of the event channel in messages (each up to TiKV's 1024 events); stream
    /// threads wait when it is full.
    pub channel_capacity: usize,
    /// A stream with no message for this long is reopened: TiKV sends every flush, at least
    /// every few minutes, so silence means a stream that is stuck.
    pub idle_timeout: Duration,
    /// Wait before reopening a stream that failed again without delivering anything;
    /// doubles per such failure up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// Streams (each one thread) open at once, whatever the store count. Stores beyond it
    /// are reported as not subscribed, which makes the advancer poll more often: events are
    /// only hints, so this costs freshness, never safety.
    pub max_streams: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            channel_capacity: 64,
            idle_timeout: Duration::from_secs(600),
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(60),
            max_streams: 64,
        }
    }
}

/// The flushed checkpoints of regions as one store reported them in one stream message,
/// with every key decoded to raw bytes into one shared buffer (two allocations per message,
/// not two per event).
///
/// An event that continues the one before it (the same ts, starting where that one ends,
/// both non-empty) is joined to it: raising the joined range raises exactly the same keys,
/// and where the frontier joined the two regions' pieces at the last flush it finds them as
/// one piece again, instead of splitting that piece and joining it once more (a store that
/// sends neighbouring regions one after the other, as the sim does; at 10^6 regions the
/// split and the join cost more than the rest of such an event's merge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushBatch {
    pub store: StoreId,
    /// Every event's start key then end key, back to back.
    keys: Vec<u8>,
    events: Vec<EventAt>,
    /// The regions reported, joined or not.
    regions: usize,
}

/// One (possibly joined) event of a [`FlushBatch`]: its keys are `keys[start..mid]` and
/// `keys[mid..end]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EventAt {
    start: usize,
    mid: usize,
    end: usize,
    ts: Ts,
    /// The regions reported in it.
    regions: usize,
}

impl FlushBatch {
    pub fn new(store: StoreId) -> Self {
        FlushBatch { store, keys: Vec::new(), events: Vec::new(), regions: 0 }
    }

    /// Adds one region's raw range and ts.
    pub fn push(&mut self, range: &KeyRange, ts: Ts) {
        let start = self.keys.len();
        self.keys.extend_from_slice(&range.start);
        let mid = self.keys.len();
        self.keys.extend_from_slice(&range.end);
        self.add(start, mid, ts);
    }

    /// Decodes one event's memcomparable keys into the batch; on an error nothing is added
    /// and the error names the key.
    fn push_encoded(&mut self, start_key: &[u8], end_key: &[u8], ts: Ts) -> std::result::Result<(), String> {
        let start = self.keys.len();
        decode_boundary_into(start_key, &mut self.keys)
            .map_err(|e| format!("start key {} is not encoded ({e})", DisplayKey(start_key)))?;
        let mid = self.keys.len();
        if let Err(e) = decode_boundary_into(end_key, &mut self.keys) {
            self.keys.truncate(start);
            return Err(format!("end key {} is not encoded ({e})", DisplayKey(end_key)));
        }
        self.add(start, mid, ts);
        Ok(())
    }

    /// Records the event whose keys were just written at `keys[start..mid]` and
    /// `keys[mid..]`, joined to the previous one when it continues it.
    fn add(&mut self, start: usize, mid: usize, ts: Ts) {
        self.regions += 1;
        let end = self.keys.len();
        if let Some(last) = self.events.last_mut() {
            let keys = &self.keys;
            let continues = last.ts == ts
                // An empty end is +inf, an empty start -inf: they never meet.
                && last.mid < last.end
                && keys[last.mid..last.end] == keys[start..mid]
                && covers_keys(&keys[last.start..last.mid], &keys[last.mid..last.end])
                && covers_keys(&keys[start..mid], &keys[mid..end]);
            if continues {
                self.keys.copy_within(mid..end, last.mid);
                self.keys.truncate(last.mid + (end - mid));
                last.end = self.keys.len();
                last.regions += 1;
                return;
            }
        }
        self.events.push(EventAt { start, mid, end, ts, regions: 1 });
    }

    /// The regions reported (a joined event counts each of its regions).
    pub fn len(&self) -> usize {
        self.regions
    }

    pub fn is_empty(&self) -> bool {
        self.regions == 0
    }

    /// The regions reported with a ts above `ts`.
    pub fn count_above(&self, ts: Ts) -> usize {
        self.events.iter().filter(|e| e.ts > ts).map(|e| e.regions).sum()
    }

    /// Each event's raw start key, raw end key and ts, in the order the store sent them,
    /// neighbours joined (see [`FlushBatch`]).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], Ts)> + Clone + '_ {
        self.events.iter().map(|e| (&self.keys[e.start..e.mid], &self.keys[e.mid..e.end], e.ts))
    }
}

/// Whether `[start, end)` holds any key (an empty end is +inf).
fn covers_keys(start: &[u8], end: &[u8]) -> bool {
    end.is_empty() || start < end
}

pub struct FlushSubscriber {
    meta: Arc<dyn ClusterMeta>,
    service: Arc<dyn LogBackupService>,
    config: SubscriberConfig,
    subscriptions: BTreeMap<StoreId, Subscription>,
    events_tx: Sender<FlushBatch>,
    events_rx: Receiver<FlushBatch>,
    /// Stores without a stream for want of a slot, as last logged.
    left_out: usize,
}

impl FlushSubscriber {
    /// Subscribes to nothing until [`FlushSubscriber::update_store_topology`].
    pub fn new(meta: Arc<dyn ClusterMeta>, service: Arc<dyn LogBackupService>, config: SubscriberConfig) -> Self {
        let (events_tx, events_rx) = bounded(config.channel_capacity);
        FlushSubscriber { meta, service, config, subscriptions: BTreeMap::new(), events_tx, events_rx, left_out: 0 }
    }

    /// The flush events of every store, one batch per stream message, in arrival order per
    /// store.
    pub fn events(&self) -> &Receiver<FlushBatch> {
        &self.events_rx
    }

    /// Subscribes to new stores, re-subscribes to restarted or moved ones, and drops the
    /// subscriptions and connections of stores that are gone.
    pub fn update_store_topology(&mut self) -> Result<()> {
        let stores = self.meta.stores().context("failed to get store list")?;
        let change = diff_topology(self.subscriptions.values().map(|s| &s.store), &stores);
        for id in change.removed {
            if let Some(subscription) = self.subscriptions.remove(&id) {
                info!("Removing subscription. store={id}");
                subscription.close();
            }
            self.service.clear_cache(id);
        }
        for store in change.restarted {
            // The old connection may point at the old address or process.
            self.service.clear_cache(store.id);
            let Some(subscription) = self.subscriptions.get_mut(&store.id) else { continue };
            subscription.store = store;
            subscription.fruitless = 0;
            if !subscription.waits_for_a_slot() {
                subscription.connect(&self.service, &self.events_tx, &self.config);
            }
        }
        for store in change.added {
            let subscription = Subscription::waiting_for_a_slot(store, self.config.max_streams);
            self.subscriptions.insert(subscription.store.id, subscription);
        }
        self.fill_stream_slots();
        Ok(())
    }

    /// Opens streams for stores waiting for one, as long as fewer than `max_streams` are open.
    fn fill_stream_slots(&mut self) {
        let mut open = self.subscriptions.values().filter(|s| !s.waits_for_a_slot()).count();
        let mut left_out = 0;
        for subscription in self.subscriptions.values_mut().filter(|s| s.waits_for_a_slot()) {
            if open < self.config.max_streams {
                subscription.connect(&self.service, &self.events_tx, &self.config);
                open += 1;
            } else {
                left_out += 1;
            }
        }
        // Logged when it changes, not at every topology update.
        if std::mem::replace(&mut self.left_out, left_out) != left_out && left_out > 0 {
            info!(
                "{left_out} stores have no flush subscription: at most {} streams are open; their regions are polled",
                self.config.max_streams
            );
        }
    }

    /// The stores of the last topology update.
    pub fn stores(&self) -> impl Iterator<Item = StoreId> + '_ {
        self.subscriptions.keys().copied()
    }

    /// Reopens failed streams whose backoff has passed. Stores without the service stay
    /// failed until they restart.
    pub fn handle_errors(&mut self) {
        let now = Instant::now();
        for subscription in self.subscriptions.values_mut() {
            if subscription.retry_due(now, &self.config) {
                subscription.connect(&self.service, &self.events_tx, &self.config);
            }
        }
    }

    /// The stores whose stream is down, each with an error saying why.
    pub fn store_errors(&self) -> Vec<(StoreId, Error)> {
        self.subscriptions
            .values()
            .filter_map(|s| {
                let status = s.status.lock();
                let failure = status.failure.as_ref()?;
                let error = Error::Store {
                    store_id: s.store.id,
                    address: s.store.address.clone(),
                    reason: failure.message.clone(),
                };
                Some((s.store.id, error))
            })
            .collect()
    }

    /// Each subscribed store and whether its stream is up (running and not failed).
    pub fn store_states(&self) -> Vec<(StoreId, bool)> {
        self.subscriptions
            .values()
            .map(|s| (s.store.id, s.stream.is_some() && s.status.lock().failure.is_none()))
            .collect()
    }

    /// Events per message received from each store since the last call (upstream's
    /// `region_checkpoint_event` observations).
    pub fn take_message_sizes(&self) -> Vec<(StoreId, Vec<usize>)> {
        self.subscriptions.values().map(|s| (s.store.id, std::mem::take(&mut s.status.lock().message_sizes))).collect()
    }

    /// `None` when every stream is up; else the failures, so that the advancer polls more.
    pub fn pending_errors(&self) -> Option<Error> {
        let mut errors = self.store_errors();
        if errors.len() <= 1 {
            return errors.pop().map(|(_, e)| e);
        }
        let stores: Vec<String> = errors.iter().map(|(id, _)| id.to_string()).collect();
        let context =
            format!("subscriptions of {} stores failed (stores {}); the first", errors.len(), stores.join(", "));
        Some(errors.swap_remove(0).1.context(context))
    }

    /// Closes every subscription; the next topology update opens them again.
    pub fn clear(&mut self) {
        info!("Clearing {} flush subscriptions.", self.subscriptions.len());
        let mut subscriptions = std::mem::take(&mut self.subscriptions);
        // Signal every thread before joining any, so they wind down together.
        for subscription in subscriptions.values_mut() {
            if let Some(stream) = &mut subscription.stream {
                stream.signal();
            }
        }
        for subscription in subscriptions.into_values() {
            subscription.close();
        }
    }
}

impl Drop for FlushSubscriber {
    fn drop(&mut self) {
        self.clear();
    }
}

struct Subscription {
    store: StoreInfo,
    stream: Option<Worker>,
    /// Shared with the current stream thread; a fresh one per stream.
    status: Arc<Mutex<StreamStatus>>,
    /// Consecutive streams that failed before delivering anything: drives the backoff.
    fruitless: u32,
}

#[derive(Default)]
struct StreamStatus {
    messages: u64,
    /// Events per message since the last [`FlushSubscriber::take_message_sizes`]; the
    /// oldest are dropped past `MESSAGE_SIZES_KEPT`.
    message_sizes: Vec<usize>,
    failure: Option<Failure>,
}

/// Message sizes kept per store between two reads: a tick's worth many times over.
const MESSAGE_SIZES_KEPT: usize = 1024;

struct Failure {
    message: String,
    retryable: bool,
    at: Instant,
}

/// The failure of a store that waits for one of the `max_streams` slots.
const NO_SLOT: &str = "not subscribed";

impl Subscription {
    /// A store with no stream yet, reported as failing until it gets one.
    fn waiting_for_a_slot(store: StoreInfo, max_streams: usize) -> Self {
        let failure = Failure {
            message: format!("{NO_SLOT}: more stores than the {max_streams} streams allowed; its regions are polled"),
            retryable: false,
            at: Instant::now(),
        };
        let status = Arc::new(Mutex::new(StreamStatus { failure: Some(failure), ..StreamStatus::default() }));
        Subscription { store, stream: None, status, fruitless: 0 }
    }

    fn waits_for_a_slot(&self) -> bool {
        self.stream.is_none() && self.status.lock().failure.as_ref().is_some_and(|f| f.message.starts_with(NO_SLOT))
    }

    /// Opens a new stream in a new thread, after closing the current one.
    fn connect(&mut self, service: &Arc<dyn LogBackupService>, events: &Sender<FlushBatch>, config: &SubscriberConfig) {
        self.stop_stream();
        info!(
            "Adding subscription. store={} address={} boot={}",
            self.store.id, self.store.address, self.store.boot_at
        );
        self.status = Arc::default();
        let (store, service, events) = (self.store.clone(), service.clone(), events.clone());
        let (status, idle_timeout) = (self.status.clone(), config.idle_timeout);
        let spawned = Worker::spawn(format!("sh-sub-{}", self.store.id), move |stop| {
            Listener { store, service, events, stop, status, idle_timeout }.run()
        });
        match spawned {
            Ok(worker) => self.stream = Some(worker),
            Err(e) => {
                self.status.lock().failure = Some(Failure {
                    message: format!("cannot start a thread: {e}"),
                    retryable: true,
                    at: Instant::now(),
                })
            }
        }
    }

    fn stop_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Panics are caught and recorded inside the thread.
            stream.join();
        }
    }

    fn close(mut self) {
        self.stop_stream();
    }

    /// Whether the failed stream should be reopened now.
    fn retry_due(&mut self, now: Instant, config: &SubscriberConfig) -> bool {
        let status = self.status.lock();
        let Some(failure) = status.failure.as_ref().filter(|f| f.retryable) else {
            return false;
        };
        let streak = if status.messages > 0 { 0 } else { self.fruitless };
        let delay = backoff(streak, config);
        if now < failure.at + delay {
            return false;
        }
        warn!("Meet error, re-subscribing. store={} after={delay:?} error: {}", self.store.id, failure.message);
        drop(status);
        self.fruitless = streak + 1;
        true
    }
}

/// No wait after a stream that delivered something; then doubling from `retry_backoff`.
fn backoff(fruitless_streak: u32, config: &SubscriberConfig) -> Duration {
    match fruitless_streak {
        0 => Duration::ZERO,
        n => config.retry_backoff.saturating_mul(1 << (n - 1).min(16)).min(config.max_retry_backoff),
    }
}

#[derive(Debug, Default, PartialEq)]
struct TopologyChange {
    added: Vec<StoreInfo>,
    /// Known stores with a new start time or address.
    restarted: Vec<StoreInfo>,
    removed: Vec<StoreId>,
}

fn diff_topology<'a>(known: impl IntoIterator<Item = &'a StoreInfo>, listed: &[StoreInfo]) -> TopologyChange {
    let known: HashMap<StoreId, &StoreInfo> = known.into_iter().map(|s| (s.id, s)).collect();
    let mut change = TopologyChange::default();
    for store in listed {
        match known.get(&store.id) {
            None => change.added.push(store.clone()),
            Some(old) if old.boot_at != store.boot_at || old.address != store.address => {
                change.restarted.push(store.clone())
            }
            Some(_) => {}
        }
    }
    let listed: HashSet<StoreId> = listed.iter().map(|s| s.id).collect();
    change.removed = known.keys().filter(|id| !listed.contains(id)).copied().collect();
    change.removed.sort_unstable();
    change
}

/// The state of one stream thread.
struct Listener {
    store: StoreInfo,
    service: Arc<dyn LogBackupService>,
    events: Sender<FlushBatch>,
    stop: StopToken,
    status: Arc<Mutex<StreamStatus>>,
    idle_timeout: Duration,
}

impl Listener {
    fn run(self) {
        info!("Listen starting. store={}", self.store.id);
        let failure = match catch_panic(|| self.listen()) {
            Ok(Ok(())) => {
                info!("Listen stopped on request. store={}", self.store.id);
                return;
            }
            Ok(Err(e)) => e,
            Err(panic) => self.store_error(format!("subscription thread panicked: {panic}")),
        };
        let retryable = failure.rpc_status() != Some(RpcStatusCode::UNIMPLEMENTED);
        if retryable {
            warn!("Listen stopped. store={} error: {failure}", self.store.id);
            // The store may have moved or restarted: dial it afresh next time.
            self.service.clear_cache(self.store.id);
        } else {
            warn!(
                "store {} has no log-backup flush subscription (log backup disabled or an old TiKV); its regions are polled instead: {failure}",
                self.store.id
            );
        }
        self.status.lock().failure = Some(Failure { message: failure.to_string(), retryable, at: Instant::now() });
    }

    /// Returns `Ok` only when asked to stop.
    fn listen(&self) -> Result<()> {
        let client = self.service.client(self.store.id).context("failed to get log backup client")?;
        let mut req = SubscribeFlushEventRequest::default();
        req.set_client_id(client_id(self.store.id));
        let mut stream = (client.client)
            .server_streaming(&SUBSCRIBE_FLUSH_EVENT, &req, CallOption::default())
            .map_err(|source| self.rpc_error(source))?;
        let outcome = self.receive(&mut stream);
        // Ends the call on the server too, whatever ended the loop.
        stream.cancel();
        outcome
    }

    fn receive(&self, stream: &mut ClientSStreamReceiver<FlushMessage>) -> Result<()> {
        loop {
            let message = match next_before(stream, &self.stop, Instant::now() + self.idle_timeout) {
                Next::Stopped => return Ok(()),
                Next::Idle => return Err(self.store_error(format!("no flush event for {:?}", self.idle_timeout))),
                Next::Item(None) => return Err(self.store_error("the store ended the subscription stream".into())),
                Next::Item(Some(Err(e))) => return Err(self.rpc_error(e)),
                Next::Item(Some(Ok(message))) => message,
            };
            {
                let mut status = self.status.lock();
                status.messages += 1;
                if status.message_sizes.len() == MESSAGE_SIZES_KEPT {
                    status.message_sizes.remove(0);
                }
                status.message_sizes.push(message.events);
            }
            let batch = message.into_batch(self.store.id);
            if !batch.is_empty() && !self.stop.send(&self.events, batch) {
                return Ok(());
            }
        }
    }

    fn store_error(&self, reason: String) -> Error {
        Error::Store { store_id: self.store.id, address: self.store.address.clone(), reason }
    }

    fn rpc_error(&self, source: grpcio::Error) -> Error {
        Error::rpc("SubscribeFlushEvent", format!("store {} ({})", self.store.id, self.store.address), source)
    }
}

/// TiKV only logs the client id; it tells our streams apart in its log.
fn client_id(store: StoreId) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("streamhelper-{}-store{store}-{nanos:x}", std::process::id())
}

/// `SubscribeFlushEvent` with its responses read by [`decode_flush_message`] instead of
/// protobuf's generated code (same path, same bytes on the wire).
const SUBSCRIBE_FLUSH_EVENT: Method<SubscribeFlushEventRequest, FlushMessage> = Method {
    ty: MethodType::ServerStreaming,
    name: "/logbackup.LogBackup/SubscribeFlushEvent",
    req_mar: Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de },
    resp_mar: Marshaller { ser: never_sent, de: decode_flush_message },
};

/// The client only receives these; gRPC's method table wants a serializer all the same.
fn never_sent(_: &FlushMessage, _: &mut GrpcSlice) -> grpcio::Result<()> {
    Err(grpcio::Error::Codec("a flush message is only ever received".into()))
}

/// One `SubscribeFlushEventResponse`, decoded straight from its wire bytes into a
/// [`FlushBatch`] (the store is filled in by the caller): each key is decoded once into the
/// batch's buffer, and no message struct is built (the generated code allocates a struct
/// and two vectors per event: most of the stream threads' CPU at 10^6 regions).
#[derive(Debug)]
struct FlushMessage {
    batch: FlushBatch,
    /// Events in the message, decodable or not.
    events: usize,
    /// Events whose keys did not decode, with the first one's error.
    skipped: Option<(usize, String)>,
}

impl FlushMessage {
    /// The batch of `store`, after logging (once per message) the events it skipped.
    fn into_batch(mut self, store: StoreId) -> FlushBatch {
        if let Some((count, first)) = self.skipped {
            warn!(
                "store {store}: skipping {count} of {} flush events whose keys are not encoded; the first: {first}",
                self.events
            );
        }
        self.batch.store = store;
        self.batch
    }
}

fn decode_flush_message(mut reader: MessageReader) -> grpcio::Result<FlushMessage> {
    thread_local! {
        /// The message's bytes, in one piece; kept for the thread's next message.
        static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BYTES.with_borrow_mut(|bytes| {
        bytes.clear();
        reader.read_to_end(bytes).map_err(|e| grpcio::Error::Codec(e.into()))?;
        parse_flush_message(bytes)
            .map_err(|e| grpcio::Error::Codec(format!("bad SubscribeFlushEventResponse: {e}").into()))
    })
}

/// Reads `SubscribeFlushEventResponse { repeated FlushEvent events = 1; }` and each
/// `FlushEvent { bytes start_key = 1; bytes end_key = 2; uint64 checkpoint = 3; }` as
/// protobuf does: fields in any order, the last of a repeated singular field wins, unknown
/// fields skipped.
fn parse_flush_message(mut bytes: &[u8]) -> std::result::Result<FlushMessage, String> {
    // Decoded keys are shorter than encoded ones: one allocation for them all.
    let mut message = FlushMessage { batch: FlushBatch::new(0), events: 0, skipped: None };
    message.batch.keys.reserve_exact(bytes.len());
    while !bytes.is_empty() {
        let (1, Field::Bytes(mut event)) = read_field(&mut bytes)? else { continue };
        let (mut start, mut end, mut ts) = (&[][..], &[][..], 0);
        while !event.is_empty() {
            match read_field(&mut event)? {
                (1, Field::Bytes(key)) => start = key,
                (2, Field::Bytes(key)) => end = key,
                (3, Field::Varint(value)) => ts = value,
                _ => {}
            }
        }
        message.events += 1;
        if let Err(e) = message.batch.push_encoded(start, end, ts) {
            message.skipped.get_or_insert((0, e)).0 += 1;
        }
    }
    // Batches wait for the next tick: they keep no slack.
    message.batch.keys.shrink_to_fit();
    message.batch.events.shrink_to_fit();
    Ok(message)
}

/// A protobuf field's value, as far as these messages need it.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Reads one field (number, value) off the front of `bytes`.
fn read_field<'a>(bytes: &mut &'a [u8]) -> std::result::Result<(u64, Field<'a>), String> {
    let tag = read_varint(bytes)?;
    let field = match tag & 7 {
        0 => Field::Varint(read_varint(bytes)?),
        1 => {
            take(bytes, 8)?;
            Field::Fixed
        }
        2 => {
            let len = usize::try_from(read_varint(bytes)?).map_err(|_| "length overflows".to_string())?;
            Field::Bytes(take(bytes, len)?)
        }
        5 => {
            take(bytes, 4)?;
            Field::Fixed
        }
        wire_type => return Err(format!("field {} has wire type {wire_type}", tag >> 3)),
    };
    Ok((tag >> 3, field))
}

fn take<'a>(bytes: &mut &'a [u8], len: usize) -> std::result::Result<&'a [u8], String> {
    if bytes.len() < len {
        return Err(format!("a field of {len} bytes with {} left", bytes.len()));
    }
    let (taken, rest) = bytes.split_at(len);
    *bytes = rest;
    Ok(taken)
}

fn read_varint(bytes: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Ok(value);
        }
    }
    Err("a truncated or overlong varint".into())
}

enum Next<T> {
    Item(Option<T>),
    Stopped,
    Idle,
}

/// The next stream item, unless a stop is asked for (the stopper unparks this thread) or
/// `deadline` passes first.
fn next_before<S: Stream + Unpin>(stream: &mut S, stop: &StopToken, deadline: Instant) -> Next<S::Item> {
    let next = poll_fn(|cx| match Pin::new(&mut *stream).poll_next(cx) {
        Poll::Ready(item) => Poll::Ready(Next::Item(item)),
        Poll::Pending if stop.is_stopped() => Poll::Ready(Next::Stopped),
        Poll::Pending => Poll::Pending,
    });
    block_on_by(next, deadline).unwrap_or(Next::Idle)
}

#[cfg(test)]
mod tests {
    use std::thread;

    use futures_util::stream;

    use super::*;
    use crate::cluster::testing::{FixedDialer, MemMeta};
    use crate::codec::encode_bytes;
    use crate::proto::logbackuppb::{self, SubscribeFlushEventResponse};
    use crate::spans::SpanFrontier;
    use crate::testing::wait_until;
    use protobuf::Message;

    fn store(id: StoreId, boot_at: i64) -> StoreInfo {
        StoreInfo { id, address: format!("127.0.0.1:{}", 20160 + id), boot_at }
    }

    #[test]
    fn topology_changes_are_new_restarted_moved_and_removed_stores() {
        let known = [store(1, 10), store(2, 10), store(3, 10), store(4, 10)];
        let mut moved = store(3, 10);
        moved.address = "127.0.0.1:30000".into();
        let listed = [store(1, 10), store(2, 11), moved.clone(), store(5, 10)];
        assert_eq!(
            diff_topology(&known, &listed),
            TopologyChange { added: vec![store(5, 10)], restarted: vec![store(2, 11), moved], removed: vec![4] }
        );
        assert_eq!(diff_topology(&known, &known), TopologyChange::default());
    }

    fn event(start: Vec<u8>, end: Vec<u8>, ts: Ts) -> logbackuppb::FlushEvent {
        let mut event = logbackuppb::FlushEvent::default();
        event.set_start_key(start);
        event.set_end_key(end);
        event.set_checkpoint(ts);
        event
    }

    fn wire(events: Vec<logbackuppb::FlushEvent>) -> Vec<u8> {
        let mut message = SubscribeFlushEventResponse::default();
        message.set_events(events.into());
        message.write_to_bytes().unwrap()
    }

    #[test]
    fn a_message_decodes_to_one_batch_of_raw_ranges_without_its_undecodable_events() {
        let bytes = wire(vec![
            event(encode_bytes(b""), encode_bytes(b"t1_r"), 97),
            event(encode_bytes(b"t1_r"), b"raw-end".to_vec(), 98),
            event(b"raw-start".to_vec(), Vec::new(), 99),
            event(encode_bytes(b"t1_r"), Vec::new(), 100),
        ]);
        let message = parse_flush_message(&bytes).unwrap();
        assert_eq!(message.events, 4);
        let (count, first) = message.skipped.clone().unwrap();
        assert_eq!(count, 2);
        assert!(first.contains("end key raw-end is not encoded"), "{first}");
        let batch = message.into_batch(3);
        assert_eq!(batch.store, 3);
        let events: Vec<_> = batch.iter().collect();
        assert_eq!(events, vec![(&b""[..], &b"t1_r"[..], 97), (&b"t1_r"[..], &b""[..], 100)]);
        let mut pushed = FlushBatch::new(3);
        pushed.push(&KeyRange::new("", "t1_r"), 97);
        pushed.push(&KeyRange::new("t1_r", ""), 100);
        assert_eq!(batch, pushed, "a skipped event leaves no bytes behind");
        assert!(parse_flush_message(&[]).unwrap().batch.is_empty());
    }

    #[test]
    fn an_event_continuing_the_previous_one_at_the_same_ts_is_joined_to_it() {
        let mut batch = FlushBatch::new(1);
        for (start, end, ts) in [
            ("a", "b", 5),
            ("b", "c", 5),
            ("c", "d", 5),
            ("d", "e", 6), // another ts
            ("f", "g", 6), // a gap before it
            ("g", "", 6),  // ends at +inf ...
            ("", "h", 6),  // ... and this starts at -inf
            ("h", "h", 6), // empty
            ("h", "i", 6),
        ] {
            batch.push(&KeyRange::new(start, end), ts);
        }
        let events: Vec<_> = batch.iter().collect();
        let expected: Vec<(&[u8], &[u8], Ts)> =
            vec![(b"a", b"d", 5), (b"d", b"e", 6), (b"f", b"", 6), (b"", b"h", 6), (b"h", b"h", 6), (b"h", b"i", 6)];
        assert_eq!(events, expected);
        assert_eq!(batch.len(), 9, "every region counts, joined or not");
        assert_eq!(batch.count_above(5), 6);
        assert_eq!(batch.count_above(4), 9);
    }

    /// Merging a batch's joined events leaves every frontier as merging the regions one by
    /// one would: random chains of neighbours with a few values, some of them empty or
    /// out of order, into frontiers whose pieces were joined or split by earlier flushes.
    #[test]
    fn a_batch_with_joined_events_merges_as_its_regions_one_by_one() {
        let mut rng = crate::rng::Rng::new(6);
        let key = |n: u64| format!("k{n:03}").into_bytes();
        for _ in 0..300 {
            let task = [KeyRange::new(key(10), key(80)), KeyRange::new(key(90), Vec::new())];
            let mut joined = SpanFrontier::new(&task, 1);
            let mut one_by_one = SpanFrontier::new(&task, 1);
            for _ in 0..4 {
                let mut batch = FlushBatch::new(1);
                let mut regions = Vec::new();
                let mut at = rng.below(20);
                for _ in 0..rng.below(30) {
                    let next = if rng.below(8) == 0 { at.saturating_sub(rng.below(3)) } else { at + 1 + rng.below(4) };
                    let end = if next >= 100 { Vec::new() } else { key(next) };
                    let range = KeyRange::new(key(at), end);
                    let ts = 2 + rng.below(3);
                    batch.push(&range, ts);
                    regions.push((range, ts));
                    if next >= 100 {
                        break;
                    }
                    at = if rng.below(6) == 0 { rng.below(100) } else { next };
                }
                joined.merge_batch(batch.iter());
                for (range, ts) in &regions {
                    one_by_one.merge(range, *ts);
                }
                assert_eq!(batch.len(), regions.len());
                assert_eq!(joined.snapshot(), one_by_one.snapshot(), "{regions:?}");
            }
        }
    }

    /// Random messages as TiKV's protobuf writes them, with fields of every wire type this
    /// parser does not know spliced in (as a newer TiKV could send), and fields repeated:
    /// the batch is what protobuf's own parser reads, event by event.
    #[test]
    fn messages_parse_as_protobuf_reads_them() {
        let mut rng = crate::rng::Rng::new(14);
        // Unknown fields: 4 as a varint, 5 as fixed64, 6 as bytes, 7 as fixed32.
        let unknown: [&[u8]; 4] =
            [&[0x20, 0x96, 0x01], &[0x29, 1, 2, 3, 4, 5, 6, 7, 8], &[0x32, 2, 0xff, 0], &[0x3d, 1, 2, 3, 4]];
        for _ in 0..300 {
            let mut bytes = Vec::new();
            let mut expected = FlushBatch::new(1);
            for _ in 0..rng.below(20) {
                let key = |rng: &mut crate::rng::Rng| {
                    let raw: Vec<u8> = (0..rng.below(30)).map(|_| rng.below(256) as u8).collect();
                    if raw.is_empty() {
                        Vec::new()
                    } else {
                        encode_bytes(&raw)
                    }
                };
                let (start, end, ts) = (key(&mut rng), key(&mut rng), rng.below(u64::MAX));
                let mut one = event(start.clone(), end.clone(), ts).write_to_bytes().unwrap();
                if rng.below(2) == 0 {
                    one.extend_from_slice(rng.pick::<&[u8]>(&unknown));
                    // A later value of a singular field replaces the earlier one.
                    one.extend_from_slice(&event(Vec::new(), Vec::new(), ts).write_to_bytes().unwrap());
                }
                let parsed = logbackuppb::FlushEvent::parse_from_bytes(&one).unwrap();
                expected.push_encoded(parsed.get_start_key(), parsed.get_end_key(), parsed.get_checkpoint()).unwrap();
                // Field 1, length-delimited: the event as written above.
                bytes.push(0x0a);
                let mut len = one.len();
                while len >= 0x80 {
                    bytes.push(len as u8 | 0x80);
                    len >>= 7;
                }
                bytes.push(len as u8);
                bytes.extend_from_slice(&one);
                if rng.below(4) == 0 {
                    bytes.extend_from_slice(rng.pick::<&[u8]>(&unknown));
                }
            }
            let as_protobuf = SubscribeFlushEventResponse::parse_from_bytes(&bytes).unwrap();
            let message = parse_flush_message(&bytes).unwrap();
            assert_eq!(message.events, as_protobuf.get_events().len());
            assert_eq!(message.into_batch(1), expected);
        }
    }

    #[test]
    fn a_malformed_message_is_an_error_naming_what_is_wrong() {
        let bytes = wire(vec![event(encode_bytes(b"a"), encode_bytes(b"b"), 7)]);
        for cut in 1..bytes.len() {
            assert!(parse_flush_message(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let err = parse_flush_message(&[0x0b]).unwrap_err();
        assert_eq!(err, "field 1 has wire type 3");
        assert!(parse_flush_message(&[0x08; 11]).unwrap_err().contains("varint"));
    }

    #[test]
    fn backoff_is_immediate_after_a_useful_stream_then_doubles_to_the_cap() {
        let config = SubscriberConfig {
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(5),
            ..Default::default()
        };
        let delays: Vec<u64> = (0..6).map(|n| backoff(n, &config).as_secs()).collect();
        assert_eq!(delays, vec![0, 1, 2, 4, 5, 5]);
        assert_eq!(backoff(u32::MAX, &config), Duration::from_secs(5));
    }

    #[test]
    fn waiting_for_the_stream_ends_on_an_item_a_stop_or_the_idle_deadline() {
        let never_stopped = StopToken::never();
        let far = Instant::now() + Duration::from_secs(60);
        let mut items = stream::iter([7]);
        assert!(matches!(next_before(&mut items, &never_stopped, far), Next::Item(Some(7))));
        assert!(matches!(next_before(&mut items, &never_stopped, far), Next::Item(None)));

        let started = Instant::now();
        let soon = started + Duration::from_millis(100);
        assert!(matches!(next_before(&mut stream::pending::<u8>(), &never_stopped, soon), Next::Idle));
        assert!(started.elapsed() >= Duration::from_millis(100));

        let (stop_handle, stop) = crate::worker::stop_pair();
        let waiter =
            thread::spawn(move || matches!(next_before(&mut stream::pending::<u8>(), &stop, far), Next::Stopped));
        stop_handle.stop();
        waiter.thread().unpark();
        assert!(waiter.join().unwrap(), "a stop wakes the parked waiter long before the deadline");
    }

    #[test]
    fn stores_that_cannot_be_dialed_are_reported_retried_with_backoff_and_forgotten_when_removed() {
        let meta = Arc::new(MemMeta::with_stores(vec![store(1, 10), store(2, 10)]));
        let dialer = Arc::new(FixedDialer::default());
        let config = SubscriberConfig { retry_backoff: Duration::from_secs(60), ..Default::default() };
        let mut subscriber = FlushSubscriber::new(meta.clone(), dialer.clone(), config);
        let events = subscriber.events().clone();
        assert!(subscriber.pending_errors().is_none(), "nothing subscribed, nothing failing");

        subscriber.update_store_topology().unwrap();
        wait_until("both stores to fail", Duration::from_secs(10), || subscriber.store_errors().len() == 2);
        let err = subscriber.pending_errors().unwrap().to_string();
        assert!(err.contains("stores 1, 2") && err.contains("failed to get log backup client"), "{err}");
        assert_eq!((dialer.dials_of(1), dialer.dials_of(2)), (1, 1));

        // The first failure is retried at once; the next one waits out the backoff.
        subscriber.handle_errors();
        wait_until("the retries to fail", Duration::from_secs(10), || {
            dialer.dials_of(1) == 2 && dialer.dials_of(2) == 2 && subscriber.store_errors().len() == 2
        });
        subscriber.handle_errors();
        assert_eq!((dialer.dials_of(1), dialer.dials_of(2)), (2, 2), "still backing off");

        meta.stores.lock().retain(|s| s.id == 1);
        subscriber.update_store_topology().unwrap();
        let failing: Vec<StoreId> = subscriber.store_errors().into_iter().map(|(id, _)| id).collect();
        assert_eq!(failing, vec![1], "a removed store's subscription and error are gone");

        // A restart resets the backoff and redials at once, through a fresh connection.
        meta.stores.lock()[0].boot_at = 11;
        subscriber.update_store_topology().unwrap();
        assert!(dialer.cleared.lock().contains(&1));
        wait_until("the restarted store to be dialed", Duration::from_secs(10), || dialer.dials_of(1) == 3);

        drop(subscriber);
        assert!(events.recv().is_err(), "dropping the subscriber ends every stream thread and closes the channel");
    }

    #[test]
    fn streams_are_bounded_whatever_the_store_count() {
        // 500 stores once gave 523 threads: one stream thread each.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let stores: Vec<StoreInfo> =
            (1..=20).map(|id| StoreInfo { id, address: address.clone(), boot_at: 1 }).collect();
        let meta = Arc::new(MemMeta::with_stores(stores.clone()));
        let dialer = Arc::new(FixedDialer::new(stores.iter().map(|s| (s.id, address.clone()))));
        let config = SubscriberConfig { max_streams: 3, ..Default::default() };
        let mut subscriber = FlushSubscriber::new(meta.clone(), dialer.clone(), config);
        // Each stream thread holds the service, as the subscriber does.
        let idle = Arc::strong_count(&dialer);
        subscriber.update_store_topology().unwrap();
        assert_eq!(Arc::strong_count(&dialer), idle + 3, "three stream threads, not twenty");
        let err = subscriber.pending_errors().unwrap().to_string();
        assert!(err.contains("17 stores") && err.contains("not subscribed"), "{err}");

        // A subscribed store that leaves frees its slot for one that waits.
        meta.stores.lock().retain(|s| s.id != 1);
        subscriber.update_store_topology().unwrap();
        assert_eq!(Arc::strong_count(&dialer), idle + 3);
        assert_eq!(subscriber.store_errors().len(), 16);
        drop(subscriber);
        assert_eq!(Arc::strong_count(&dialer), 1, "every stream thread has ended");
    }
}
