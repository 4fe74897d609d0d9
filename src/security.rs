//! Dialing gRPC endpoints, plain or TLS, shared by the etcd, PD and TiKV clients, and
//! saying why a connection failed: gRPC itself only reports that it did not connect.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use grpcio::{Channel, ChannelBuilder, ChannelCredentialsBuilder, Environment};
use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;

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

/// Reads a PEM file and checks that it parses, so that a wrong file fails at start-up
/// instead of as endless connection failures.
fn read_pem(role: &'static str, path: &Path, parses: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    let pem = read_tls_file(role, path)?;
    if !parses(&pem) {
        return Err(Error::TlsFile {
            role,
            path: path.to_owned(),
            source: std::io::Error::new(ErrorKind::InvalidData, format!("not a PEM-encoded {role}")),
        });
    }
    Ok(pem)
}

fn is_certificates(pem: &[u8]) -> bool {
    X509::stack_from_pem(pem).is_ok_and(|certs| !certs.is_empty())
}

fn is_private_key(pem: &[u8]) -> bool {
    PKey::private_key_from_pem(pem).is_ok()
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
            Some(path) => read_pem("CA", path, is_certificates)?,
        };
        let cert_and_key = match (&config.cert_path, &config.key_path) {
            (Some(cert), Some(key)) => {
                Some((read_pem("certificate", cert, is_certificates)?, read_pem("key", key, is_private_key)?))
            }
            (None, None) => None,
            _ => return Err(Error::Config("--cert and --key must be given together".into())),
        };
        Ok(Security { tls: Some(Tls { ca, cert_and_key }) })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The `host:port` to dial for `address`. An `https://` URL without TLS material is an
    /// error: falling back to plain text would send everything in the clear.
    pub fn target<'a>(&self, address: &'a str) -> Result<&'a str> {
        let target = strip_scheme(address)?;
        if address.starts_with("https://") && self.tls.is_none() {
            return Err(Error::InvalidAddress {
                address: address.to_string(),
                reason: "an https:// endpoint needs TLS: give --ca (and --cert/--key if the server asks for them)"
                    .into(),
            });
        }
        Ok(target)
    }

    /// Opens a lazily connecting channel to `address` (`host:port`, an optional
    /// `http://`/`https://` scheme is stripped, as PD advertises its URLs with one).
    pub fn channel(&self, env: Arc<Environment>, address: &str, keepalive: Duration) -> Result<Channel> {
        let target = self.target(address)?;
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

    /// Why `address` cannot be connected to, found by connecting ourselves: refused, no
    /// answer, or (with TLS) the certificate not trusted, the name not matching, or the
    /// handshake refused. Called after gRPC failed to connect, so it costs nothing otherwise.
    pub fn diagnose(&self, address: &str, timeout: Duration) -> String {
        let target = match self.target(address) {
            Ok(target) => target,
            Err(e) => return e.to_string(),
        };
        let stream = match connect_tcp(target, timeout) {
            Ok(stream) => stream,
            Err(reason) => return reason,
        };
        let Some(tls) = &self.tls else {
            return "the server accepts TCP connections but gRPC did not connect in plain text (does it require \
                    TLS? then give --ca)"
                .into();
        };
        match tls_handshake(tls, host_of(target), stream, timeout) {
            Ok(()) => "the TLS handshake succeeds, but gRPC did not connect".into(),
            Err(reason) => reason,
        }
    }
}

fn connect_tcp(target: &str, timeout: Duration) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<_> = match target.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => return Err(format!("cannot resolve {target}: {e}")),
    };
    let mut last = format!("{target} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => last = format!("connection refused by {addr}"),
            Err(e) if e.kind() == ErrorKind::TimedOut => last = format!("no answer from {addr} within {timeout:?}"),
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// The host part of a validated `host:port` (brackets of an IPv6 literal dropped).
fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn tls_handshake(tls: &Tls, host: &str, stream: TcpStream, timeout: Duration) -> std::result::Result<(), String> {
    let setup = |e: openssl::error::ErrorStack| format!("TLS set-up failed: {e}");
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(setup)?;
    builder.set_verify(SslVerifyMode::PEER);
    let store = builder.cert_store_mut();
    for ca in X509::stack_from_pem(&tls.ca).map_err(setup)? {
        store.add_cert(ca).map_err(setup)?;
    }
    if let Some((cert, key)) = &tls.cert_and_key {
        let cert = X509::from_pem(cert).map_err(setup)?;
        builder.set_certificate(&cert).map_err(setup)?;
        let key = PKey::private_key_from_pem(key).map_err(setup)?;
        builder.set_private_key(&key).map_err(setup)?;
    }
    let connector = builder.build();
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let config = connector.configure().map_err(setup)?;
    match config.connect(host, stream) {
        Ok(mut tls_stream) => {
            // TLS 1.3 servers reject a missing or bad client certificate only after the
            // handshake: read once to see that verdict.
            let mut byte = [0u8; 1];
            match std::io::Read::read(&mut tls_stream, &mut byte) {
                Err(e) if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut => {
                    Err(format!("the server refused our client certificate or TLS session: {e}"))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(describe_handshake_error(&e, host)),
    }
}

fn describe_handshake_error(e: &openssl::ssl::HandshakeError<TcpStream>, host: &str) -> String {
    let verify = match e {
        openssl::ssl::HandshakeError::Failure(mid) | openssl::ssl::HandshakeError::WouldBlock(mid) => {
            mid.ssl().verify_result()
        }
        openssl::ssl::HandshakeError::SetupFailure(stack) => return format!("TLS set-up failed: {stack}"),
    };
    match verify.as_raw() {
        0 => format!("the server refused the TLS handshake: {e}"),
        // X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        62 | 64 => format!("name mismatch: the server's certificate is not for {host} ({})", verify.error_string()),
        _ => format!("the server's certificate is not trusted by the CA file: {}", verify.error_string()),
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
    // gRPC's C core panics on a NUL and misparses other control bytes: only host names, IPv4
    // and bracketed IPv6 literals pass.
    let valid_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => !v6.is_empty() && v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
        None => host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
    };
    if !valid_host {
        return Err(bad("the host holds characters no host name or IP address has"));
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
        for bad in [
            "127.0.0.1",
            ":2379",
            "host:notaport",
            "host:99999",
            "http://a:1/path",
            "ho\0st:2379",
            "h\u{1b}[31mx:1",
            "hö st:1",
            "[zz]:1",
            "[]:1",
        ] {
            // Named escaped, so that a control byte cannot forge a log line.
            let err = strip_scheme(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err} should name {bad:?}");
        }
    }

    #[test]
    fn https_without_tls_material_is_refused_not_sent_in_clear() {
        let err = Security::insecure().target("https://pd:2379").unwrap_err().to_string();
        assert!(err.contains("https://pd:2379") && err.contains("--ca"), "{err}");
        assert_eq!(Security::insecure().target("http://pd:2379").unwrap(), "pd:2379");
    }

    #[test]
    fn a_file_that_is_no_certificate_fails_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n").unwrap();
        let err = Security::load(&SecurityConfig { ca_path: Some(ca.clone()), ..Default::default() }).err().unwrap();
        let err = err.to_string();
        assert!(err.contains(&ca.display().to_string()) && err.contains("not a PEM-encoded CA"), "{err}");
    }

    #[test]
    fn a_refused_connection_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let reason = Security::insecure().diagnose(&format!("127.0.0.1:{port}"), Duration::from_secs(1));
        assert!(reason.contains("connection refused"), "{reason}");
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
