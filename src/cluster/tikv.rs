//! Connections to TiKV stores (the log-backup service, and the transactional service that
//! lock resolution uses), one channel per store, dialed with a deadline and cached until an
//! error shows the store may have gone or moved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{Channel, ConnectivityState, Environment};
use log::info;
use parking_lot::Mutex;

use super::{deadline, ClusterMeta, KvClients, LogBackupService, StoreInfo};
use crate::error::{Error, Result};
use crate::proto::logbackuppb_grpc::LogBackupClient;
use crate::proto::tikvpb_grpc::TikvClient;
use crate::security::{grpc_env, Security};
use crate::types::StoreId;

#[derive(Clone, Debug)]
pub struct TikvConfig {
    /// How long dialing a store may take; well under the tick interval, so that a store
    /// that is down costs one tick at most this much.
    pub dial_timeout: Duration,
    pub keepalive: Duration,
}

impl Default for TikvConfig {
    fn default() -> Self {
        TikvConfig { dial_timeout: Duration::from_secs(8), keepalive: Duration::from_secs(10) }
    }
}

/// The connections to every store, resolved through PD (or any [`ClusterMeta`]).
pub struct TikvClients {
    meta: Arc<dyn ClusterMeta>,
    security: Security,
    config: TikvConfig,
    env: Arc<Environment>,
    cache: Mutex<HashMap<StoreId, Cached>>,
}

struct Cached {
    /// The address the connection was dialed at: a store that comes back elsewhere gets a
    /// new connection once its cache entry is cleared.
    address: String,
    channel: Channel,
}

impl TikvClients {
    pub fn new(meta: Arc<dyn ClusterMeta>, security: Security, config: TikvConfig) -> Self {
        TikvClients { meta, security, config, env: grpc_env(), cache: Mutex::default() }
    }

    /// The address of the cached connection to `store`, if there is one.
    pub fn cached_address(&self, store: StoreId) -> Option<String> {
        self.cache.lock().get(&store).map(|c| c.address.clone())
    }

    /// Dials within the dial timeout, cut to the tick's deadline when one is in force.
    fn dial(&self, store: &StoreInfo) -> Result<Channel> {
        let timeout = deadline::bounded(self.config.dial_timeout, &format!("dialing store {}", store.id))?;
        // gRPC's own window, grown with its bandwidth-delay estimate as upstream's client does:
        // with HTTP/2's 64 KiB default a new owner's snapshots came one message per round
        // trip, 0.4 s more at 10^6 regions (docs/benchmarks.md, "Cold start, session 6").
        let channel = self.security.channel(self.env.clone(), &store.address, self.config.keepalive)?;
        wait_connected(&channel, timeout).map_err(|reason| {
            // Diagnosed only while there is time left for it.
            let why = deadline::bounded(timeout, "diagnosis")
                .map(|left| format!(": {}", self.security.diagnose(&store.address, left)))
                .unwrap_or_default();
            Error::Store {
                store_id: store.id,
                address: store.address.clone(),
                reason: format!("cannot connect: {reason}{why}"),
            }
        })?;
        info!("connected to store {} at {}", store.id, store.address);
        Ok(channel)
    }

    fn channel(&self, store: StoreId) -> Result<Channel> {
        if let Some(cached) = self.cache.lock().get(&store) {
            return Ok(cached.channel.clone());
        }
        // Resolve and dial without holding the lock: other stores must not wait on this one.
        let info = self.meta.store(store)?;
        let channel = self.dial(&info)?;
        self.cache.lock().insert(store, Cached { address: info.address, channel: channel.clone() });
        Ok(channel)
    }
}

impl KvClients for TikvClients {
    fn kv_client(&self, store: StoreId) -> Result<TikvClient> {
        self.channel(store).map(TikvClient::new)
    }

    fn forget(&self, store: StoreId) {
        self.clear_cache(store);
    }
}

impl LogBackupService for TikvClients {
    fn client(&self, store: StoreId) -> Result<LogBackupClient> {
        self.channel(store).map(LogBackupClient::new)
    }

    fn clear_cache(&self, store: StoreId) {
        if let Some(dropped) = self.cache.lock().remove(&store) {
            info!("dropped the connection to store {store} at {}", dropped.address);
        }
    }
}

/// Waits until the channel is connected. A refused connection fails at once rather than at
/// the deadline: gRPC would only keep retrying it in the background.
fn wait_connected(channel: &Channel, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut state = channel.check_connectivity_state(true);
    loop {
        match state {
            ConnectivityState::GRPC_CHANNEL_READY => return Ok(()),
            ConnectivityState::GRPC_CHANNEL_TRANSIENT_FAILURE => return Err("connection failed".into()),
            ConnectivityState::GRPC_CHANNEL_SHUTDOWN => return Err("channel shut down".into()),
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero()
            || !deadline::block_on(channel.wait_for_state_change(state, left), "dialing").map_err(|e| e.to_string())?
        {
            return Err(format!("not connected within {timeout:?}"));
        }
        state = channel.check_connectivity_state(true);
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::cluster::testing::MemMeta;

    fn meta_with_store(id: StoreId, address: &str) -> Arc<MemMeta> {
        Arc::new(MemMeta::with_stores(vec![StoreInfo { id, address: address.into(), boot_at: 1 }]))
    }

    fn free_port_address() -> String {
        // Bound then released: nothing listens there afterwards.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[test]
    fn a_store_that_is_down_fails_fast_and_is_named() {
        let address = free_port_address();
        let clients = TikvClients::new(meta_with_store(4, &address), Security::insecure(), TikvConfig::default());
        let started = Instant::now();
        let err = clients.client(4).err().unwrap().to_string();
        assert!(started.elapsed() < Duration::from_secs(4), "refused connections do not wait for the 8 s deadline");
        assert!(err.contains("store 4") && err.contains(&address), "{err}");
        assert_eq!(clients.cached_address(4), None, "failures are not cached");

        let err = clients.client(5).err().unwrap().to_string();
        assert!(err.contains("store 5") && err.contains("not in PD's store list"), "{err}");
    }

    #[test]
    fn a_store_that_never_completes_the_handshake_hits_the_dial_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let config = TikvConfig { dial_timeout: Duration::from_millis(300), ..Default::default() };
        let clients = TikvClients::new(meta_with_store(1, &address), Security::insecure(), config);
        // A TCP listener that never speaks HTTP/2 never becomes a ready channel.
        let err = clients.client(1).err().unwrap().to_string();
        assert!(err.contains("not connected within 300ms"), "{err}");
        assert_eq!(clients.cached_address(1), None);
    }
}
