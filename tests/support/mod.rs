//! Shared test helpers: waiting with deadlines, a loopback TCP proxy that can cut a client
//! off from its server (a network partition without touching the server), stall it or
//! black-hole it (a hung host whose connections stay open), an S3-compatible server, the
//! advancer's clients connected to the simulated cluster (also used by benches/locks.rs), and
//! the end-to-end fixture (a real etcd, the sim, daemons).
#![allow(dead_code)]

pub mod s3;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use streamhelper::cluster::{ClusterMeta, PdClient, PdConfig, RegionWithLeader, StoreInfo, TikvClients, TikvConfig};
use streamhelper::etcd::{EtcdClient, EtcdProcess};
use streamhelper::meta::{parse_storage_url, AdvancerExt, MetaDataClient, TaskInfo};
use streamhelper::sim::{SimCluster, SimConfig};
use streamhelper::Config;
use streamhelper::Security;
use streamhelper::{Daemon, DaemonConfig, DaemonHandle};
use streamhelper::{KeyRange, Result, Ts};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    streamhelper::testing::wait_until(what, DEADLINE, cond)
}

pub struct TcpProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    black_holed: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Forwards a new loopback port to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let black_holed = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_string();
        let acceptor = {
            let (cut, stalled, black_holed, stopped, connections) =
                (cut.clone(), stalled.clone(), black_holed.clone(), stopped.clone(), connections.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused in effect
                    }
                    if stalled.load(Ordering::SeqCst) {
                        connections.lock().push(client); // held open, never answered
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream) else { continue };
                    let mut all = connections.lock();
                    all.push(client.try_clone().unwrap());
                    all.push(server.try_clone().unwrap());
                    pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), black_holed.clone());
                    pipe(server, client, black_holed.clone());
                }
            })
        };
        TcpProxy { port, cut, stalled, black_holed, stopped, connections, acceptor: Some(acceptor) }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones until [`Self::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.connections.lock().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// New connections are accepted but never forwarded nor answered: a server that hangs.
    /// Connections already forwarded are dropped, so that clients reconnect into the stall.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
        for stream in self.connections.lock().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// A host that hangs with its connections up: new connections are accepted and never
    /// answered, and connections already open stay open while every byte either way is
    /// dropped. Nothing breaks, so only a client's own liveness checks notice.
    pub fn black_hole(&self) {
        self.black_holed.store(true, Ordering::SeqCst);
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        self.black_holed.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, dropping what it reads while `black_holed`.
fn pipe(mut from: TcpStream, mut to: TcpStream, black_holed: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if !black_holed.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A simulated cluster with the advancer's PD client and TiKV clients connected to it.
pub struct SimWithClients {
    pub sim: SimCluster,
    pub pd: Arc<PdClient>,
    pub clients: Arc<TikvClients>,
}

impl SimWithClients {
    pub fn connect(config: SimConfig) -> SimWithClients {
        let sim = SimCluster::start(config).unwrap();
        let (pd, clients) = connect_clients(&sim);
        SimWithClients { sim, pd, clients }
    }
}

/// The advancer's PD client and TiKV clients, connected to `sim` with short deadlines.
pub fn connect_clients(sim: &SimCluster) -> (Arc<PdClient>, Arc<TikvClients>) {
    let config = PdConfig { timeout: Duration::from_secs(2), ..PdConfig::new(vec![sim.pd_endpoint()]) };
    let pd = Arc::new(PdClient::connect(config, Security::insecure()).unwrap());
    let tikv = TikvConfig { dial_timeout: Duration::from_secs(2), ..Default::default() };
    let clients = Arc::new(TikvClients::new(pd.clone(), Security::insecure(), tikv));
    (pd, clients)
}

/// PD whose region scans go through `intercept` first: it may answer one itself (a stale
/// cache's answer) or just watch (count) and let PD answer.
pub struct InterceptedPd<F> {
    pub pd: Arc<PdClient>,
    pub intercept: F,
}

impl<F> ClusterMeta for InterceptedPd<F>
where
    F: Fn(&[u8], &[u8], usize) -> Option<Vec<RegionWithLeader>> + Send + Sync,
{
    fn region_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>> {
        match (self.intercept)(start, end, limit) {
            Some(regions) => Ok(regions),
            None => self.pd.region_scan(start, end, limit),
        }
    }
    fn stores(&self) -> Result<Vec<StoreInfo>> {
        self.pd.stores()
    }
    fn block_gc_until(&self, safe_point: Ts) -> Result<Ts> {
        self.pd.block_gc_until(safe_point)
    }
    fn unblock_gc(&self) -> Result<()> {
        self.pd.unblock_gc()
    }
    fn fetch_current_ts(&self) -> Result<Ts> {
        self.pd.fetch_current_ts()
    }
}

/// Writes a task as BR would: every table, one range, the given storage URL.
pub fn put_task(meta: &MetaDataClient, name: &str, start: Ts, range: KeyRange, storage: &str) {
    let task = TaskInfo::new(name)
        .from_ts(start)
        .to_storage(parse_storage_url(storage).unwrap())
        .with_table_filter(["*.*"])
        .with_ranges([range])
        .check()
        .unwrap();
    meta.put_task(&task).unwrap();
}

/// Fast settings so that stories play out in seconds. The thresholds are explicit, so the
/// sim's TiKV config (180 s flushes) does not replace them.
pub fn fast_config() -> Config {
    Config {
        tick_interval: Duration::from_millis(200),
        try_advance_threshold: Duration::from_millis(300),
        backoff: Duration::from_millis(200),
        owner_ttl: Duration::from_secs(2),
        rpc_timeout: Duration::from_millis(500),
        dial_timeout: Duration::from_millis(500),
        upload_heartbeat: Duration::from_secs(1),
        resolve_lock_interval: Duration::from_secs(1),
        explicit: ["try-advance-threshold", "resolve-lock-interval"].map(String::from).into(),
        ..Config::default()
    }
}

/// A real etcd, the simulated cluster and the clients a test writes tasks with.
pub struct Fixture {
    pub etcd: EtcdProcess,
    pub sim: SimCluster,
    pub meta: MetaDataClient,
    pub ext: AdvancerExt,
}

impl Fixture {
    pub fn new(stores: usize, regions: usize) -> Fixture {
        let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
        let sim = SimCluster::start(SimConfig { stores, regions, seed: 7, ..SimConfig::default() }).unwrap();
        let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()]).unwrap());
        let ext = AdvancerExt::new(meta.clone());
        Fixture { etcd, sim, meta, ext }
    }

    pub fn add_task(&self, name: &str, range: KeyRange) -> Ts {
        self.add_task_stored_in(name, range, "noop://")
    }

    pub fn add_task_stored_in(&self, name: &str, range: KeyRange, storage: &str) -> Ts {
        let start = self.sim.now_ts();
        put_task(&self.meta, name, start, range, storage);
        start
    }

    pub fn daemon_config(&self) -> DaemonConfig {
        DaemonConfig {
            etcd_endpoints: vec![self.etcd.endpoint()],
            advancer: fast_config(),
            status_addr: Some("127.0.0.1:0".into()),
            ..DaemonConfig::new(vec![self.sim.pd_endpoint()])
        }
    }

    pub fn daemon(&self) -> DaemonHandle {
        let handle = Daemon::start(self.daemon_config()).unwrap();
        wait_until("the daemon to become owner", || handle.is_owner());
        handle
    }

    pub fn stored(&self, task: &str) -> Ts {
        self.ext.get_global_checkpoint(task).unwrap()
    }
}
