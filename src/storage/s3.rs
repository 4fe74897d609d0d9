//! `s3://` storage: BR's `backup.S3` fields decoded the way BR's own S3 storage reads them,
//! and one SigV4-signed PUT or GET per call over a synchronous HTTP client.

use std::io::Read;
use std::time::{Duration, SystemTime};

use super::sigv4::{self, Credentials};
use super::ExternalStorage;
use crate::error::{Error, Result};
use crate::proto::brpb::S3;

/// BR's region when the backend names none.
const DEFAULT_REGION: &str = "us-east-1";
/// Enough for S3's XML error documents and for telling a checkpoint file from garbage.
const MAX_BODY: u64 = 64 * 1024;

/// Where and how to reach one bucket prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Target {
    /// `http` or `https`.
    pub scheme: String,
    /// The authority requests go to: the endpoint's, or `bucket.` + it in virtual-host style.
    pub host: String,
    /// The path every key is under: the endpoint's own path, then `/bucket` in path style.
    pub base_path: String,
    /// The backend's prefix with one trailing `/` (empty when none), as BR keys objects.
    pub key_prefix: String,
    pub region: String,
    /// `None`: anonymous requests.
    pub credentials: Option<Credentials>,
    /// Storage class, server-side encryption and ACL headers for PUTs, as BR sends them.
    pub put_headers: Vec<(String, String)>,
    /// For log lines: `s3://bucket/prefix` and the endpoint, never credentials.
    pub url: String,
}

impl S3Target {
    /// Decodes BR's backend. Credentials come from the backend, else from the environment
    /// (`env` looks a variable up): `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the older
    /// `AWS_ACCESS_KEY`/`AWS_SECRET_KEY`, and `AWS_SESSION_TOKEN`.
    pub fn from_backend(s3: &S3, env: impl Fn(&str) -> Option<String>) -> Result<S3Target> {
        let prefix = s3.get_prefix().trim_matches('/');
        let shown = format!("s3://{}/{prefix}", s3.get_bucket());
        let url = match s3.get_endpoint() {
            "" => shown.clone(),
            endpoint => format!("{shown} at {endpoint}"),
        };
        let bad = |reason: String| Error::Storage { url: url.clone(), reason };
        if s3.get_bucket().is_empty() {
            return Err(bad("the backend names no bucket".into()));
        }
        if !s3.get_role_arn().is_empty() {
            return Err(Error::StorageUnsupported { backend: "s3 with role-arn (AssumeRole)" });
        }
        let region = match s3.get_region() {
            "" => DEFAULT_REGION.to_string(),
            region => region.to_string(),
        };
        let (scheme, authority, endpoint_path) = match s3.get_endpoint() {
            "" => ("https".to_string(), format!("s3.{region}.amazonaws.com"), String::new()),
            endpoint => {
                let (scheme, rest) = endpoint
                    .split_once("://")
                    .filter(|(s, _)| *s == "http" || *s == "https")
                    .ok_or_else(|| bad(format!("endpoint {endpoint:?} needs an http:// or https:// scheme")))?;
                let rest = rest.trim_end_matches('/');
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                if authority.is_empty() {
                    return Err(bad(format!("endpoint {endpoint:?} has no host")));
                }
                let path = if path.is_empty() { String::new() } else { format!("/{path}") };
                (scheme.to_string(), authority.to_string(), path)
            }
        };
        // Like AWS's SDKs: a bucket name that cannot be a DNS label goes in the path.
        let path_style = s3.get_force_path_style() || s3.get_bucket().contains('.');
        let (host, base_path) = if path_style {
            (authority, format!("{endpoint_path}/{}", s3.get_bucket()))
        } else {
            (format!("{}.{authority}", s3.get_bucket()), endpoint_path)
        };
        let credentials = credentials(s3, &env).map_err(|reason| bad(reason.into()))?;
        let put_headers = [
            ("x-amz-storage-class", s3.get_storage_class()),
            ("x-amz-server-side-encryption", s3.get_sse()),
            ("x-amz-server-side-encryption-aws-kms-key-id", s3.get_sse_kms_key_id()),
            ("x-amz-acl", s3.get_acl()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Ok(S3Target {
            scheme,
            host,
            base_path,
            key_prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            region,
            credentials,
            put_headers,
            url,
        })
    }
}

fn credentials(
    s3: &S3,
    env: &impl Fn(&str) -> Option<String>,
) -> std::result::Result<Option<Credentials>, &'static str> {
    let non_empty = |v: &str| (!v.is_empty()).then(|| v.to_string());
    let (access_key, secret_key, session_token) =
        match (non_empty(s3.get_access_key()), non_empty(s3.get_secret_access_key())) {
            (Some(a), Some(s)) => (a, s, non_empty(s3.get_session_token())),
            (Some(_), None) => return Err("the backend has an access_key but no secret_access_key"),
            (None, Some(_)) => return Err("the backend has a secret_access_key but no access_key"),
            (None, None) => {
                let var = |names: &[&str]| names.iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
                match (var(&["AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY"]), var(&["AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY"]))
                {
                    (Some(a), Some(s)) => (a, s, var(&["AWS_SESSION_TOKEN"])),
                    _ => return Ok(None),
                }
            }
        };
    Ok(Some(Credentials { access_key, secret_key, session_token }))
}

pub struct S3Storage {
    target: S3Target,
    agent: ureq::Agent,
}

impl S3Storage {
    pub fn new(target: S3Target) -> S3Storage {
        // S3 answers a wrong region with a redirect; following it would only hide the cause.
        let agent = ureq::AgentBuilder::new().redirects(0).user_agent("streamhelper").build();
        S3Storage { target, agent }
    }

    pub fn target(&self) -> &S3Target {
        &self.target
    }

    fn error(&self, reason: String) -> Error {
        Error::Storage { url: self.target.url.clone(), reason }
    }

    /// One signed request for the object `name`; `Ok(None)` is a 404.
    fn request(&self, method: &str, name: &str, body: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>> {
        let t = &self.target;
        let key = format!("{}{name}", t.key_prefix);
        let path = sigv4::encode_path(&format!("{}/{key}", t.base_path));
        let mut headers = vec![("host".to_string(), t.host.clone())];
        if method == "PUT" {
            headers.extend(t.put_headers.iter().cloned());
        }
        if let Some(credentials) = &t.credentials {
            let request = sigv4::Request { method, path: &path, query: "", headers, payload: body };
            headers = sigv4::sign(credentials, &t.region, "s3", SystemTime::now(), request);
        }
        let mut request = self.agent.request(method, &format!("{}://{}{path}", t.scheme, t.host)).timeout(timeout);
        for (name, value) in &headers {
            request = request.set(name, value);
        }
        let response = if method == "PUT" { request.send_bytes(body) } else { request.call() };
        let read_body = |response: ureq::Response| -> std::io::Result<Vec<u8>> {
            let mut bytes = Vec::new();
            response.into_reader().take(MAX_BODY).read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        match response {
            Ok(response) => read_body(response)
                .map(Some)
                .map_err(|e| self.error(format!("{method} {key}: reading the answer: {e}"))),
            Err(ureq::Error::Status(404, _)) if method == "GET" => Ok(None),
            Err(ureq::Error::Status(code, response)) => {
                let text = read_body(response).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                let detail = [xml_element(&text, "Code"), xml_element(&text, "Message")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                Err(self.error(format!("{method} {key}: HTTP {code} {detail}").trim_end().to_string()))
            }
            Err(ureq::Error::Transport(e)) => Err(self.error(format!("{method} {key}: {e}"))),
        }
    }
}

/// The text of the first `<name>…</name>` in an S3 error document.
fn xml_element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("<{name}>"))? + name.len() + 2;
    let len = text[start..].find(&format!("</{name}>"))?;
    Some(&text[start..start + len])
}

impl ExternalStorage for S3Storage {
    fn write(&self, name: &str, data: &[u8], timeout: Duration) -> Result<()> {
        self.request("PUT", name, data, timeout).map(drop)
    }

    fn read(&self, name: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.request("GET", name, &[], timeout)
    }

    fn url(&self) -> &str {
        &self.target.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(f: impl FnOnce(&mut S3)) -> S3 {
        let mut s3 = S3::new();
        s3.set_bucket("logs".into());
        s3.set_prefix("/cluster-1/pitr/".into());
        f(&mut s3);
        s3
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn decodes_endpoint_style_prefix_and_region_like_br() {
        let t = S3Target::from_backend(
            &backend(|s| {
                s.set_endpoint("http://127.0.0.1:9000/".into());
                s.set_force_path_style(true);
            }),
            no_env,
        )
        .unwrap();
        assert_eq!((t.scheme.as_str(), t.host.as_str(), t.base_path.as_str()), ("http", "127.0.0.1:9000", "/logs"));
        assert_eq!(t.key_prefix, "cluster-1/pitr/");
        assert_eq!(t.region, "us-east-1");
        assert_eq!(t.credentials, None);
        assert_eq!(t.url, "s3://logs/cluster-1/pitr at http://127.0.0.1:9000/");

        let aws = S3Target::from_backend(&backend(|s| s.set_region("eu-west-1".into())), no_env).unwrap();
        assert_eq!(
            (aws.scheme.as_str(), aws.host.as_str(), aws.base_path.as_str()),
            ("https", "logs.s3.eu-west-1.amazonaws.com", "")
        );

        let dotted = S3Target::from_backend(&backend(|s| s.set_bucket("my.logs".into())), no_env).unwrap();
        assert_eq!((dotted.host.as_str(), dotted.base_path.as_str()), ("s3.us-east-1.amazonaws.com", "/my.logs"));

        let no_prefix = S3Target::from_backend(&backend(|s| s.set_prefix(String::new())), no_env).unwrap();
        assert_eq!(no_prefix.key_prefix, "");
    }

    #[test]
    fn put_headers_carry_class_encryption_and_acl() {
        let t = S3Target::from_backend(
            &backend(|s| {
                s.set_sse("aws:kms".into());
                s.set_sse_kms_key_id("key-1".into());
                s.set_storage_class("STANDARD_IA".into());
            }),
            no_env,
        )
        .unwrap();
        assert_eq!(
            t.put_headers,
            [
                ("x-amz-storage-class".to_string(), "STANDARD_IA".to_string()),
                ("x-amz-server-side-encryption".into(), "aws:kms".into()),
                ("x-amz-server-side-encryption-aws-kms-key-id".into(), "key-1".into()),
            ]
        );
    }

    #[test]
    fn credentials_come_from_the_backend_first_then_the_environment() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("ENV-AK".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("ENV-SK".to_string()),
            "AWS_SESSION_TOKEN" => Some("ENV-TOKEN".to_string()),
            _ => None,
        };
        let from_env = S3Target::from_backend(&backend(|_| {}), env).unwrap().credentials.unwrap();
        assert_eq!(
            (from_env.access_key.as_str(), from_env.secret_key.as_str(), from_env.session_token.as_deref()),
            ("ENV-AK", "ENV-SK", Some("ENV-TOKEN"))
        );
        let stored = backend(|s| {
            s.set_access_key("AK".into());
            s.set_secret_access_key("SK-SECRET".into());
        });
        let from_backend = S3Target::from_backend(&stored, env).unwrap().credentials.unwrap();
        assert_eq!((from_backend.access_key.as_str(), from_backend.session_token.as_deref()), ("AK", None));
        let shown = format!("{:?}", S3Target::from_backend(&stored, env).unwrap());
        assert!(!shown.contains("SK-SECRET"), "{shown}");
    }

    #[test]
    fn bad_backends_say_what_is_wrong_without_secrets() {
        let cases: [(S3, &str); 5] = [
            (backend(|s| s.set_bucket(String::new())), "no bucket"),
            (backend(|s| s.set_endpoint("127.0.0.1:9000".into())), "needs an http:// or https:// scheme"),
            (backend(|s| s.set_endpoint("http://".into())), "has no host"),
            (backend(|s| s.set_secret_access_key("SK-SECRET".into())), "no access_key"),
            (backend(|s| s.set_access_key("AK".into())), "no secret_access_key"),
        ];
        for (s3, wanted) in cases {
            let err = S3Target::from_backend(&s3, no_env).unwrap_err().to_string();
            assert!(err.contains(wanted) && !err.contains("SK-SECRET"), "{err}");
        }
        let role = backend(|s| s.set_role_arn("arn:aws:iam::1:role/r".into()));
        assert!(matches!(S3Target::from_backend(&role, no_env), Err(Error::StorageUnsupported { .. })));
    }

    #[test]
    fn s3_error_documents_are_read() {
        let doc = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message></Error>";
        assert_eq!(xml_element(doc, "Code"), Some("SignatureDoesNotMatch"));
        assert_eq!(xml_element(doc, "Message"), Some("The request signature we calculated does not match"));
        assert_eq!(xml_element("<html>", "Code"), None);
    }
}
