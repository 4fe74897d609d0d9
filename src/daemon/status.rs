//! The status endpoint: a small HTTP/1.1 server serving `/metrics` (Prometheus text),
//! `/status` (JSON) and `POST /owner/resign`. Requests are answered from what the ticker
//! publishes (plus, for `/status`, a region lookup per task and the current owner), so a
//! scrape never waits for a tick.
//!
//! It has no authentication: bind it to a private address. Its clients are not trusted: the
//! request head is parsed by `httparse` (hyper's parser) from at most [`MAX_HEAD`] bytes, a
//! body of more than [`MAX_BODY`] bytes is refused, each connection has [`REQUEST_DEADLINE`]
//! to send its request, and a fixed pool of [`WORKERS`] threads answers them, so a slow or
//! oversized client costs one worker for a bounded time and never the others. Connections
//! beyond what the pool and its queue hold get 503 at once. Paths are never echoed back.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TrySendError};

use crate::error::{Error, Result};
use crate::worker::{StopToken, Worker};

/// Threads answering requests; connections wait in a queue of [`QUEUED`] for one.
pub const WORKERS: usize = 4;
const QUEUED: usize = 16;
/// Request line plus headers; `/metrics` scrapers send a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// None of the routes reads a body.
pub const MAX_BODY: u64 = 1024;
/// Time a client has to send its whole request, and to take the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
const MAX_HEADERS: usize = 32;
/// How long the acceptor gives a client it turns away: a flood of them slows accepting,
/// which is the point.
const BUSY_WAIT: Duration = Duration::from_millis(50);

/// What a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Page {
        code: u16,
        content_type: &'static str,
        body: String,
    },
    NotFound,
    /// The path exists but not for this method; `allow` lists the methods it takes.
    MethodNotAllowed {
        allow: &'static str,
    },
}

impl Reply {
    /// A page that only answers GET (and HEAD, which the server answers as GET without body).
    pub fn get(method: &str, page: impl FnOnce() -> (&'static str, String)) -> Reply {
        match method {
            "GET" | "HEAD" => {
                let (content_type, body) = page();
                Reply::Page { code: 200, content_type, body }
            }
            _ => Reply::MethodNotAllowed { allow: "GET, HEAD" },
        }
    }

    /// An action that only answers POST.
    pub fn post(method: &str, act: impl FnOnce() -> Reply) -> Reply {
        match method {
            "POST" => act(),
            _ => Reply::MethodNotAllowed { allow: "POST" },
        }
    }
}

/// Answers `(method, path without query)`.
pub type Handler = Arc<dyn Fn(&str, &str) -> Reply + Send + Sync>;

pub struct StatusServer {
    addr: SocketAddr,
    // The acceptor first: dropping it closes the queue, which ends the workers.
    _acceptor: Worker,
    _workers: Vec<Worker>,
}

impl StatusServer {
    pub fn start(addr: &str, handler: Handler) -> Result<StatusServer> {
        let listener = TcpListener::bind(addr)
            .map_err(|source| Error::Io { what: format!("binding the status address {addr}"), source })?;
        let bound =
            listener.local_addr().map_err(|source| Error::Io { what: "reading the status address".into(), source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Io { what: "configuring the status listener".into(), source })?;
        let (queue, connections) = crossbeam_channel::bounded::<TcpStream>(QUEUED);
        let workers = (0..WORKERS)
            .map(|i| {
                let (connections, handler) = (connections.clone(), handler.clone());
                Worker::spawn(format!("sh-status-{i}"), move |stop| answer_all(&connections, &handler, &stop))
            })
            .collect::<Result<Vec<_>>>()?;
        let acceptor = Worker::spawn("sh-status", move |stop| accept_all(&listener, &queue, &stop))?;
        log::info!("status server listening on http://{bound} (/metrics, /status; no authentication)");
        Ok(StatusServer { addr: bound, _acceptor: acceptor, _workers: workers })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn accept_all(listener: &TcpListener, queue: &crossbeam_channel::Sender<TcpStream>, stop: &StopToken) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => match queue.try_send(stream) {
                Ok(()) => {}
                Err(TrySendError::Full(stream)) => {
                    log::debug!("status server busy: {peer} answered 503");
                    refuse_busy(stream);
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.sleep(Duration::from_millis(20)) {
                    return;
                }
            }
            Err(e) => {
                log::warn!("status server accept failed: {e}");
                if stop.sleep(Duration::from_millis(200)) {
                    return;
                }
            }
        }
    }
}

/// Answers 503 from the acceptor, which waits for no client longer than [`BUSY_WAIT`].
fn refuse_busy(mut stream: TcpStream) {
    // Take in what the client has sent so far: closing with unread input would reset the
    // connection and could destroy the answer before the client reads it.
    // A client slower than that (a loaded machine) is answered all the same, and what it
    // sends after the answer is drained for a moment for the same reason.
    let mut head = [0u8; MAX_HEAD];
    let blocking = stream.set_nonblocking(false).and_then(|()| stream.set_read_timeout(Some(BUSY_WAIT)));
    if blocking.is_err() || stream.set_write_timeout(Some(BUSY_WAIT)).is_err() {
        return;
    }
    let _ = stream.read(&mut head);
    if write_reply(&stream, 503, "Service Unavailable", &[], "text/plain", "busy\n", false).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.read(&mut head);
    }
}

fn answer_all(connections: &Receiver<TcpStream>, handler: &Handler, stop: &StopToken) {
    loop {
        crossbeam_channel::select! {
            recv(connections) -> stream => match stream {
                Ok(stream) => {
                    if let Err(e) = answer(&stream, handler) {
                        log::debug!("status request failed: {e}");
                    }
                }
                Err(_) => return,
            },
            recv(stop.receiver()) -> _ => return,
        }
    }
}

/// A request the server refuses before any route sees it.
struct Refusal(u16, &'static str);

fn answer(mut stream: &TcpStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let (code, reason, allow, content_type, body, head_only) = match read_request(stream, deadline)? {
        Err(Refusal(code, reason)) => (code, reason, None, "text/plain", format!("{reason}\n"), false),
        Ok((method, path)) => {
            let head_only = method == "HEAD";
            match handler(&method, &path) {
                Reply::Page { code, content_type, body } => {
                    (code, reason_of(code), None, content_type, body, head_only)
                }
                Reply::NotFound => (
                    404,
                    "Not Found",
                    None,
                    "text/plain",
                    "no such page; try /metrics, /status or POST /owner/resign\n".into(),
                    head_only,
                ),
                Reply::MethodNotAllowed { allow } => {
                    (405, "Method Not Allowed", Some(allow), "text/plain", "method not allowed\n".into(), head_only)
                }
            }
        }
    };
    let allow: Vec<(&str, &str)> = allow.map(|a| ("Allow", a)).into_iter().collect();
    write_reply(stream, code, reason, &allow, content_type, &body, head_only)?;
    // Closing with unread input would reset the connection and could destroy the answer
    // before the client reads it: say we are done, then drain a little of what is left.
    stream.shutdown(Shutdown::Write)?;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if remaining(deadline).is_none() || stream.set_read_timeout(remaining(deadline)).is_err() {
            break;
        }
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    Ok(())
}

/// The reason phrase of the codes routes answer.
fn reason_of(code: u16) -> &'static str {
    match code {
        200 => "OK",
        409 => "Conflict",
        _ => "",
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// Reads one request head (and the small body it may declare) within `deadline`: the method
/// and the path without its query, or why it is refused.
fn read_request(
    mut stream: &TcpStream,
    deadline: Instant,
) -> std::io::Result<std::result::Result<(String, String), Refusal>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        let Some(left) = remaining(deadline) else { return Ok(Err(Refusal(408, "Request Timeout"))) };
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Ok(Err(Refusal(408, "Request Timeout")))
            }
            Err(e) => return Err(e),
        };
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(_)) => return Ok(route_of(&request)),
            Ok(httparse::Status::Partial) if filled == buf.len() => {
                return Ok(Err(Refusal(431, "Request Header Fields Too Large")))
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Ok(Err(Refusal(431, "Request Header Fields Too Large"))),
            Err(_) => return Ok(Err(Refusal(400, "Bad Request"))),
        }
    }
}

fn route_of(request: &httparse::Request) -> std::result::Result<(String, String), Refusal> {
    let header = |name: &str| request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if header("transfer-encoding").is_some() {
        return Err(Refusal(411, "Length Required"));
    }
    if let Some(length) = header("content-length") {
        let length = std::str::from_utf8(length).ok().and_then(|l| l.trim().parse::<u64>().ok());
        match length {
            None => return Err(Refusal(400, "Bad Request")),
            Some(l) if l > MAX_BODY => return Err(Refusal(413, "Content Too Large")),
            Some(_) => {}
        }
    }
    let (Some(method), Some(target)) = (request.method, request.path) else { return Err(Refusal(400, "Bad Request")) };
    let path = target.split('?').next().unwrap_or_default();
    Ok((method.to_string(), path.to_string()))
}

fn write_reply(
    mut stream: &TcpStream,
    code: u16,
    reason: &str,
    extra: &[(&str, &str)],
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out =
        format!("HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// A blocking GET for tests and the demo: returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A blocking request without a body: returns (status code, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_raw(addr, &format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"))
}

/// Sends `request` as is and returns (status code, body), for tests of odd requests.
pub fn http_raw(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_server() -> StatusServer {
        let handler: Handler = Arc::new(|method, path| match path {
            "/status" => Reply::get(method, || ("application/json", "{\"ok\":true}".to_string())),
            "/poke" => {
                Reply::post(method, || Reply::Page { code: 409, content_type: "text/plain", body: "no\n".into() })
            }
            _ => Reply::NotFound,
        });
        StatusServer::start("127.0.0.1:0", handler).unwrap()
    }

    #[test]
    fn serves_pages_and_404() {
        let server = json_server();
        assert_eq!(http_get(server.addr(), "/status?x=1").unwrap(), (200, "{\"ok\":true}".to_string()));
        assert_eq!(http_get(server.addr(), "/nope").unwrap().0, 404);
        assert_eq!(http_request(server.addr(), "POST", "/poke").unwrap(), (409, "no\n".to_string()));
        assert_eq!(http_get(server.addr(), "/poke").unwrap().0, 405);
        assert!(StatusServer::start("256.0.0.1:1", Arc::new(|_, _| Reply::NotFound))
            .err()
            .unwrap()
            .to_string()
            .contains("256.0.0.1:1"));
    }

    #[test]
    fn wrong_methods_get_405_and_paths_are_not_echoed() {
        let server = json_server();
        let addr = server.addr();
        let (code, _) = http_raw(addr, "POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(code, 405);
        let (code, body) = http_get(addr, "/%1b[31mforged<script>").unwrap();
        assert_eq!(code, 404);
        assert!(!body.contains("forged") && !body.contains("script"), "{body}");
        assert_eq!(http_raw(addr, "BLAH\r\n\r\n").unwrap().0, 400);
        let (code, body) = http_raw(addr, "HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((code, body.as_str()), (200, ""));
        let big = format!("POST /status HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(http_raw(addr, &big).unwrap().0, 413);
    }

    #[test]
    fn an_endless_request_head_is_cut_off() {
        let server = json_server();
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /status HTTP/1.1\r\nX-Long: ").unwrap();
        // The old server buffered a header line without limit (512 MiB grew the process by
        // 557 MB). Kernel buffers take a few MiB; the server must stop reading well before 64.
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent < 64 << 20, "the server read {sent} bytes of one header");
        // The others are still served.
        assert_eq!(http_get(server.addr(), "/status").unwrap().0, 200);
    }

    #[test]
    fn a_slow_client_does_not_block_the_others() {
        let server = json_server();
        let mut slow = TcpStream::connect(server.addr()).unwrap();
        slow.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
        // The old server answered one connection at a time: this waited for the slow one to
        // time out and close.
        assert_eq!(http_get(server.addr(), "/status").unwrap().0, 200);
        slow.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let still_open = matches!(slow.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "the slow client was dropped before the fast one was served");
        // It is not kept forever either: it gets 408 by the request deadline.
        slow.set_nonblocking(false).unwrap();
        slow.set_read_timeout(Some(REQUEST_DEADLINE * 3)).unwrap();
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }

    #[test]
    fn connections_beyond_the_pool_get_503_not_threads() {
        let server = json_server();
        let slow: Vec<TcpStream> = (0..WORKERS + QUEUED + 4)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr()).unwrap();
                s.write_all(b"GET").unwrap();
                s
            })
            .collect();
        // Every worker is held by a slow client and the queue is full: the next one is
        // answered 503 at once (the old server queued it behind the others).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut code = 0;
        while Instant::now() < deadline {
            code = http_get(server.addr(), "/status").unwrap_or((0, String::new())).0;
            if code == 503 {
                break;
            }
        }
        assert_eq!(code, 503);
        drop(slow);
    }
}
