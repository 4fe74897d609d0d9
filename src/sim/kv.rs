//! The fake TiKV's transactional service (`tikvpb.Tikv`): the four RPCs lock resolution
//! uses, answered from the sim's transaction table after TiKV's region checks (the store
//! must lead the region, the epoch must match, the keys must be inside it).

use std::sync::Arc;

use grpcio::{RpcContext, UnarySink};

use crate::proto::errorpb;
use crate::proto::kvrpcpb::{
    Action, CheckSecondaryLocksRequest, CheckSecondaryLocksResponse, CheckTxnStatusRequest, CheckTxnStatusResponse,
    Context, KeyError, LockInfo, ResolveLockRequest, ResolveLockResponse, ScanLockRequest, ScanLockResponse,
};
use crate::proto::tikvpb_grpc::Tikv;
use crate::types::{DisplayKey, KeyRange, StoreId};

use super::model::{Key, RegionTable};
use super::server::reply;
use super::state::SimState;
use super::tikv::when_answering;
use super::txn::{SimLock, TxnStatus};

#[derive(Clone)]
pub struct KvService {
    pub state: Arc<SimState>,
    pub store: StoreId,
}

/// The region `context` names, as `[start, end)`, if this store leads it at that epoch and
/// every key is inside it; otherwise the region error TiKV would answer.
fn check_region(
    table: &RegionTable,
    store: StoreId,
    context: &Context,
    keys: &[&[u8]],
) -> Result<(Key, Key), Box<errorpb::Error>> {
    let id = context.get_region_id();
    let mut error = errorpb::Error::new();
    let Some((start, meta)) = table.get(id) else {
        error.set_message(format!("region {id} not found"));
        error.mut_region_not_found().set_region_id(id);
        return Err(error.into());
    };
    if meta.leader != Some(store) {
        error.set_message(format!("store {store} is not the leader of region {id}"));
        let not_leader = error.mut_not_leader();
        not_leader.set_region_id(id);
        if let Some(leader) = meta.leader {
            not_leader.mut_leader().set_store_id(leader);
            not_leader.mut_leader().set_id(meta.peer_id(leader));
        }
        return Err(error.into());
    }
    if context.get_peer().get_id() != meta.peer_id(store) {
        error.set_message(format!(
            "mismatch peer id {} != {} of region {id} on store {store}",
            context.get_peer().get_id(),
            meta.peer_id(store)
        ));
        return Err(error.into());
    }
    if context.get_region_epoch().get_version() != meta.version {
        error.set_message(format!(
            "region {id} epoch version is {}, the request has {}",
            meta.version,
            context.get_region_epoch().get_version()
        ));
        error.mut_epoch_not_match();
        return Err(error.into());
    }
    let end = &meta.end;
    if let Some(outside) = keys.iter().copied().find(|k| *k < start.as_ref() || (!end.is_empty() && *k >= end.as_ref()))
    {
        error.set_message(format!("key {} is not in region {id}", DisplayKey(outside)));
        let not_in = error.mut_key_not_in_region();
        not_in.set_key(outside.to_vec());
        not_in.set_region_id(id);
        return Err(error.into());
    }
    Ok((start.clone(), end.clone()))
}

fn lock_info(lock: &SimLock) -> LockInfo {
    let mut info = LockInfo::new();
    info.set_primary_lock(lock.primary.to_vec());
    info.set_lock_version(lock.start_ts);
    info.set_key(lock.key.to_vec());
    info.set_lock_ttl(lock.ttl_ms);
    info.set_use_async_commit(lock.async_commit);
    info.set_min_commit_ts(lock.min_commit_ts);
    info.set_secondaries(lock.secondaries.iter().map(|k| k.to_vec()).collect());
    info
}

impl KvService {
    /// Checks the region, then runs `body` on the transaction table (lock order: regions,
    /// then transactions), all when the store's gate lets the reply out.
    fn answer<T: Send + 'static>(
        &self,
        context: Context,
        keys: Vec<Vec<u8>>,
        sink: UnarySink<T>,
        on_region_error: impl FnOnce(errorpb::Error) -> T + Send + 'static,
        body: impl FnOnce(&SimState, (Key, Key)) -> T + Send + 'static,
    ) {
        when_answering(&self.state, self.store, move |state, store| {
            let region = {
                let table = state.regions.read();
                let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                check_region(&table, store.id, &context, &key_refs)
            };
            let response = match region {
                Ok(range) => body(state, range),
                Err(error) => on_region_error(*error),
            };
            reply(sink, Ok(response));
        });
    }
}

macro_rules! region_error {
    ($response:ty) => {
        |error| {
            let mut response = <$response>::new();
            response.set_region_error(error);
            response
        }
    };
}

impl Tikv for KvService {
    fn kv_scan_lock(&mut self, _ctx: RpcContext, request: ScanLockRequest, sink: UnarySink<ScanLockResponse>) {
        let context = request.get_context().clone();
        self.answer(context, Vec::new(), sink, region_error!(ScanLockResponse), move |state, (start, end)| {
            let asked = KeyRange::new(request.get_start_key(), request.get_end_key());
            let Some(within) = asked.intersect(&KeyRange::new(start.as_ref(), end.as_ref())) else {
                return ScanLockResponse::new();
            };
            let limit = if request.get_limit() == 0 { usize::MAX } else { request.get_limit() as usize };
            let now = state.tso.next();
            let mut response = ScanLockResponse::new();
            match state.txns.lock().scan(&within.start, &within.end, request.get_max_version(), limit, now) {
                Ok(locks) => response.set_locks(locks.iter().map(lock_info).collect()),
                Err(memory_lock_ts) => {
                    let mut error = KeyError::new();
                    error.mut_locked().set_lock_version(memory_lock_ts);
                    error.mut_locked().set_key(within.start);
                    response.set_error(error);
                }
            }
            response
        });
    }

    fn kv_check_txn_status(
        &mut self,
        _ctx: RpcContext,
        request: CheckTxnStatusRequest,
        sink: UnarySink<CheckTxnStatusResponse>,
    ) {
        let context = request.get_context().clone();
        let keys = vec![request.get_primary_key().to_vec()];
        self.answer(context, keys, sink, region_error!(CheckTxnStatusResponse), move |state, _| {
            let status = state.txns.lock().check_txn_status(
                request.get_primary_key(),
                request.get_lock_ts(),
                request.get_current_ts(),
                request.get_rollback_if_not_exist(),
                request.get_force_sync_commit(),
            );
            let mut response = CheckTxnStatusResponse::new();
            match status {
                TxnStatus::Locked(lock) => {
                    response.set_lock_ttl(lock.ttl_ms);
                    response.set_lock_info(lock_info(&lock));
                }
                TxnStatus::Committed(ts) => response.set_commit_version(ts),
                TxnStatus::RolledBack { now: true } => response.set_action(Action::TTLExpireRollback),
                TxnStatus::RolledBack { now: false } => {}
                TxnStatus::NotFound => {
                    let mut error = KeyError::new();
                    error.mut_txn_not_found().set_start_ts(request.get_lock_ts());
                    error.mut_txn_not_found().set_primary_key(request.get_primary_key().to_vec());
                    response.set_error(error);
                }
            }
            response
        });
    }

    fn kv_check_secondary_locks(
        &mut self,
        _ctx: RpcContext,
        request: CheckSecondaryLocksRequest,
        sink: UnarySink<CheckSecondaryLocksResponse>,
    ) {
        let context = request.get_context().clone();
        let keys = request.get_keys().to_vec();
        self.answer(context, keys, sink, region_error!(CheckSecondaryLocksResponse), move |state, _| {
            let now = state.tso.next();
            let status = state.txns.lock().check_secondary_locks(request.get_keys(), request.get_start_version(), now);
            let mut response = CheckSecondaryLocksResponse::new();
            response.set_locks(status.locks.iter().map(lock_info).collect());
            response.set_commit_ts(status.commit_ts);
            response
        });
    }

    fn kv_resolve_lock(&mut self, _ctx: RpcContext, request: ResolveLockRequest, sink: UnarySink<ResolveLockResponse>) {
        let context = request.get_context().clone();
        let keys = request.get_keys().to_vec();
        self.answer(context, keys, sink, region_error!(ResolveLockResponse), move |state, (start, end)| {
            state.txns.lock().resolve(
                &start,
                &end,
                request.get_start_version(),
                request.get_commit_version(),
                request.get_keys(),
            );
            ResolveLockResponse::new()
        });
    }
}
