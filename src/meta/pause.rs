//! The pause flag. Its existence means paused; its value is empty (legacy) or the JSON
//! `PauseV2` record that TiDB and TiKV agree on.

use protobuf::Message;
use serde::{Deserialize, Serialize};

use crate::proto::brpb::StreamBackupError;

pub const TEXT_PAYLOAD: &str = "text/plain;charset=UTF-8";
pub const ERROR_PAYLOAD: &str = "application/x-protobuf;messagetype=brpb.StreamBackupError";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    #[serde(rename = "MANUAL")]
    Manual,
    #[serde(rename = "ERROR")]
    Error,
}

/// The JSON value of a pause key (field names are the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseV2 {
    pub severity: Severity,
    pub operation_hostname: String,
    pub operation_pid: i64,
    /// RFC 3339.
    pub operation_time: String,
    #[serde(default)]
    pub payload_type: String,
    /// Standard base64 in JSON; `null` when absent.
    #[serde(default, with = "base64_opt")]
    pub payload: Option<Vec<u8>>,
}

/// What a pause payload says.
#[derive(Debug, Clone, PartialEq)]
pub enum PausePayload {
    None,
    Text(String),
    Error(StreamBackupError),
}

impl PauseV2 {
    /// A pause record stamped with this host, process and time.
    pub fn now(severity: Severity) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|e| format!("[err: {e}]"));
        PauseV2 {
            severity,
            operation_hostname: hostname,
            operation_pid: i64::from(std::process::id()),
            operation_time: crate::timefmt::format_rfc3339(std::time::SystemTime::now()),
            payload_type: String::new(),
            payload: None,
        }
    }

    pub fn with_message(mut self, message: &str) -> Self {
        self.payload_type = TEXT_PAYLOAD.into();
        self.payload = Some(message.as_bytes().to_vec());
        self
    }

    pub fn with_error(mut self, error: &StreamBackupError) -> Self {
        self.payload_type = ERROR_PAYLOAD.into();
        self.payload = Some(error.write_to_bytes().expect("encoding a StreamBackupError cannot fail"));
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("PauseV2 always serializes")
    }

    pub fn from_json(value: &[u8]) -> Result<Self, String> {
        let pause: PauseV2 = serde_json::from_slice(value).map_err(|e| format!("not a PauseV2 JSON value: {e}"))?;
        crate::timefmt::parse_rfc3339(&pause.operation_time)?;
        Ok(pause)
    }

    /// Decodes the payload by its MIME type (parameter names are case-insensitive).
    pub fn payload(&self) -> Result<PausePayload, String> {
        let Some(bytes) = &self.payload else { return Ok(PausePayload::None) };
        let mut parts = self.payload_type.split(';').map(str::trim);
        let mime = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<(String, String)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_string()))
            .collect();
        match mime.as_str() {
            "text/plain" => Ok(PausePayload::Text(String::from_utf8_lossy(bytes).into_owned())),
            "application/x-protobuf" => {
                let message_type = params.iter().find(|(k, _)| k == "messagetype").map(|(_, v)| v.as_str());
                match message_type {
                    Some("brpb.StreamBackupError") => StreamBackupError::parse_from_bytes(bytes)
                        .map(PausePayload::Error)
                        .map_err(|e| format!("payload is not a StreamBackupError: {e}")),
                    Some(other) => Err(format!("only type brpb.StreamBackupError is supported ({other})")),
                    None => Err(format!("x-protobuf didn't specify messagetype ({})", self.payload_type)),
                }
            }
            "" => Err(format!("{:?} isn't a valid mime type", self.payload_type)),
            other => Err(format!("unsupported payload type {other}")),
        }
    }
}

/// The pause state read from a pause key's value.
#[derive(Debug, Clone, PartialEq)]
pub enum PauseState {
    /// Empty value, as BR `log pause` of old versions and `PutTask` write.
    Legacy,
    V2(PauseV2),
    /// A value we cannot read. Still a pause: existence decides, as TiKV does.
    Unknown(String),
}

impl PauseState {
    pub fn from_value(value: &[u8]) -> Self {
        if value.is_empty() {
            return PauseState::Legacy;
        }
        match PauseV2::from_json(value) {
            Ok(v2) => PauseState::V2(v2),
            Err(e) => PauseState::Unknown(e),
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            PauseState::Legacy => "paused (no reason recorded)".into(),
            PauseState::Unknown(e) => format!("paused (unreadable pause value: {e})"),
            PauseState::V2(v2) => {
                let reason = match v2.payload() {
                    Ok(PausePayload::None) => String::new(),
                    Ok(PausePayload::Text(t)) => format!(": {t}"),
                    Ok(PausePayload::Error(e)) => format!(": [{}] {}", e.get_error_code(), e.get_error_message()),
                    Err(e) => format!(" (payload unreadable: {e})"),
                };
                format!(
                    "paused ({}) at {} by {} pid {}{reason}",
                    if v2.severity == Severity::Error { "ERROR" } else { "MANUAL" },
                    v2.operation_time,
                    v2.operation_hostname,
                    v2.operation_pid
                )
            }
        }
    }
}

mod base64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        let text = text.trim_end_matches('=');
        let mut out = Vec::with_capacity(text.len() * 3 / 4);
        let mut acc = 0u32;
        let mut bits = 0;
        for c in text.bytes() {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| format!("invalid base64 character {:?}", c as char))?;
            acc = acc << 6 | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        Ok(out)
    }

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_str(&encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?.map(|t| decode(&t).map_err(serde::de::Error::custom)).transpose()
    }

    #[cfg(test)]
    #[test]
    fn round_trips() {
        for (raw, text) in [(&b""[..], ""), (b"f", "Zg=="), (b"fo", "Zm8="), (b"foo", "Zm9v"), (b"foob", "Zm9vYg==")] {
            assert_eq!(encode(raw), text);
            assert_eq!(decode(text).unwrap(), raw);
        }
        assert!(decode("a*b").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_tidb_writes() {
        // A value shaped like TiDB's PauseWithMessage + PauseWithErrorSeverity output.
        let tidb = br#"{"severity":"ERROR","operation_hostname":"tidb-0","operation_pid":42,"operation_time":"2024-05-01T20:00:00+08:00","payload_type":"text/plain;charset=UTF-8","payload":"bGFnIHRvbyBsYXJnZQ=="}"#;
        let pause = PauseV2::from_json(tidb).unwrap();
        assert_eq!(pause.severity, Severity::Error);
        assert_eq!(pause.payload().unwrap(), PausePayload::Text("lag too large".into()));
        assert!(PauseState::from_value(tidb).describe().contains("lag too large"));
    }

    #[test]
    fn error_payloads_round_trip_and_any_value_is_a_pause() {
        let mut err = StreamBackupError::new();
        err.set_error_code("KV:LogBackup:Io".into());
        err.set_error_message("[store = 1] disk full".into());
        let pause = PauseV2::now(Severity::Manual).with_error(&err);
        let back = PauseV2::from_json(&pause.to_json()).unwrap();
        assert_eq!(back.payload().unwrap(), PausePayload::Error(err));
        // TiKV spells the parameter messageType.
        let mut tikv = back.clone();
        tikv.payload_type = "application/x-protobuf;messageType=brpb.StreamBackupError".into();
        assert!(matches!(tikv.payload().unwrap(), PausePayload::Error(_)));
        assert_eq!(PauseState::from_value(b""), PauseState::Legacy);
        assert!(matches!(PauseState::from_value(b"\x08\x01garbage"), PauseState::Unknown(_)));
        let mut bad = back;
        bad.payload_type = "application/json".into();
        assert!(bad.payload().unwrap_err().contains("unsupported"));
    }
}
