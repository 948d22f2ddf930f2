//! Waiting requests: one queue per adapter, each ordered by (priority, arrival), plus an
//! index of every queue's head, so the scheduler finds the next admissible request in
//! O(log n) without scanning requests whose adapter has no slot.

use std::collections::{BTreeMap, BTreeSet};

use crate::FastMap;

use crate::kv::RequestId;
use crate::request::AdapterId;

/// Which queue a request waits in: its adapter, or `None` for the base model.
pub type AdapterKey = Option<AdapterId>;

/// Order among waiting requests: lower priority value first, then earlier arrival.
pub type OrderKey = (i32, u64);

/// Per-adapter waiting queues.
#[derive(Default)]
pub struct WaitingQueues {
    queues: FastMap<AdapterKey, BTreeMap<OrderKey, RequestId>>,
    heads: BTreeSet<(OrderKey, AdapterKey)>,
    len: usize,
}

impl WaitingQueues {
    /// Number of waiting requests.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a request; `key` must be unique.
    pub fn push(&mut self, adapter: AdapterKey, key: OrderKey, id: RequestId) {
        let queue = self.queues.entry(adapter).or_default();
        let old_head = queue.first_key_value().map(|(k, _)| *k);
        queue.insert(key, id);
        self.len += 1;
        if old_head.is_none_or(|h| key < h) {
            if let Some(h) = old_head {
                self.heads.remove(&(h, adapter));
            }
            self.heads.insert((key, adapter));
        }
    }

    /// Removes a request, wherever it stands in its queue.
    pub fn remove(&mut self, adapter: AdapterKey, key: OrderKey) -> Option<RequestId> {
        let queue = self.queues.get_mut(&adapter)?;
        let was_head = queue.first_key_value().is_some_and(|(k, _)| *k == key);
        let id = queue.remove(&key)?;
        self.len -= 1;
        if was_head {
            self.heads.remove(&(key, adapter));
            match queue.first_key_value() {
                Some((k, _)) => {
                    self.heads.insert((*k, adapter));
                }
                None => {
                    self.queues.remove(&adapter);
                }
            }
        }
        Some(id)
    }

    /// The first request of `adapter`'s queue.
    pub fn head(&self, adapter: AdapterKey) -> Option<(OrderKey, RequestId)> {
        let (k, id) = self.queues.get(&adapter)?.first_key_value()?;
        Some((*k, *id))
    }

    /// Every request waiting for `adapter`, in order.
    pub fn ids_of(&self, adapter: AdapterKey) -> Vec<RequestId> {
        self.queues
            .get(&adapter)
            .map_or_else(Vec::new, |q| q.values().copied().collect())
    }

    /// The first waiting request overall.
    /// Each queue's adapter, oldest head first: the order admission considers them in.
    pub fn adapters_in_order(&self) -> impl Iterator<Item = AdapterKey> + '_ {
        self.heads.iter().map(|(_, adapter)| *adapter)
    }

    pub fn first(&self) -> Option<(OrderKey, AdapterKey)> {
        self.heads.first().copied()
    }

    /// The first request among the given adapters' queues.
    pub fn first_among(
        &self,
        adapters: impl IntoIterator<Item = AdapterKey>,
    ) -> Option<(OrderKey, AdapterKey)> {
        adapters
            .into_iter()
            .filter_map(|a| self.head(a).map(|(k, _)| (k, a)))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_track_each_queue() {
        let mut w = WaitingQueues::default();
        w.push(Some(1), (0, 5), 50);
        w.push(Some(2), (0, 3), 30);
        w.push(Some(1), (0, 1), 10);
        w.push(None, (-1, 9), 90);
        assert_eq!(w.first(), Some(((-1, 9), None)));
        assert_eq!(w.first_among([Some(1), Some(2)]), Some(((0, 1), Some(1))));
        assert_eq!(w.remove(Some(1), (0, 1)), Some(10));
        assert_eq!(w.first_among([Some(1), Some(2)]), Some(((0, 3), Some(2))));
        assert_eq!(w.remove(None, (-1, 9)), Some(90));
        assert_eq!(w.remove(Some(2), (0, 3)), Some(30));
        assert_eq!(w.first(), Some(((0, 5), Some(1))));
        assert_eq!(w.len(), 1);
    }
}
