//! Watches that survive member failures: a thread per watch reads the stream and hands
//! batches over a bounded channel, resuming from the next undelivered revision after a
//! break, so no event is lost or repeated. A compacted start revision ends the watch with
//! [`Error::Compacted`] so the caller can re-list.
//!
//! Liveness (PD's etcdutil watch loop and tidb#69047 do the same): streams carry etcd's
//! `hasleader` metadata, so a member that loses its raft leader closes them; and a watch that
//! hears nothing for [`EtcdConfig::watch_progress_interval`](super::EtcdConfig) asks for
//! progress, then after [`WATCH_SILENT_INTERVALS`] silent intervals is reopened on the next
//! member, since a member whose disk hangs keeps the connection open but answers nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_util::stream::{AbortHandle, Abortable};
use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, ClientDuplexReceiver, ClientDuplexSender, WriteFlags};
use parking_lot::Mutex;

use super::client::{require_leader, EtcdClient, KeySpan, WATCH_SILENT_INTERVALS};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::{Event_EventType, KeyValue};
use crate::types::DisplayKey;
use crate::worker::{block_on_by, StopToken, Worker};

const CHANNEL_CAPACITY: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The `watch_id` of etcd's answer to a [`WatchProgressRequest`] (clientv3's `InvalidWatchID`).
const PROGRESS_REPLY_WATCH_ID: i64 = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a delete, the key with `mod_revision` = the deletion revision and no value.
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

/// Events of one or more consecutive revisions, in revision order.
#[derive(Debug, Clone)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
}

#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// First revision to deliver (inclusive); 0 = changes after the watch is created.
    pub start_revision: i64,
    pub prev_kv: bool,
}

/// The abort handle of the stream being read, so that a drop can wake the blocked read.
type CurrentStream = Arc<Mutex<Option<AbortHandle>>>;

/// A running watch. Dropping it cancels the stream and joins its thread.
pub struct Watcher {
    batches: Receiver<Result<WatchBatch>>,
    current: CurrentStream,
    silent_reopens: Arc<AtomicU64>,
    worker: Worker,
}

impl Watcher {
    /// Batches in order. An `Err` is final: the watch has ended (compaction or a
    /// cancellation by etcd) and the channel closes after it.
    pub fn batches(&self) -> &Receiver<Result<WatchBatch>> {
        &self.batches
    }

    /// Streams given up because nothing, not even an answer to a progress request, arrived
    /// for [`WATCH_SILENT_INTERVALS`] intervals.
    pub fn silent_reopens(&self) -> u64 {
        self.silent_reopens.load(Ordering::Relaxed)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Stop first, then abort under the lock: the thread either sees the stop when it
        // registers a new stream, or registered it before and gets aborted here. The worker
        // joins it when it drops.
        self.worker.signal();
        if let Some(abort) = self.current.lock().take() {
            abort.abort();
        }
    }
}

/// How one stream ended.
enum StreamEnd {
    /// The stream broke; reconnect and resume.
    Broken,
    /// Stop, or the consumer went away.
    Finished,
}

type Responses = Abortable<ClientDuplexReceiver<WatchResponse>>;

struct WatchLoop {
    client: EtcdClient,
    span: KeySpan,
    prev_kv: bool,
    /// The next revision not yet delivered; 0 until the first create answer fixes it.
    next_revision: i64,
    /// The last stream was created: the next break is a new failure, not the same one again.
    established: bool,
    out: Sender<Result<WatchBatch>>,
    stop: StopToken,
    current: CurrentStream,
    silent_reopens: Arc<AtomicU64>,
    /// Streams given up for silence since the last answer: while every member hangs, only
    /// the first is warned about.
    silent_in_a_row: u64,
}

impl EtcdClient {
    /// Starts watching `span`. Returns once the thread is running; the first stream is
    /// opened by the thread, so an unreachable etcd delays events rather than failing here.
    pub fn watch(&self, span: KeySpan, options: WatchOptions) -> Result<Watcher> {
        let (out, batches) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let current = CurrentStream::default();
        let silent_reopens = Arc::<AtomicU64>::default();
        let (client, stream, reopens) = (self.clone(), current.clone(), silent_reopens.clone());
        let worker = Worker::spawn("sh-etcd-watch", move |stop| {
            let mut watch = WatchLoop {
                client,
                span,
                prev_kv: options.prev_kv,
                next_revision: options.start_revision,
                established: false,
                out,
                stop,
                current: stream,
                silent_reopens: reopens,
                silent_in_a_row: 0,
            };
            watch.run();
        })?;
        Ok(Watcher { batches, current, silent_reopens, worker })
    }
}

impl WatchLoop {
    fn describe(&self) -> String {
        let (key, _) = self.span.to_wire();
        DisplayKey(&key).to_string()
    }

    fn run(&mut self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.established = false;
            match self.stream_once() {
                Ok(StreamEnd::Finished) => return,
                Ok(StreamEnd::Broken) if self.established => backoff = FIRST_BACKOFF,
                Ok(StreamEnd::Broken) => {}
                Err(final_error) => {
                    let _ = self.out.send(Err(final_error));
                    return;
                }
            }
            log::info!("etcd watch on {} resumes from revision {} in {backoff:?}", self.describe(), self.next_revision);
            if self.stop.sleep(backoff) {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Opens one stream and pumps it until it breaks. `Err` means the watch must end.
    fn stream_once(&mut self) -> Result<StreamEnd> {
        let conn = match self.client.connection() {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("etcd watch on {}: {e}", self.describe());
                return Ok(StreamEnd::Broken);
            }
        };
        let (mut sender, receiver) = match conn.watch.watch_opt(require_leader(CallOption::default())) {
            Ok(pair) => pair,
            Err(e) => {
                log::warn!("etcd watch on {} could not open a stream to {}: {e}", self.describe(), conn.endpoint);
                self.client.mark_failed(&conn.endpoint);
                return Ok(StreamEnd::Broken);
            }
        };
        let (key, range_end) = self.span.to_wire();
        let mut create = WatchCreateRequest::new();
        create.set_key(key);
        create.set_range_end(range_end);
        create.set_start_revision(self.next_revision);
        create.set_prev_kv(self.prev_kv);
        create.set_progress_notify(true);
        let mut request = WatchRequest::new();
        request.set_create_request(create);
        let deadline = Instant::now() + self.client.config().request_timeout;
        if let Err(e) = send_by(&mut sender, request, deadline) {
            log::warn!("etcd watch on {} could not send its create request to {}: {e}", self.describe(), conn.endpoint);
            self.client.mark_failed(&conn.endpoint);
            return Ok(StreamEnd::Broken);
        }
        let (mut responses, abort) = futures_util::stream::abortable(receiver);
        {
            let mut current = self.current.lock();
            if self.stop.is_stopped() {
                return Ok(StreamEnd::Finished);
            }
            *current = Some(abort);
        }
        let end = self.pump(&mut sender, &mut responses, &conn.endpoint);
        self.current.lock().take();
        // Dropping the sender cancels the call, so it lives until the stream is done.
        drop(sender);
        end
    }

    /// Reads the stream until it breaks, asking for progress whenever it has been silent
    /// for an interval and giving it up (moving to the next member) when even that goes
    /// unanswered for [`WATCH_SILENT_INTERVALS`] intervals.
    fn pump(
        &mut self,
        sender: &mut ClientDuplexSender<WatchRequest>,
        responses: &mut Responses,
        endpoint: &str,
    ) -> Result<StreamEnd> {
        let interval = self.client.config().watch_progress_interval;
        let mut last_heard = Instant::now();
        let mut next_request = last_heard + interval;
        loop {
            let response = match next_by(responses, next_request) {
                Waited::TimedOut => {
                    let silent = last_heard.elapsed();
                    if silent >= interval * WATCH_SILENT_INTERVALS {
                        let level = if self.silent_in_a_row == 0 { log::Level::Warn } else { log::Level::Debug };
                        log::log!(
                            level,
                            "etcd watch on {} heard nothing from {endpoint} for {silent:?}, not even progress: \
                             reopening it on the next member from revision {}",
                            self.describe(),
                            self.next_revision
                        );
                        self.silent_in_a_row += 1;
                        self.silent_reopens.fetch_add(1, Ordering::Relaxed);
                        self.client.mark_failed(endpoint);
                        return Ok(StreamEnd::Broken);
                    }
                    let mut request = WatchRequest::new();
                    request.set_progress_request(WatchProgressRequest::new());
                    // An unsent request shows up as more silence.
                    if let Err(e) = send_by(sender, request, Instant::now() + interval) {
                        log::debug!("etcd watch on {}: progress request to {endpoint} not sent: {e}", self.describe());
                    }
                    next_request = Instant::now() + interval;
                    continue;
                }
                Waited::Ended => {
                    return Ok(if self.stop.is_stopped() { StreamEnd::Finished } else { StreamEnd::Broken });
                }
                Waited::Item(Err(e)) => {
                    log::warn!("etcd watch on {} broke on {endpoint}: {e}", self.describe());
                    self.client.mark_failed(endpoint);
                    return Ok(StreamEnd::Broken);
                }
                Waited::Item(Ok(response)) => response,
            };
            last_heard = Instant::now();
            next_request = last_heard + interval;
            if self.silent_in_a_row > 0 {
                log::info!(
                    "etcd watch on {} hears from {endpoint} again, after {} silent streams",
                    self.describe(),
                    self.silent_in_a_row
                );
                self.silent_in_a_row = 0;
            }
            if response.get_compact_revision() != 0 {
                return Err(Error::Compacted {
                    key: self.describe(),
                    requested: self.next_revision,
                    compact_revision: response.get_compact_revision(),
                });
            }
            if response.get_canceled() {
                return Err(Error::Etcd {
                    endpoint: endpoint.to_string(),
                    reason: format!("watch on {} canceled: {}", self.describe(), response.get_cancel_reason()),
                });
            }
            if response.get_created() {
                self.established = true;
                if self.next_revision <= 0 {
                    self.next_revision = response.get_header().get_revision() + 1;
                }
            }
            if response.get_events().is_empty() {
                // A progress notification: every later event is above its revision, so an
                // idle watch resumes from there, not from a past compacted long ago. Not so
                // the answer to our own progress request: etcd before the fix of etcd#15220
                // (3.4.23 among them) may send it ahead of events still due to this watch.
                if !response.get_created() && response.get_watch_id() != PROGRESS_REPLY_WATCH_ID {
                    self.next_revision = self.next_revision.max(response.get_header().get_revision() + 1);
                }
                continue;
            }
            let batch = self.take_batch(response);
            if !self.stop.send(&self.out, Ok(batch)) {
                return Ok(StreamEnd::Finished);
            }
        }
    }

    fn take_batch(&mut self, mut response: WatchResponse) -> WatchBatch {
        let events: Vec<WatchEvent> = response
            .take_events()
            .into_iter()
            .map(|mut e| WatchEvent {
                kind: if e.get_field_type() == Event_EventType::DELETE { EventKind::Delete } else { EventKind::Put },
                prev_kv: if e.has_prev_kv() { Some(e.take_prev_kv()) } else { None },
                kv: e.take_kv(),
            })
            .collect();
        if let Some(last) = events.last() {
            self.next_revision = last.kv.get_mod_revision() + 1;
        }
        WatchBatch { events }
    }
}

/// What waiting on a stream until a deadline gave.
enum Waited<T> {
    Item(T),
    Ended,
    TimedOut,
}

fn next_by(responses: &mut Responses, deadline: Instant) -> Waited<grpcio::Result<WatchResponse>> {
    match block_on_by(responses.next(), deadline) {
        Some(Some(item)) => Waited::Item(item),
        Some(None) => Waited::Ended,
        None => Waited::TimedOut,
    }
}

fn send_by(
    sender: &mut ClientDuplexSender<WatchRequest>,
    request: WatchRequest,
    deadline: Instant,
) -> std::result::Result<(), String> {
    match block_on_by(sender.send((request, WriteFlags::default())), deadline) {
        Some(result) => result.map_err(|e| e.to_string()),
        None => Err("no room to send before the deadline".into()),
    }
}
