//! AWS Signature Version 4 for header-signed requests: the one thing an S3 PUT or GET needs
//! besides HTTP. Written against AWS's published algorithm and pinned by its example.

use std::fmt;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::timefmt::format_rfc3339;

/// An access key pair, optionally with an STS session token. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What is signed: the method, the already URI-encoded path, the canonical query string and
/// the headers sent (`host` among them).
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: Vec<(String, String)>,
    pub payload: &'a [u8],
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// `20130524T000000Z`
pub fn amz_date(t: SystemTime) -> String {
    format_rfc3339(t).replace(['-', ':'], "")
}

/// S3's URI encoding of one path: every byte but RFC 3986's unreserved ones and `/`.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Adds `x-amz-date`, `x-amz-content-sha256`, the session token if any, and `authorization`
/// to the request's headers, signed for `service` in `region` at `now`; returns every header
/// to send.
pub fn sign(
    credentials: &Credentials,
    region: &str,
    service: &str,
    now: SystemTime,
    mut request: Request<'_>,
) -> Vec<(String, String)> {
    let amz_date = amz_date(now);
    let payload_hash = sha256_hex(request.payload);
    request.headers.push(("x-amz-date".into(), amz_date.clone()));
    request.headers.push(("x-amz-content-sha256".into(), payload_hash.clone()));
    if let Some(token) = &credentials.session_token {
        request.headers.push(("x-amz-security-token".into(), token.clone()));
    }
    let mut canonical: Vec<(String, String)> =
        request.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())).collect();
    canonical.sort();
    let signed_headers = canonical.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical_headers: String = canonical.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        request.method, request.path, request.query
    );
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", sha256_hex(canonical_request.as_bytes()));
    let mut key = hmac(format!("AWS4{}", credentials.secret_key).as_bytes(), date);
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part);
    }
    let signature = hex(&hmac(&key, &string_to_sign));
    request.headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.access_key
        ),
    ));
    request.headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timefmt::parse_rfc3339;

    fn example_credentials() -> Credentials {
        Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// AWS's documented S3 example (GET /test.txt with a Range header, 2013-05-24).
    #[test]
    fn signs_the_aws_s3_get_example() {
        let headers = sign(
            &example_credentials(),
            "us-east-1",
            "s3",
            parse_rfc3339("2013-05-24T00:00:00Z").unwrap(),
            Request {
                method: "GET",
                path: "/test.txt",
                query: "",
                headers: vec![
                    ("Host".into(), "examplebucket.s3.amazonaws.com".into()),
                    ("Range".into(), "bytes=0-9".into()),
                ],
                payload: b"",
            },
        );
        let auth = &headers.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn a_session_token_is_sent_and_signed_and_secrets_never_print() {
        let credentials = Credentials { session_token: Some("TOKEN-SECRET".into()), ..example_credentials() };
        let now = parse_rfc3339("2013-05-24T00:00:00Z").unwrap();
        let request = || Request {
            method: "PUT",
            path: "/b/k",
            query: "",
            headers: vec![("host".into(), "h".into())],
            payload: b"x",
        };
        let headers = sign(&credentials, "us-east-1", "s3", now, request());
        assert!(headers.contains(&("x-amz-security-token".into(), "TOKEN-SECRET".into())));
        let auth = &headers.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert!(auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token"), "{auth}");
        let unsigned_token = sign(&example_credentials(), "us-east-1", "s3", now, request());
        assert_ne!(auth, &unsigned_token.iter().find(|(k, _)| k == "authorization").unwrap().1);
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("EXAMPLEKEY") && !shown.contains("TOKEN-SECRET"), "{shown}");
    }

    #[test]
    fn paths_are_encoded_like_s3() {
        assert_eq!(
            encode_path("/b/v1/global_checkpoint/central_global.ts"),
            "/b/v1/global_checkpoint/central_global.ts"
        );
        assert_eq!(encode_path("/b/a b+c$"), "/b/a%20b%2Bc%24");
        assert_eq!(amz_date(parse_rfc3339("2013-05-24T01:02:03Z").unwrap()), "20130524T010203Z");
    }
}
