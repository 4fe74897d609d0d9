//! The status endpoint: a tiny HTTP/1.0 server on its own thread serving `/metrics`
//! (Prometheus text), `/status` (JSON) and `POST /owner/resign`. Requests are answered from
//! what the ticker publishes (plus, for `/status`, a region lookup per task and the current
//! owner), so a scrape never waits for a tick.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::worker::{StopToken, Worker};

/// An answer: `(status code, content type, body)`.
pub type Reply = (u16, &'static str, String);

/// Answers `(method, path)`, or `None` for 404.
pub type Handler = Arc<dyn Fn(&str, &str) -> Option<Reply> + Send + Sync>;

pub struct StatusServer {
    addr: SocketAddr,
    _worker: Worker,
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
        let worker = Worker::spawn("sh-status", move |stop| serve(listener, handler, stop))?;
        log::info!("status server listening on http://{bound} (/metrics, /status)");
        Ok(StatusServer { addr: bound, _worker: worker })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(listener: TcpListener, handler: Handler, stop: StopToken) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, &handler) {
                    log::debug!("status request failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.sleep(Duration::from_millis(50)) {
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

fn answer(stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read the headers too: closing a socket with unread input sends a reset, which can
    // destroy the response before the client reads it.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("GET").to_string();
    let path = words.next().unwrap_or("/").split('?').next().unwrap_or("/").to_string();
    let (code, content_type, body) = handler(&method, &path).unwrap_or_else(|| {
        (404, "text/plain", format!("no such page {path}; try /metrics, /status or POST /owner/resign\n"))
    });
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A blocking GET for tests and the demo: returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A blocking request without a body: returns (status code, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_pages_and_404() {
        let handler: Handler = Arc::new(|method, path| match (method, path) {
            ("GET", "/status") => Some((200, "application/json", "{\"ok\":true}".to_string())),
            ("POST", "/poke") => Some((409, "text/plain", "no\n".to_string())),
            _ => None,
        });
        let server = StatusServer::start("127.0.0.1:0", handler).unwrap();
        assert_eq!(http_get(server.addr(), "/status").unwrap(), (200, "{\"ok\":true}".to_string()));
        assert_eq!(http_request(server.addr(), "POST", "/poke").unwrap(), (409, "no\n".to_string()));
        assert_eq!(http_get(server.addr(), "/nope").unwrap().0, 404);
        assert!(StatusServer::start("256.0.0.1:1", Arc::new(|_, _| None))
            .err()
            .unwrap()
            .to_string()
            .contains("256.0.0.1:1"));
    }
}
