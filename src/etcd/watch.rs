//! Watches that survive member failures: a thread per watch reads the stream and hands
//! batches over a bounded channel, resuming from the next undelivered revision after a
//! break, so no event is lost or repeated. A compacted start revision ends the watch with
//! [`Error::Compacted`] so the caller can re-list.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use futures_util::stream::AbortHandle;
use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, WriteFlags};
use parking_lot::Mutex;

use super::client::{EtcdClient, KeySpan};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::{Event_EventType, KeyValue};
use crate::types::DisplayKey;
use crate::worker::{StopToken, Worker};

const CHANNEL_CAPACITY: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(3);

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
    worker: Worker,
}

impl Watcher {
    /// Batches in order. An `Err` is final: the watch has ended (compaction or a
    /// cancellation by etcd) and the channel closes after it.
    pub fn batches(&self) -> &Receiver<Result<WatchBatch>> {
        &self.batches
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

struct WatchLoop {
    client: EtcdClient,
    span: KeySpan,
    prev_kv: bool,
    /// The next revision not yet delivered; 0 until the first create answer fixes it.
    next_revision: i64,
    out: Sender<Result<WatchBatch>>,
    stop: StopToken,
    current: CurrentStream,
}

impl EtcdClient {
    /// Starts watching `span`. Returns once the thread is running; the first stream is
    /// opened by the thread, so an unreachable etcd delays events rather than failing here.
    pub fn watch(&self, span: KeySpan, options: WatchOptions) -> Result<Watcher> {
        let (out, batches) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let current = CurrentStream::default();
        let (client, stream) = (self.clone(), current.clone());
        let worker = Worker::spawn("sh-etcd-watch", move |stop| {
            let mut watch = WatchLoop {
                client,
                span,
                prev_kv: options.prev_kv,
                next_revision: options.start_revision,
                out,
                stop,
                current: stream,
            };
            watch.run();
        })?;
        Ok(Watcher { batches, current, worker })
    }
}

impl WatchLoop {
    fn describe(&self) -> String {
        let (key, _) = self.span.to_wire();
        DisplayKey(&key).to_string()
    }

    fn run(&mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.stream_once() {
                Ok(StreamEnd::Finished) => return,
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
        let (mut sender, receiver) = match conn.watch.watch_opt(CallOption::default()) {
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
        if let Err(e) = futures_executor::block_on(sender.send((request, WriteFlags::default()))) {
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
        let end = self.pump(&mut responses, &conn.endpoint);
        self.current.lock().take();
        // Dropping the sender cancels the call, so it lives until the stream is done.
        drop(sender);
        end
    }

    fn pump(
        &mut self,
        responses: &mut futures_util::stream::Abortable<grpcio::ClientDuplexReceiver<WatchResponse>>,
        endpoint: &str,
    ) -> Result<StreamEnd> {
        loop {
            let response = match futures_executor::block_on(responses.next()) {
                None => {
                    return Ok(if self.stop.is_stopped() { StreamEnd::Finished } else { StreamEnd::Broken });
                }
                Some(Err(e)) => {
                    log::warn!("etcd watch on {} broke on {endpoint}: {e}", self.describe());
                    self.client.mark_failed(endpoint);
                    return Ok(StreamEnd::Broken);
                }
                Some(Ok(response)) => response,
            };
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
            if response.get_created() && self.next_revision <= 0 {
                self.next_revision = response.get_header().get_revision() + 1;
            }
            if response.get_events().is_empty() {
                if !response.get_created() {
                    // A progress notification: every later event is above its revision, so an
                    // idle watch resumes from there, not from a past compacted long ago.
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
