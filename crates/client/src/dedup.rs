//! A bounded window of recently seen ids, for exactly-once display over at-least-once
//! delivery.

use std::collections::{HashMap, VecDeque};

/// Remembers the last `capacity` ids with a small value each (here: how far the message
/// was acknowledged), forgetting the oldest first. Memory stays bounded whatever the
/// traffic; an id older than the window may be shown twice, which only happens when the
/// server redelivers something the client acknowledged `capacity` messages ago.
#[derive(Debug, Clone)]
pub struct DedupWindow<V> {
    capacity: usize,
    order: VecDeque<u64>,
    values: HashMap<u64, V>,
}

impl<V: Copy> DedupWindow<V> {
    /// Returns an empty window remembering at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            order: VecDeque::with_capacity(capacity.min(4096)),
            values: HashMap::with_capacity(capacity.min(4096)),
        }
    }

    /// Records `id`; returns false (and keeps the old value) when it was already in the window.
    pub fn insert(&mut self, id: u64, value: V) -> bool {
        if self.values.contains_key(&id) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.values.remove(&oldest);
        }
        self.order.push_back(id);
        self.values.insert(id, value);
        true
    }

    /// Returns the value of `id` if it is in the window.
    pub fn get(&self, id: u64) -> Option<V> {
        self.values.get(&id).copied()
    }

    /// Replaces the value of `id` if it is in the window; returns whether it was.
    pub fn update(&mut self, id: u64, value: V) -> bool {
        match self.values.get_mut(&id) {
            Some(slot) => {
                *slot = value;
                true
            }
            None => false,
        }
    }

    /// Returns true when `id` is in the window.
    pub fn contains(&self, id: u64) -> bool {
        self.values.contains_key(&id)
    }

    /// Returns how many ids the window holds.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Returns true when the window holds nothing.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_and_keep_their_value() {
        let mut window = DedupWindow::new(8);
        assert!(window.insert(1, 'a'));
        assert!(!window.insert(1, 'b'));
        assert_eq!(window.get(1), Some('a'));
        assert!(window.update(1, 'c'));
        assert_eq!(window.get(1), Some('c'));
        assert!(!window.update(2, 'c'));
    }

    #[test]
    fn the_oldest_ids_are_forgotten_past_capacity() {
        let mut window = DedupWindow::new(3);
        for id in 1..=5 {
            assert!(window.insert(id, ()));
        }
        assert_eq!(window.len(), 3);
        assert!(!window.contains(1));
        assert!(!window.contains(2));
        assert!(window.contains(3) && window.contains(5));
        assert!(window.insert(1, ()), "a forgotten id is new again");
    }

    #[test]
    fn memory_stays_bounded() {
        let mut window = DedupWindow::new(100);
        for id in 0..100_000 {
            window.insert(id, ());
        }
        assert_eq!(window.len(), 100);
        assert_eq!(window.values.len(), 100);
    }
}
