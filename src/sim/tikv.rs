//! The fake TiKV: `logbackup.LogBackup` of one store, answering from the store's last flush
//! exactly as TiKV's backup-stream service does (tikv `components/backup-stream/src/service.rs`
//! and `checkpoint_manager.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::SinkExt;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink, WriteFlags};

use crate::cluster::EVENTS_PER_MESSAGE;
use crate::proto::errorpb;
use crate::proto::logbackuppb::{
    FlushEvent, FlushNowRequest, FlushNowResponse, GetLastFlushTSOfRegionRequest, GetLastFlushTSOfRegionResponse,
    RegionCheckpoint, RegionIdentity, SubscribeFlushEventRequest, SubscribeFlushEventResponse,
};
use crate::proto::logbackuppb_grpc::LogBackup;
use crate::types::{RegionId, StoreId};

use super::encode_boundary;
use super::mailbox::{mailbox, Inbox};
use super::server::reply;
use super::state::{LastFlush, SimState, StoreState};

/// Messages a subscriber may have queued before further flushes are dropped for it.
const SUBSCRIBER_QUEUE: usize = 4096;

/// What the sim sends down a subscription stream.
#[derive(Clone)]
pub enum Push {
    Events(SubscribeFlushEventResponse),
    /// Ends the stream with this status (subscription disabled, injected reset).
    Fail(RpcStatus),
}

#[derive(Clone)]
pub struct LogBackupService {
    pub state: Arc<SimState>,
    pub store: StoreId,
}

/// TiKV's answer for each distinct requested `(id, version)`, as its
/// `GetLastFlushTSOfRegion` handler gives it.
pub fn checkpoints(last: &LastFlush, request: &GetLastFlushTSOfRegionRequest) -> GetLastFlushTSOfRegionResponse {
    let mut seen = HashSet::new();
    let mut response = GetLastFlushTSOfRegionResponse::new();
    for asked in request.get_regions() {
        let (id, version) = (asked.get_id(), asked.get_epoch_version());
        if !seen.insert((id, version)) {
            continue;
        }
        let mut answer = RegionCheckpoint::new();
        let mut echoed = RegionIdentity::new();
        echoed.set_id(id);
        match last.find(id) {
            None => {
                let mut err = errorpb::Error::new();
                err.set_message(format!(
                    "the region {id} isn't in the region_manager of log backup, maybe not leader or not flushed yet."
                ));
                err.mut_not_leader().set_region_id(id);
                answer.set_err(err);
                echoed.set_epoch_version(version);
            }
            Some(recorded) if recorded.version != version => {
                let mut err = errorpb::Error::new();
                err.set_message(format!(
                    "the region {id} has recorded version {}, but you sent {version}",
                    recorded.version
                ));
                err.mut_epoch_not_match();
                answer.set_err(err);
                echoed.set_epoch_version(recorded.version);
            }
            Some(recorded) => {
                echoed.set_epoch_version(recorded.version);
                answer.set_checkpoint(recorded.checkpoint);
            }
        }
        answer.set_region(echoed);
        response.mut_checkpoints().push(answer);
    }
    response
}

/// The answers a misbehaving store adds for regions it was not asked about.
fn add_unasked_answers(
    state: &SimState,
    request: &GetLastFlushTSOfRegionRequest,
    response: &mut GetLastFlushTSOfRegionResponse,
) {
    let count = state.faults.lock().unasked_answers;
    if count == 0 {
        return;
    }
    let asked: HashSet<RegionId> = request.get_regions().iter().map(|r| r.get_id()).collect();
    let real: Vec<RegionId> = state.regions.read().iter().map(|(_, meta)| meta.id).collect();
    let claimed = state.tso.next();
    let made_up = (1u64 << 40)..;
    for id in real.into_iter().chain(made_up).filter(|id| !asked.contains(id)).take(count) {
        let mut answer = RegionCheckpoint::new();
        answer.mut_region().set_id(id);
        answer.set_checkpoint(claimed);
        response.mut_checkpoints().push(answer);
    }
}

/// A flushed set as subscription messages: encoded keys, ≤ 1024 events each.
pub fn flush_events(last: &LastFlush) -> Vec<SubscribeFlushEventResponse> {
    last.regions
        .chunks(EVENTS_PER_MESSAGE)
        .map(|chunk| {
            let mut message = SubscribeFlushEventResponse::new();
            for region in chunk {
                let mut event = FlushEvent::new();
                event.set_start_key(encode_boundary(&region.start));
                event.set_end_key(encode_boundary(&region.end));
                event.set_checkpoint(region.checkpoint);
                message.mut_events().push(event);
            }
            message
        })
        .collect()
}

/// Feeds one subscription stream from its mailbox until the store or the client goes away.
async fn forward(mut inbox: Inbox<Push>, mut sink: ServerStreamingSink<SubscribeFlushEventResponse>, store: StoreId) {
    while let Some(push) = inbox.recv().await {
        match push {
            Push::Events(message) => {
                let sent = sink.send((message, WriteFlags::default())).await;
                inbox.sent();
                if let Err(e) = sent {
                    log::debug!("store {store}: subscriber went away: {e}");
                    return;
                }
            }
            Push::Fail(status) => {
                let _ = sink.fail(status).await;
                return;
            }
        }
    }
    let status = RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, format!("store {store} is shutting down"));
    let _ = sink.fail(status).await;
}

/// Runs `answer` when `store`'s gate lets its reply out: now, after its delay, or when it
/// stops hanging. Every service of a store answers through this.
pub fn when_answering(
    state: &Arc<SimState>,
    store: StoreId,
    answer: impl FnOnce(&SimState, &StoreState) + Send + 'static,
) {
    let shared = state.clone();
    state.gate.submit(store, move || {
        if let Some(store_state) = shared.store(store) {
            answer(&shared, store_state);
        }
    });
}

impl LogBackupService {
    fn when_answering(&self, answer: impl FnOnce(&SimState, &StoreState) + Send + 'static) {
        when_answering(&self.state, self.store, answer);
    }
}

/// What a store without the flush subscription feature answers.
pub fn subscription_disabled(store: StoreId) -> RpcStatus {
    RpcStatus::with_message(
        RpcStatusCode::UNIMPLEMENTED,
        format!("store {store}: log backup flush subscription is disabled"),
    )
}

impl LogBackup for LogBackupService {
    fn get_last_flush_ts_of_region(
        &mut self,
        _ctx: RpcContext,
        request: GetLastFlushTSOfRegionRequest,
        sink: UnarySink<GetLastFlushTSOfRegionResponse>,
    ) {
        self.when_answering(move |state, store| {
            let mut response = checkpoints(&store.reported_flush(), &request);
            add_unasked_answers(state, &request, &mut response);
            reply(sink, Ok(response));
        });
    }

    fn subscribe_flush_event(
        &mut self,
        ctx: RpcContext,
        request: SubscribeFlushEventRequest,
        sink: ServerStreamingSink<SubscribeFlushEventResponse>,
    ) {
        let (outbox, inbox) = mailbox(SUBSCRIBER_QUEUE);
        ctx.spawn(forward(inbox, sink, self.store));
        self.when_answering(move |_, store| {
            if !store.run.lock().subscription_supported {
                outbox.push_all(vec![Push::Fail(subscription_disabled(store.id))]);
                return;
            }
            log::debug!("store {}: new flush subscriber {:?}", store.id, request.get_client_id());
            store.subscribers.lock().push(outbox);
            store.broadcast();
        });
    }

    fn flush_now(&mut self, _ctx: RpcContext, _request: FlushNowRequest, sink: UnarySink<FlushNowResponse>) {
        self.when_answering(move |state, store| {
            // Never wait for delivery here: this may run on a completion-queue thread,
            // which the subscription streams need. The sim has no task list: the
            // flush covers every key, so there is no per-task result to report.
            state.flush(&[store.id], false);
            reply(sink, Ok(FlushNowResponse::new()));
        });
    }
}
