//! Memcomparable byte encoding, exactly as TiKV (`codec::byte`) and TiDB (`util/codec`)
//! encode region boundaries in PD and in flush events.
//!
//! The input is cut into 8-byte groups; each group is written right-padded with zeros and
//! followed by a marker `0xFF - pad`. A final group is always written, so the empty key
//! encodes to `00×8 F7`. The encoding preserves byte order, which is what lets PD compare
//! encoded keys while the advancer thinks in raw keys.

const GROUP: usize = 8;
const MARKER: u8 = 0xFF;
const PAD: u8 = 0x00;

/// Encodes a raw key into its memcomparable form.
pub fn encode_bytes(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((raw.len() / GROUP + 1) * (GROUP + 1));
    for chunk in raw.chunks(GROUP) {
        if chunk.len() < GROUP {
            break;
        }
        out.extend_from_slice(chunk);
        out.push(MARKER);
    }
    let tail = &raw[raw.len() / GROUP * GROUP..];
    let pad = GROUP - tail.len();
    out.extend_from_slice(tail);
    out.extend(std::iter::repeat(PAD).take(pad));
    out.push(MARKER - pad as u8);
    out
}

/// Why an encoded key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a group.
    Truncated,
    /// A marker announced more than 8 pad bytes.
    BadMarker(u8),
    /// The pad bytes of the last group were not zero.
    BadPadding,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "encoded key ends inside a group"),
            DecodeError::BadMarker(m) => write!(f, "group marker {m:#04x} implies more than 8 pad bytes"),
            DecodeError::BadPadding => write!(f, "pad bytes of the last group are not zero"),
        }
    }
}

/// Decodes a memcomparable key. Bytes after the terminating group (a timestamp suffix, for
/// example) are ignored, as TiDB's `DecodeBytes` does.
pub fn decode_bytes(encoded: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(encoded.len() / (GROUP + 1) * GROUP);
    decode_bytes_into(encoded, &mut out)?;
    Ok(out)
}

/// [`decode_bytes`] appending to `out`, which is left as it was on an error: many keys can
/// share one buffer.
pub fn decode_bytes_into(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let before = out.len();
    let decoded = decode_groups(encoded, out);
    if decoded.is_err() {
        out.truncate(before);
    }
    decoded
}

fn decode_groups(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let mut rest = encoded;
    loop {
        if rest.len() < GROUP + 1 {
            return Err(DecodeError::Truncated);
        }
        let (group, after) = rest.split_at(GROUP + 1);
        let marker = group[GROUP];
        let pad = (MARKER - marker) as usize;
        if pad == 0 {
            out.extend_from_slice(&group[..GROUP]);
            rest = after;
            continue;
        }
        if pad > GROUP {
            return Err(DecodeError::BadMarker(marker));
        }
        let real = GROUP - pad;
        if group[real..GROUP].iter().any(|&b| b != PAD) {
            return Err(DecodeError::BadPadding);
        }
        out.extend_from_slice(&group[..real]);
        return Ok(());
    }
}

/// Encodes the end of a scan range: empty stays empty (+∞). TiDB encodes an empty *start*
/// key (use [`encode_bytes`]) but never an empty end.
pub fn encode_end_key(raw: &[u8]) -> Vec<u8> {
    if raw.is_empty() {
        Vec::new()
    } else {
        encode_bytes(raw)
    }
}

/// Decodes a region boundary, where the empty key stays empty (−∞ or +∞).
pub fn decode_boundary(encoded: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if encoded.is_empty() {
        Ok(Vec::new())
    } else {
        decode_bytes(encoded)
    }
}

/// [`decode_boundary`] appending to `out` (left as it was on an error).
pub fn decode_boundary_into(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    if encoded.is_empty() {
        Ok(())
    } else {
        decode_bytes_into(encoded, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_tidb() {
        assert_eq!(encode_bytes(b""), vec![0, 0, 0, 0, 0, 0, 0, 0, 0xF7]);
        assert_eq!(encode_bytes(b"abc"), vec![0x61, 0x62, 0x63, 0, 0, 0, 0, 0, 0xFA]);
        let mut eight = b"abcdefgh".to_vec();
        eight.push(0xFF);
        eight.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xF7]);
        assert_eq!(encode_bytes(b"abcdefgh"), eight);
    }

    #[test]
    fn round_trips_and_keeps_order() {
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"a".to_vec(),
            b"abcdefg".to_vec(),
            b"abcdefgh".to_vec(),
            b"abcdefgh\0".to_vec(),
            b"abcdefghi".to_vec(),
            vec![0xFF; 17],
        ];
        for k in &keys {
            assert_eq!(&decode_bytes(&encode_bytes(k)).unwrap(), k);
        }
        for a in &keys {
            for b in &keys {
                assert_eq!(a.cmp(b), encode_bytes(a).cmp(&encode_bytes(b)), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn ignores_suffix_and_rejects_garbage() {
        let mut with_ts = encode_bytes(b"key");
        with_ts.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_bytes(&with_ts).unwrap(), b"key");
        assert_eq!(decode_bytes(b"abc"), Err(DecodeError::Truncated));
        assert_eq!(decode_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0x01]), Err(DecodeError::BadMarker(1)));
        assert_eq!(decode_bytes(&[b'a', 1, 2, 0, 0, 0, 0, 0, 0xF9]), Err(DecodeError::BadPadding));
        assert_eq!(decode_boundary(b"").unwrap(), b"");
        assert_eq!(encode_end_key(b""), b"");
    }

    #[test]
    fn decoding_into_a_shared_buffer_appends_and_leaves_it_whole_on_garbage() {
        let mut keys = b"kept".to_vec();
        decode_boundary_into(&encode_bytes(b"t1_r"), &mut keys).unwrap();
        decode_boundary_into(b"", &mut keys).unwrap();
        assert_eq!(keys, b"keptt1_r");
        // A full first group, then garbage: the group already copied is taken back.
        let mut garbage = encode_bytes(b"0123456789");
        garbage.truncate(GROUP + 1 + 3);
        assert_eq!(decode_boundary_into(&garbage, &mut keys), Err(DecodeError::Truncated));
        assert_eq!(keys, b"keptt1_r");
    }
}
