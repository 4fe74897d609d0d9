//! Dialing gRPC endpoints, plain or TLS, shared by the etcd, PD and TiKV clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use grpcio::{Channel, ChannelBuilder, ChannelCredentialsBuilder, Environment};

use crate::error::{Error, Result};

/// TLS material for talking to a secured cluster. All three paths empty means plain text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecurityConfig {
    pub ca_path: Option<PathBuf>,
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
}

/// Loaded TLS material: files are read once, at start-up, so a bad path fails early and
/// names the file.
#[derive(Clone, Default)]
pub struct Security {
    tls: Option<Tls>,
}

#[derive(Clone)]
struct Tls {
    ca: Vec<u8>,
    cert_and_key: Option<(Vec<u8>, Vec<u8>)>,
}

fn read_tls_file(role: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TlsFile { role, path: path.to_owned(), source })
}

impl Security {
    /// Plain-text connections.
    pub fn insecure() -> Self {
        Security::default()
    }

    pub fn load(config: &SecurityConfig) -> Result<Self> {
        let ca = match &config.ca_path {
            None => {
                if config.cert_path.is_some() || config.key_path.is_some() {
                    return Err(Error::Config(
                        "--cert/--key given without --ca: TLS needs the CA certificate too".into(),
                    ));
                }
                return Ok(Security::insecure());
            }
            Some(path) => read_tls_file("CA", path)?,
        };
        let cert_and_key = match (&config.cert_path, &config.key_path) {
            (Some(cert), Some(key)) => Some((read_tls_file("certificate", cert)?, read_tls_file("key", key)?)),
            (None, None) => None,
            _ => return Err(Error::Config("--cert and --key must be given together".into())),
        };
        Ok(Security { tls: Some(Tls { ca, cert_and_key }) })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens a lazily connecting channel to `address` (`host:port`, an optional
    /// `http://`/`https://` scheme is stripped, as PD advertises its URLs with one).
    pub fn channel(&self, env: Arc<Environment>, address: &str, keepalive: Duration) -> Result<Channel> {
        let target = strip_scheme(address)?;
        let builder = ChannelBuilder::new(env)
            .keepalive_time(keepalive)
            .keepalive_timeout(keepalive)
            .max_receive_message_len(i32::MAX)
            .max_send_message_len(i32::MAX)
            .initial_reconnect_backoff(Duration::from_millis(100))
            .max_reconnect_backoff(Duration::from_secs(3));
        Ok(match &self.tls {
            None => builder.connect(target),
            Some(tls) => {
                let mut creds = ChannelCredentialsBuilder::new().root_cert(tls.ca.clone());
                if let Some((cert, key)) = &tls.cert_and_key {
                    creds = creds.cert(cert.clone(), key.clone());
                }
                builder.set_credentials(creds.build()).connect(target)
            }
        })
    }
}

/// Validates a `host:port` address, accepting and dropping a URL scheme.
pub fn strip_scheme(address: &str) -> Result<&str> {
    let bad = |reason: &str| Error::InvalidAddress { address: address.to_string(), reason: reason.to_string() };
    let target = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address)
        .trim_end_matches('/');
    let (host, port) = target.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if target.contains('/') || target.contains(char::is_whitespace) {
        return Err(bad("expected host:port, optionally with an http:// or https:// scheme"));
    }
    port.parse::<u16>().map_err(|_| bad("port is not a number between 0 and 65535"))?;
    Ok(target)
}

/// One completion-queue environment per process is plenty for an advancer.
pub fn grpc_env() -> Arc<Environment> {
    static ENV: std::sync::OnceLock<Arc<Environment>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| Arc::new(grpcio::EnvBuilder::new().cq_count(2).name_prefix("sh-grpc").build())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_validated() {
        assert_eq!(strip_scheme("http://127.0.0.1:2379").unwrap(), "127.0.0.1:2379");
        assert_eq!(strip_scheme("https://pd:2379/").unwrap(), "pd:2379");
        assert_eq!(strip_scheme("[::1]:20160").unwrap(), "[::1]:20160");
        for bad in ["127.0.0.1", ":2379", "host:notaport", "host:99999", "http://a:1/path"] {
            let err = strip_scheme(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err} should name {bad}");
        }
    }

    #[test]
    fn tls_files_are_named_in_errors() {
        let config = SecurityConfig { ca_path: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let err = Security::load(&config).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/ca.pem") && err.contains("CA"), "{err}");
        let half = SecurityConfig { cert_path: Some("c".into()), ..Default::default() };
        assert!(Security::load(&half).is_err());
    }
}
