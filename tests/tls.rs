//! TLS end to end: a real etcd that requires client certificates, reached through our
//! client with the CA, certificate and key that `--ca --cert --key` load.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use streamhelper::etcd::{EtcdClient, EtcdConfig, EtcdProcess, ServerTls};
use streamhelper::{Security, SecurityConfig};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A self-signed CA: `<name>.key` and `<name>.pem`.
fn make_ca(dir: &Path, name: &str, common_name: &str) {
    let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={common_name}"));
    let args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-days", "2"];
    openssl(dir, &[&args[..], &["-subj", &subject]].concat());
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, signed by the CA.
fn make_pki(dir: &Path) {
    make_ca(dir, "ca", "streamhelper-test-ca");
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
}

fn client(endpoint: &str, security: Security) -> EtcdClient {
    let mut config = EtcdConfig::new([endpoint]);
    config.security = security;
    config.connect_timeout = Duration::from_secs(2);
    EtcdClient::new(config).unwrap()
}

#[test]
fn tls_with_client_certificates_works_and_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let path = |f: &str| dir.path().join(f);
    let etcd = EtcdProcess::start_tls(ServerTls {
        cert: path("server.pem"),
        key: path("server.key"),
        client_ca: path("ca.pem"),
    })
    .unwrap();

    let full = Security::load(&SecurityConfig {
        ca_path: Some(path("ca.pem")),
        cert_path: Some(path("client.pem")),
        key_path: Some(path("client.key")),
    })
    .unwrap();
    assert!(full.is_tls());
    let secure = client(&etcd.endpoint(), full);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match secure.put("/tls/k", "v", 0) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "TLS client never got through: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert_eq!(secure.get("/tls/k").unwrap().unwrap().get_value(), b"v");

    let plain = client(&etcd.endpoint(), Security::insecure());
    let err = plain.get("/tls/k").unwrap_err().to_string();
    assert!(err.contains(&etcd.endpoint()), "the refusal names the endpoint: {err}");

    let ca_only = Security::load(&SecurityConfig { ca_path: Some(path("ca.pem")), ..Default::default() }).unwrap();
    assert!(client(&etcd.endpoint(), ca_only).get("/tls/k").is_err(), "client certificates are required");
}

/// The first error of a client that cannot get through, as text.
fn failure(endpoint: &str, security: Security) -> String {
    client(endpoint, security).get("/tls/k").unwrap_err().to_string()
}

#[test]
fn tls_failures_say_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let path = |f: &str| dir.path().join(f);
    make_ca(dir.path(), "other", "another-ca");
    let etcd = EtcdProcess::start_tls(ServerTls {
        cert: path("server.pem"),
        key: path("server.key"),
        client_ca: path("ca.pem"),
    })
    .unwrap();
    let load = |ca: &str, with_client_cert: bool| {
        Security::load(&SecurityConfig {
            ca_path: Some(path(ca)),
            cert_path: with_client_cert.then(|| path("client.pem")),
            key_path: with_client_cert.then(|| path("client.key")),
        })
        .unwrap()
    };
    let endpoint = etcd.endpoint();

    let err = failure(&endpoint, load("other.pem", true));
    assert!(err.contains("not trusted by the CA file"), "{err}");

    // The server's certificate names 127.0.0.1 only.
    let port = endpoint.rsplit_once(':').unwrap().1;
    let err = failure(&format!("localhost:{port}"), load("ca.pem", true));
    assert!(err.contains("name mismatch") && err.contains("localhost"), "{err}");

    let err = failure(&endpoint, load("ca.pem", false));
    assert!(err.contains("refused our client certificate") || err.contains("refused the TLS handshake"), "{err}");

    let err = failure(&endpoint, Security::insecure());
    assert!(err.contains("require TLS"), "{err}");

    let err = EtcdClient::new(EtcdConfig::new([format!("https://{endpoint}")])).err().unwrap().to_string();
    assert!(err.contains("needs TLS"), "https:// without --ca is an error, never plain text: {err}");

    drop(etcd);
    let err = failure(&endpoint, load("ca.pem", true));
    assert!(err.contains("connection refused"), "{err}");
}
