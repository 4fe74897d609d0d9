//! Span boundary keys. Short keys (region keys are ~20 bytes) live inline, so storing one
//! allocates nothing and comparing one reads only the record that holds it.

use std::borrow::Borrow;
use std::cmp::Ordering;

/// Keys up to this length are inline; it makes `Key` exactly 24 bytes, the size of a `Vec`.
const INLINE: usize = 22;

#[derive(Clone)]
pub(super) enum Key {
    Inline { len: u8, buf: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

const _: () = assert!(std::mem::size_of::<Key>() == 24);

impl Key {
    pub(super) fn new(bytes: &[u8]) -> Key {
        if bytes.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Key::Inline { len: bytes.len() as u8, buf }
        } else {
            Key::Boxed(bytes.into())
        }
    }

    /// `self.as_bytes() == key`, rejecting most other keys of the same length by their last
    /// 8 bytes (where region keys differ) before comparing the rest.
    #[inline]
    pub(super) fn is(&self, key: &[u8]) -> bool {
        match self {
            Key::Inline { len, buf } => {
                let len = *len as usize;
                if len != key.len() {
                    return false;
                }
                if len < 8 {
                    return buf[..len] == *key;
                }
                // Three overlapping words cover any inline key of 8 or more bytes (≤ 24).
                let word = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
                let mid = (len - 8).min(8);
                word(buf, len - 8) == word(key, len - 8)
                    && word(buf, 0) == word(key, 0)
                    && word(buf, mid) == word(key, mid)
            }
            Key::Boxed(bytes) => **bytes == *key,
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, buf } => &buf[..*len as usize],
            Key::Boxed(bytes) => bytes,
        }
    }
}

impl Default for Key {
    fn default() -> Self {
        Key::new(&[])
    }
}

// Equality and order are those of the bytes, so `Borrow<[u8]>` lets maps be searched by slice.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    /// The bytes' order. Two inline keys compare as three big-endian words of their
    /// zero-padded buffers, then their lengths: no call to `memcmp`, which the heap, whose
    /// ties on ts fall back to keys, would otherwise make at most of its comparisons. (A
    /// shorter key equal to a longer one up to the padding is its prefix followed by zero
    /// bytes, so it is the smaller.)
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Key::Inline { len: a_len, buf: a }, Key::Inline { len: b_len, buf: b }) => {
                let word =
                    |buf: &[u8; INLINE], at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
                // The last word overlaps the second, on bytes already found equal.
                (word(a, 0).cmp(&word(b, 0)))
                    .then_with(|| word(a, 8).cmp(&word(b, 8)))
                    .then_with(|| word(a, INLINE - 8).cmp(&word(b, INLINE - 8)))
                    .then_with(|| a_len.cmp(b_len))
            }
            _ => self.as_bytes().cmp(other.as_bytes()),
        }
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn keys_order_as_their_bytes() {
        // Zero bytes and prefixes are where a padded comparison could go wrong.
        let mut rng = Rng::new(7);
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], vec![1], vec![0; INLINE], vec![0; INLINE + 1]];
        for _ in 0..2000 {
            let len = rng.below(INLINE as u64 + 4) as usize;
            keys.push((0..len).map(|_| [0, 1, 0xff][rng.below(3) as usize]).collect());
        }
        for a in &keys {
            for b in keys.iter().step_by(7) {
                assert_eq!(Key::new(a).cmp(&Key::new(b)), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
