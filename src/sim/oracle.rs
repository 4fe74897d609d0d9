//! Ground truth: up to which ts every key is really flushed. Kept per region as pieces over
//! the region's raw key range, because a merge joins ranges flushed to different points and
//! the oracle must not forget the higher one (a checkpoint there is legitimately higher).

use crate::types::{KeyRange, Ts};

use super::model::Key;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truth {
    /// The whole region is flushed up to this ts (the common case: one alloc-free word).
    Uniform(Ts),
    /// Sorted `(piece start, ts)`; the first piece starts at the region start and each piece
    /// ends where the next begins (the last at the region end). Adjacent values differ.
    Pieces(Box<[(Key, Ts)]>),
}

impl Truth {
    /// Every key of the region is now flushed at least up to `ts`.
    pub fn raise(&mut self, ts: Ts) {
        match self {
            Truth::Uniform(t) => *t = (*t).max(ts),
            Truth::Pieces(pieces) => {
                let raised = pieces.iter().map(|(k, t)| (k.clone(), (*t).max(ts))).collect();
                *self = Truth::from_pieces(raised);
            }
        }
    }

    /// The lowest truth over the keys of `query` inside the region `[start, end)`; `None`
    /// when they do not overlap.
    pub fn min_within(&self, start: &Key, end: &Key, query: &KeyRange) -> Option<Ts> {
        if !overlaps(start, end, query) {
            return None;
        }
        match self {
            Truth::Uniform(t) => Some(*t),
            Truth::Pieces(pieces) => pieces
                .iter()
                .enumerate()
                .filter(|(i, (piece_start, _))| {
                    let piece_end = pieces.get(i + 1).map_or(end, |(next, _)| next);
                    overlaps(piece_start, piece_end, query)
                })
                .map(|(_, (_, t))| *t)
                .min(),
        }
    }

    /// Cuts the truth of region `[start, ..)` at `at` (strictly inside the region).
    pub fn split(&self, start: &Key, at: &Key) -> (Truth, Truth) {
        let pieces = self.pieces(start);
        let mut left = Vec::new();
        let mut right = Vec::new();
        for (piece_start, t) in pieces {
            if piece_start < *at {
                left.push((piece_start, t));
            } else {
                right.push((piece_start, t));
            }
        }
        // The piece covering `at` continues on the right side.
        if right.first().map_or(true, |(k, _)| k != at) {
            let covering = left.last().map(|(_, t)| *t).expect("the first piece starts before the split key");
            right.insert(0, (at.clone(), covering));
        }
        (Truth::from_pieces(left), Truth::from_pieces(right))
    }

    /// The truth of two adjacent regions joined (`left` starts at `left_start`, `right` at
    /// `right_start`, which is where `left` ends).
    pub fn join(&self, left_start: &Key, right: &Truth, right_start: &Key) -> Truth {
        let mut pieces = self.pieces(left_start);
        pieces.extend(right.pieces(right_start));
        Truth::from_pieces(pieces)
    }

    fn pieces(&self, start: &Key) -> Vec<(Key, Ts)> {
        match self {
            Truth::Uniform(t) => vec![(start.clone(), *t)],
            Truth::Pieces(pieces) => pieces.to_vec(),
        }
    }

    fn from_pieces(mut pieces: Vec<(Key, Ts)>) -> Truth {
        pieces.dedup_by(|later, earlier| later.1 == earlier.1);
        match pieces.as_slice() {
            [(_, t)] => Truth::Uniform(*t),
            _ => Truth::Pieces(pieces.into_boxed_slice()),
        }
    }
}

/// `[start, end)` (empty end = +inf) overlaps `query`, without allocating a `KeyRange`: the
/// oracle runs this once per region.
pub fn overlaps(start: &[u8], end: &[u8], query: &KeyRange) -> bool {
    (query.end.is_empty() || start < query.end.as_slice()) && (end.is_empty() || query.start.as_slice() < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::from(s.as_bytes())
    }

    #[test]
    fn merge_keeps_both_sides_and_flush_collapses() {
        let (a, m, z) = (key("a"), key("m"), key(""));
        let joined = Truth::Uniform(10).join(&a, &Truth::Uniform(20), &m);
        assert_eq!(joined.min_within(&a, &z, &KeyRange::full()), Some(10));
        assert_eq!(joined.min_within(&a, &z, &KeyRange::new("n", "")), Some(20));
        assert_eq!(joined.min_within(&a, &z, &KeyRange::new("b", "n")), Some(10));
        assert_eq!(joined.min_within(&a, &z, &KeyRange::new("", "a")), None);

        let (left, right) = joined.split(&a, &key("p"));
        assert_eq!(left, joined, "both pieces stay on the left");
        assert_eq!(right, Truth::Uniform(20));
        let (left, right) = joined.split(&a, &key("m"));
        assert_eq!((left, right), (Truth::Uniform(10), Truth::Uniform(20)));

        let mut raised = joined.clone();
        raised.raise(15);
        assert_eq!(raised.min_within(&a, &z, &KeyRange::full()), Some(15));
        raised.raise(30);
        assert_eq!(raised, Truth::Uniform(30));
        assert_eq!(Truth::Uniform(5).join(&a, &Truth::Uniform(5), &m), Truth::Uniform(5));
    }
}
