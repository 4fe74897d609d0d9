//! A real etcd server (the Debian `etcd-server` binary) run as a child process on free
//! loopback ports with a private data directory: the metadata store of the demo and of
//! every test. Only the process we spawned is ever killed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const INSTALL_HINT: &str =
    "install it with `apt-get install etcd-server` (or set STREAMHELPER_ETCD_BIN to an etcd binary)";

/// Server-side TLS for an etcd under test: its certificate and key, and the CA that
/// client certificates must chain to (client certificates are then required).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A running etcd child process. Dropping it kills the process and removes its data dir.
pub struct EtcdProcess {
    child: Option<Child>,
    binary: PathBuf,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
}

/// The etcd binary to run: `$STREAMHELPER_ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("STREAMHELPER_ETCD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::MissingProgram { program: "etcd server", hint: INSTALL_HINT })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|source| Error::Io { what: "binding a free loopback port".into(), source })?;
    Ok(listener.local_addr().map_err(|source| Error::Io { what: "reading a bound port".into(), source })?.port())
}

fn unique_temp_dir(prefix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|source| Error::Io { what: format!("creating temp dir {}", dir.display()), source })?;
    Ok(dir)
}

impl EtcdProcess {
    /// Starts a fresh single-member etcd and waits until it serves requests.
    pub fn start() -> Result<EtcdProcess> {
        Self::start_with(None)
    }

    /// Like [`Self::start`], serving clients over TLS only.
    pub fn start_tls(tls: ServerTls) -> Result<EtcdProcess> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Result<EtcdProcess> {
        // A port found free can be taken by another process before etcd binds it; etcd then
        // exits at once, and fresh ports are the cure.
        const ATTEMPTS: usize = 3;
        let binary = etcd_binary()?;
        let mut attempt = 1;
        loop {
            let mut process = EtcdProcess {
                child: None,
                binary: binary.clone(),
                data_dir: unique_temp_dir("streamhelper-etcd")?,
                client_port: free_port()?,
                peer_port: free_port()?,
                tls: tls.clone(),
            };
            match process.spawn() {
                Ok(()) => return Ok(process),
                Err(e @ Error::Etcd { .. }) if attempt < ATTEMPTS => {
                    log::warn!("etcd did not start (attempt {attempt} of {ATTEMPTS}), trying other ports: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:<port>`, the endpoint clients dial.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, like a crash), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.data_dir.join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| Error::Io { what: format!("opening {}", log_path.display()), source })?;
        let log_err = log.try_clone().map_err(|source| Error::Io { what: "duplicating log file".into(), source })?;
        let mut command = Command::new(&self.binary);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.client_ca.display()))
                .arg("--client-cert-auth=true");
        }
        let child = command
            .arg("--name=streamhelper")
            .arg(format!("--data-dir={}", self.data_dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=streamhelper={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| Error::Io {
                what: format!("starting etcd from {} ({INSTALL_HINT})", self.binary.display()),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready(&log_path)
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = std::fs::read_to_string(log_path).unwrap_or_default();
                    return Err(Error::Etcd {
                        endpoint: self.endpoint(),
                        reason: format!("etcd exited at start-up with {status}; its log says:\n{log}"),
                    });
                }
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(Error::Timeout(format!("waiting for etcd at {} to become healthy", self.endpoint())))
    }

    /// etcd's own `/health` endpoint on the client port (with TLS, an accepted connection:
    /// std has no TLS client).
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.client_port)) else { return false };
        if self.tls.is_some() {
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.client_port);
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
