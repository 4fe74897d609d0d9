//! The checkpoint copy's S3 client against a real S3-compatible server (moto) with IAM
//! checks on: signatures are verified as AWS verifies them.

mod support;

use std::time::Duration;

use streamhelper::proto::brpb::S3;
use streamhelper::storage::{
    read_global_checkpoint, write_global_checkpoint, ExternalStorage, S3Storage, S3Target, GLOBAL_CHECKPOINT_FILE,
};
use streamhelper::Error;
use support::s3::MotoServer;

const TIMEOUT: Duration = Duration::from_secs(10);

fn storage(server: &MotoServer, prefix: &str, access_key: &str, secret_key: &str) -> S3Storage {
    storage_with_token(server, prefix, access_key, secret_key, "")
}

fn storage_with_token(server: &MotoServer, prefix: &str, access_key: &str, secret_key: &str, token: &str) -> S3Storage {
    let mut s3 = S3::new();
    s3.set_endpoint(server.endpoint());
    s3.set_bucket("logs".into());
    s3.set_prefix(prefix.into());
    s3.set_force_path_style(true);
    s3.set_access_key(access_key.into());
    s3.set_secret_access_key(secret_key.into());
    s3.set_session_token(token.into());
    S3Storage::new(S3Target::from_backend(&s3, |_| None).unwrap())
}

#[test]
fn s3_writes_and_reads_are_signed_as_aws_checks_them() {
    let server = MotoServer::start();
    server.create_bucket("logs");
    let user = server.s3_user("advancer");
    let temporary = server.assumed_role("advancer", &user);
    server.enforce_iam(true);

    let good = storage(&server, "/cluster-1/pitr/", &user.access_key, &user.secret_key);
    assert_eq!(read_global_checkpoint(&good, TIMEOUT).unwrap(), None, "nothing written yet");
    write_global_checkpoint(&good, 449_462_874_931_200_001, TIMEOUT).unwrap();
    assert_eq!(read_global_checkpoint(&good, TIMEOUT).unwrap(), Some(449_462_874_931_200_001));
    // The object sits under the prefix, with BR's name and little-endian bytes.
    let root = storage(&server, "", &user.access_key, &user.secret_key);
    let raw = root.read(&format!("cluster-1/pitr/{GLOBAL_CHECKPOINT_FILE}"), TIMEOUT).unwrap().unwrap();
    assert_eq!(raw, [0x01, 0x00, 0x00, 0x78, 0x1a, 0xd0, 0x3c, 0x06]);

    let wrong_secret = storage(&server, "pitr", &user.access_key, "WRONG-SECRET");
    let err = write_global_checkpoint(&wrong_secret, 1, TIMEOUT).unwrap_err().to_string();
    assert!(err.contains("HTTP 403 SignatureDoesNotMatch") && err.contains("s3://logs/pitr"), "{err}");
    assert!(!err.contains("WRONG-SECRET"), "credentials never show: {err}");
    let unknown = storage(&server, "pitr", "AKIANOBODY", "secret");
    let err = write_global_checkpoint(&unknown, 1, TIMEOUT).unwrap_err().to_string();
    assert!(err.contains("HTTP 403 InvalidAccessKeyId"), "{err}");
    assert_eq!(
        read_global_checkpoint(&good, TIMEOUT).unwrap(),
        Some(449_462_874_931_200_001),
        "refused writes left no trace"
    );

    // Temporary credentials: the session token is sent and signed.
    let token = temporary.session_token.as_deref().unwrap();
    let with_token = storage_with_token(&server, "sts", &temporary.access_key, &temporary.secret_key, token);
    write_global_checkpoint(&with_token, 7, TIMEOUT).unwrap();
    assert_eq!(read_global_checkpoint(&with_token, TIMEOUT).unwrap(), Some(7));
    let stale = storage_with_token(&server, "sts", &temporary.access_key, &temporary.secret_key, "stale-token");
    let err = write_global_checkpoint(&stale, 8, TIMEOUT).unwrap_err().to_string();
    assert!(err.contains("InvalidToken") && !err.contains("stale-token"), "{err}");
}

#[test]
fn a_dead_or_hung_s3_fails_within_the_deadline() {
    let dead = format!("http://127.0.0.1:{}", streamhelper::testing::free_port().unwrap());
    let mut s3 = S3::new();
    s3.set_endpoint(dead.clone());
    s3.set_bucket("logs".into());
    s3.set_force_path_style(true);
    let storage = S3Storage::new(S3Target::from_backend(&s3, |_| None).unwrap());
    let err = write_global_checkpoint(&storage, 1, TIMEOUT).unwrap_err();
    assert!(matches!(err, Error::Storage { .. }) && err.to_string().contains(&dead), "{err}");

    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // accepts, never answers
    s3.set_endpoint(format!("http://{}", hung.local_addr().unwrap()));
    let storage = S3Storage::new(S3Target::from_backend(&s3, |_| None).unwrap());
    let started = std::time::Instant::now();
    let err = write_global_checkpoint(&storage, 1, Duration::from_millis(300)).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the deadline holds: took {took:?} ({err})");
}
