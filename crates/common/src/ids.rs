//! Time-ordered unique 64-bit ids (Snowflake layout).
//!
//! `| 42 bits: ms since 2024-01-01 | 10 bits: node | 12 bits: sequence |`. Ids from one
//! generator strictly increase, even if the wall clock steps back (the generator then runs
//! ahead of the clock until it catches up). Different nodes must use different node ids.

use std::sync::Mutex;

/// 2024-01-01T00:00:00Z in ms since the Unix epoch.
const EPOCH_MS: u64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;

/// Hands out strictly increasing ids.
#[derive(Debug)]
pub struct IdGenerator {
    node_id: u64,
    /// The last id handed out; the next is always greater.
    last: Mutex<u64>,
}

impl IdGenerator {
    /// Returns a generator for `node_id` (only its low 10 bits are used).
    pub fn new(node_id: u16) -> Self {
        Self {
            node_id: u64::from(node_id) & ((1 << NODE_BITS) - 1),
            last: Mutex::new(0),
        }
    }

    /// Returns a generator with a random node id, for single-instance use.
    pub fn random() -> Self {
        Self::new(rand::random::<u16>())
    }

    /// Returns the next id.
    pub fn next_id(&self) -> u64 {
        let now = crate::now_ms().saturating_sub(EPOCH_MS);
        let candidate = (now << (NODE_BITS + SEQUENCE_BITS)) | (self.node_id << SEQUENCE_BITS);
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let id = if candidate > *last {
            candidate
        } else {
            // Same millisecond (or the clock went back): bump the sequence, borrowing from
            // the timestamp when the sequence is exhausted.
            let next = *last + 1;
            let node_mask = ((1u64 << NODE_BITS) - 1) << SEQUENCE_BITS;
            if next & node_mask != self.node_id << SEQUENCE_BITS {
                // Sequence overflowed into the node bits: move to the next millisecond.
                (((next >> (NODE_BITS + SEQUENCE_BITS)) + 1) << (NODE_BITS + SEQUENCE_BITS))
                    | (self.node_id << SEQUENCE_BITS)
            } else {
                next
            }
        };
        *last = id;
        id
    }

    /// Returns the ms-since-Unix-epoch timestamp embedded in an id.
    pub fn timestamp_ms(id: u64) -> u64 {
        (id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_strictly_increase_and_keep_their_node() {
        let generator = IdGenerator::new(5);
        let mut previous = 0;
        for _ in 0..100_000 {
            let id = generator.next_id();
            assert!(id > previous);
            assert_eq!((id >> SEQUENCE_BITS) & ((1 << NODE_BITS) - 1), 5);
            previous = id;
        }
        let ts = IdGenerator::timestamp_ms(previous);
        assert!(ts.abs_diff(crate::now_ms()) < 60_000);
    }
}
