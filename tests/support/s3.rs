//! A real S3-compatible server for tests: moto's server (PyPI, installed by
//! `scripts/deps.sh`) on a free loopback port, killed when the guard drops. With IAM checks
//! switched on it verifies SigV4 signatures like AWS does.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use streamhelper::storage::sigv4::{self, Credentials};
use streamhelper::testing::free_port;

/// Start-up of the Python server (imports included) on a busy 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const S3_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
/// Signs set-up calls made while IAM checks are off (any key does then).
const SETUP: Credentials = Credentials { access_key: String::new(), secret_key: String::new(), session_token: None };

pub struct MotoServer {
    child: Child,
    port: u16,
}

/// The Python with moto: the system one, or the venv `scripts/deps.sh` makes when the
/// system one has none.
fn python() -> PathBuf {
    let venv = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/streamhelper-moto/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

impl MotoServer {
    pub fn start() -> MotoServer {
        let port = free_port().unwrap();
        let child = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] is needed for these tests (scripts/deps.sh installs it)");
        let mut server = MotoServer { child, port };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let probe =
                ureq::get(&format!("{}/moto-api/data.json", server.endpoint())).timeout(Duration::from_secs(1)).call();
            if probe.is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("moto's server exited at start-up ({status}); is moto[server] installed?");
            }
            assert!(Instant::now() < deadline, "moto's server did not answer within {START_DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Path-style CreateBucket (allowed while IAM checks are off).
    pub fn create_bucket(&self, bucket: &str) {
        ureq::put(&format!("{}/{bucket}", self.endpoint())).timeout(REQUEST_TIMEOUT).call().unwrap();
    }

    /// Turns signature and permission checks on (`true`) or off for every later request.
    pub fn enforce_iam(&self, on: bool) {
        ureq::post(&format!("{}/moto-api/reset-auth", self.endpoint()))
            .timeout(REQUEST_TIMEOUT)
            .send_string(if on { "0" } else { "inf" })
            .unwrap();
    }

    /// An IAM user allowed everything on S3, and its access key (made while checks are off).
    pub fn s3_user(&self, name: &str) -> Credentials {
        let iam = |params: &[(&str, &str)]| self.query("iam", "2010-05-08", &SETUP, params);
        iam(&[("Action", "CreateUser"), ("UserName", name)]);
        iam(&[("Action", "PutUserPolicy"), ("UserName", name), ("PolicyName", "s3"), ("PolicyDocument", S3_POLICY)]);
        let created = iam(&[("Action", "CreateAccessKey"), ("UserName", name)]);
        Credentials {
            access_key: xml_text(&created, "AccessKeyId"),
            secret_key: xml_text(&created, "SecretAccessKey"),
            session_token: None,
        }
    }

    /// Temporary credentials with a session token: `user` assumes a role allowed
    /// everything on S3 (made while checks are off).
    pub fn assumed_role(&self, user_name: &str, user: &Credentials) -> Credentials {
        let trust = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::123456789012:user/{user_name}"}},"Action":"sts:AssumeRole"}}]}}"#
        );
        let iam = |params: &[(&str, &str)]| self.query("iam", "2010-05-08", &SETUP, params);
        iam(&[("Action", "CreateRole"), ("RoleName", "writer"), ("AssumeRolePolicyDocument", &trust)]);
        iam(&[
            ("Action", "PutRolePolicy"),
            ("RoleName", "writer"),
            ("PolicyName", "s3"),
            ("PolicyDocument", S3_POLICY),
        ]);
        let assumed = self.query(
            "sts",
            "2011-06-15",
            user,
            &[
                ("Action", "AssumeRole"),
                ("RoleArn", "arn:aws:iam::123456789012:role/writer"),
                ("RoleSessionName", "advancer"),
            ],
        );
        Credentials {
            access_key: xml_text(&assumed, "AccessKeyId"),
            secret_key: xml_text(&assumed, "SecretAccessKey"),
            session_token: Some(xml_text(&assumed, "SessionToken")),
        }
    }

    /// One Query API call (IAM, STS); moto routes it by the signature's service.
    fn query(&self, service: &str, version: &str, credentials: &Credentials, params: &[(&str, &str)]) -> String {
        let body: String = params
            .iter()
            .chain(&[("Version", version)])
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let headers = sigv4::sign(
            credentials,
            "us-east-1",
            service,
            SystemTime::now(),
            sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: vec![
                    ("host".into(), self.authority()),
                    ("content-type".into(), "application/x-www-form-urlencoded".into()),
                ],
                payload: body.as_bytes(),
            },
        );
        let mut request = ureq::post(&format!("{}/", self.endpoint())).timeout(REQUEST_TIMEOUT);
        for (k, v) in &headers {
            request = request.set(k, v);
        }
        request.send_string(&body).unwrap_or_else(|e| panic!("IAM {params:?}: {e}")).into_string().unwrap()
    }
}

fn xml_text(document: &str, tag: &str) -> String {
    let start =
        document.find(&format!("<{tag}>")).unwrap_or_else(|| panic!("no <{tag}> in {document}")) + tag.len() + 2;
    document[start..start + document[start..].find('<').unwrap()].to_string()
}

fn form_encode(text: &str) -> String {
    sigv4::encode_path(text).replace('/', "%2F")
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
