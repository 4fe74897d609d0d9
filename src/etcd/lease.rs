//! Leases: grant, revoke, and a keep-alive thread that says clearly when a lease is lost.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures_util::{SinkExt, StreamExt};
use grpcio::WriteFlags;

use super::client::{require_leader, EtcdClient};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use crate::worker::{StopToken, Worker};

/// Renews a lease in the background until dropped. [`LeaseKeeper::lost`] yields one error
/// when the lease can no longer be trusted (revoked, expired, or not renewed in time).
pub struct LeaseKeeper {
    id: i64,
    lost: Receiver<Error>,
    _worker: Worker,
}

impl LeaseKeeper {
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Fires once when the lease is lost; the keeper stops renewing then.
    pub fn lost(&self) -> &Receiver<Error> {
        &self.lost
    }
}

impl EtcdClient {
    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id.
    pub fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let mut req = LeaseGrantRequest::new();
        req.set_TTL(ttl.as_secs().max(1) as i64);
        let resp = self.call("etcd LeaseGrant", |c, opt| c.lease.lease_grant_opt(&req, opt))?;
        if !resp.get_error().is_empty() {
            return Err(Error::Etcd { endpoint: self.config().endpoints.join(","), reason: resp.get_error().into() });
        }
        Ok(resp.get_ID())
    }

    /// Revokes a lease, deleting every key attached to it.
    pub fn revoke_lease(&self, id: i64) -> Result<()> {
        let mut req = LeaseRevokeRequest::new();
        req.set_ID(id);
        self.call("etcd LeaseRevoke", |c, opt| c.lease.lease_revoke_opt(&req, opt)).map(drop)
    }

    /// Seconds left on a lease; `None` once it has expired or been revoked.
    pub fn lease_time_to_live(&self, id: i64) -> Result<Option<i64>> {
        let mut req = LeaseTimeToLiveRequest::new();
        req.set_ID(id);
        let resp = self.call("etcd LeaseTimeToLive", |c, opt| c.lease.lease_time_to_live_opt(&req, opt))?;
        Ok((resp.get_TTL() >= 0).then_some(resp.get_TTL()))
    }

    /// One keep-alive round trip; returns the TTL etcd now grants (≤ 0: the lease is gone).
    fn keep_alive_once(&self, id: i64) -> Result<i64> {
        let conn = self.connection()?;
        let fail = |e: grpcio::Error| Error::rpc("etcd LeaseKeepAlive", conn.endpoint.clone(), e);
        // A short stream per round keeps every round bounded by the request deadline.
        let (mut sender, mut receiver) =
            conn.lease.lease_keep_alive_opt(require_leader(self.request_option())).map_err(fail)?;
        let mut req = LeaseKeepAliveRequest::new();
        req.set_ID(id);
        let round = async {
            sender.send((req, WriteFlags::default())).await?;
            let resp = receiver.next().await.ok_or(grpcio::Error::RemoteStopped)??;
            sender.close().await?;
            Ok::<_, grpcio::Error>(resp)
        };
        match futures_executor::block_on(round) {
            Ok(resp) => Ok(resp.get_TTL()),
            Err(e) => {
                self.mark_failed(&conn.endpoint);
                Err(fail(e))
            }
        }
    }

    /// Keeps `id` (granted with `ttl`) alive on a thread, renewing every third of the TTL,
    /// until the keeper is dropped.
    pub fn keep_alive(&self, id: i64, ttl: Duration) -> Result<LeaseKeeper> {
        let (lost_tx, lost) = crossbeam_channel::bounded(1);
        let client = self.clone();
        let worker = Worker::spawn(format!("sh-etcd-lease-{id:x}"), move |stop| {
            if let Err(e) = client.renew_until_lost(id, ttl, &stop) {
                log::warn!("{e}");
                let _ = lost_tx.send(e);
            }
        })?;
        Ok(LeaseKeeper { id, lost, _worker: worker })
    }

    /// Renews until stopped (`Ok`) or until the lease is lost (`Err`).
    fn renew_until_lost(&self, id: i64, ttl: Duration, stop: &StopToken) -> Result<()> {
        let interval = (ttl / 3).max(Duration::from_millis(300));
        let mut expires_at = Instant::now() + ttl;
        loop {
            let sent_at = Instant::now();
            match self.keep_alive_once(id) {
                Ok(granted) if granted <= 0 => {
                    return Err(Error::LeaseLost {
                        lease_id: id,
                        reason: "etcd says it expired or was revoked".into(),
                    });
                }
                Ok(granted) => expires_at = sent_at + Duration::from_secs(granted as u64),
                Err(e) => {
                    if Instant::now() >= expires_at {
                        return Err(Error::LeaseLost {
                            lease_id: id,
                            reason: format!("not renewed before its TTL ran out: {e}"),
                        });
                    }
                    log::warn!("renewing etcd lease {id:x} failed, retrying: {e}");
                }
            }
            let next = (sent_at + interval).min(expires_at).saturating_duration_since(Instant::now());
            if stop.sleep(next) {
                return Ok(());
            }
        }
    }
}
