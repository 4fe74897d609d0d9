//! Text from peers shown to people: task names, pause reasons, errors and storage URLs come
//! from etcd and are printed to terminals and logs, so control characters are escaped (a
//! newline would forge a log line, an escape sequence would drive the terminal) and the
//! credentials a URL may carry are hidden.

use std::borrow::Cow;

/// `s` with every control character escaped as Rust writes it (`\n`, `\u{1b}`).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect())
}

/// A URL with the `user:password@` of its authority replaced by `***@`
/// (`hdfs://user:pass@nn:8020/logs` → `hdfs://***@nn:8020/logs`); anything else unchanged.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else { return Cow::Borrowed(url) };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => Cow::Owned(format!("{scheme}://***{}", &rest[at..])),
        None => Cow::Borrowed(url),
    }
}

/// Both of the above: for any URL that came from outside.
pub fn shown_url(url: &str) -> String {
    printable(&redact_url(url)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("t1"), "t1");
        assert_eq!(printable("a\nINFO forged\u{1b}[2J\u{7f}é"), "a\\nINFO forged\\u{1b}[2J\\u{7f}é");
    }

    #[test]
    fn credentials_are_hidden() {
        assert_eq!(redact_url("hdfs://user:pass@nn:8020/logs"), "hdfs://***@nn:8020/logs");
        assert_eq!(redact_url("http://a:b@c@minio:9000"), "http://***@minio:9000");
        assert_eq!(redact_url("s3://bucket/p@th"), "s3://bucket/p@th");
        assert_eq!(redact_url("local:///tmp/x"), "local:///tmp/x");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(shown_url("hdfs://u:p@nn/\n"), "hdfs://***@nn/\\n");
    }
}
