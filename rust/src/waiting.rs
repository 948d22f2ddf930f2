//! Waiting requests: one queue per adapter, each ordered by (priority, arrival), plus two
//! indexes of the queues' heads: all of them (the order adapters are read ahead in), and those
//! whose adapter is ready to run (the order admission takes them in). The scheduler finds the
//! next admissible request in O(log n), never scanning requests whose adapter is not loaded.

use std::collections::{BTreeMap, BTreeSet};

use crate::FastMap;
use crate::FastSet;

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
    /// The heads of the queues whose adapter is ready (the base model's always is).
    ready_heads: BTreeSet<(OrderKey, AdapterKey)>,
    ready: FastSet<AdapterId>,
    len: usize,
    /// Queues whose first requests [`WaitingQueues::pop_deferred`] took, with their head
    /// before: the indexes are brought up to date by [`WaitingQueues::sync_heads`].
    stale: Vec<(AdapterKey, OrderKey)>,
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

    fn is_ready(&self, adapter: AdapterKey) -> bool {
        adapter.is_none_or(|a| self.ready.contains(&a))
    }

    fn set_head(&mut self, head: (OrderKey, AdapterKey), present: bool) {
        let ready = self.is_ready(head.1);
        if present {
            self.heads.insert(head);
            if ready {
                self.ready_heads.insert(head);
            }
        } else {
            self.heads.remove(&head);
            self.ready_heads.remove(&head);
        }
    }

    /// Marks `adapter`'s weights ready to run (or not): its queue joins (or leaves) admission.
    pub fn set_ready(&mut self, adapter: AdapterId, ready: bool) {
        let changed = if ready {
            self.ready.insert(adapter)
        } else {
            self.ready.remove(&adapter)
        };
        if !changed {
            return;
        }
        if let Some((k, _)) = self.head(Some(adapter)) {
            if ready {
                self.ready_heads.insert((k, Some(adapter)));
            } else {
                self.ready_heads.remove(&(k, Some(adapter)));
            }
        }
    }

    /// Adds a request; `key` must be unique.
    pub fn push(&mut self, adapter: AdapterKey, key: OrderKey, id: RequestId) {
        let queue = self.queues.entry(adapter).or_default();
        let old_head = queue.first_key_value().map(|(k, _)| *k);
        queue.insert(key, id);
        self.len += 1;
        if old_head.is_none_or(|h| key < h) {
            if let Some(h) = old_head {
                self.set_head((h, adapter), false);
            }
            self.set_head((key, adapter), true);
        }
    }

    /// Removes a request, wherever it stands in its queue.
    pub fn remove(&mut self, adapter: AdapterKey, key: OrderKey) -> Option<RequestId> {
        let queue = self.queues.get_mut(&adapter)?;
        let was_head = queue.first_key_value().is_some_and(|(k, _)| *k == key);
        let id = queue.remove(&key)?;
        self.len -= 1;
        if was_head {
            let next = queue.first_key_value().map(|(k, _)| *k);
            if next.is_none() {
                self.queues.remove(&adapter);
            }
            self.set_head((key, adapter), false);
            if let Some(k) = next {
                self.set_head((k, adapter), true);
            }
        }
        Some(id)
    }

    /// Removes the first request of `adapter`'s queue, leaving the head indexes as they were
    /// (one update per queue, not per request, when admission drains a queue):
    /// [`WaitingQueues::sync_heads`] must follow before anything but [`WaitingQueues::head`]
    /// and more of these.
    pub fn pop_deferred(&mut self, adapter: AdapterKey) -> Option<(OrderKey, RequestId)> {
        let queue = self.queues.get_mut(&adapter)?;
        let (key, id) = queue.pop_first()?;
        self.len -= 1;
        if !self.stale.iter().any(|(a, _)| *a == adapter) {
            self.stale.push((adapter, key));
        }
        Some((key, id))
    }

    /// Brings the head indexes up to date after [`WaitingQueues::pop_deferred`].
    pub fn sync_heads(&mut self) {
        for (adapter, old_head) in std::mem::take(&mut self.stale) {
            let next = self.queues[&adapter].first_key_value().map(|(k, _)| *k);
            if next == Some(old_head) {
                continue;
            }
            self.set_head((old_head, adapter), false);
            match next {
                Some(k) => self.set_head((k, adapter), true),
                None => {
                    self.queues.remove(&adapter);
                }
            }
        }
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

    /// Whether any request waits for `adapter`.
    pub fn has(&self, adapter: AdapterKey) -> bool {
        self.queues.contains_key(&adapter)
    }

    /// Each queue's adapter, oldest head first: the order admission considers them in.
    pub fn adapters_in_order(&self) -> impl Iterator<Item = AdapterKey> + '_ {
        self.heads.iter().map(|(_, adapter)| *adapter)
    }

    /// The first waiting request overall, ready or not.
    pub fn first(&self) -> Option<(OrderKey, AdapterKey)> {
        self.heads.first().copied()
    }

    /// Each queue's head whose adapter is ready (the base model's included).
    pub fn ready_heads(&self) -> impl Iterator<Item = (OrderKey, AdapterKey)> + '_ {
        self.ready_heads.iter().copied()
    }

    /// The first waiting request whose adapter is ready.
    pub fn first_ready(&self) -> Option<(OrderKey, AdapterKey)> {
        self.ready_heads.first().copied()
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

    #[test]
    fn deferred_pops_leave_the_indexes_as_removes_do() {
        let mut w = WaitingQueues::default();
        for (adapter, t, id) in [
            (Some(1), 1, 10),
            (Some(2), 2, 20),
            (Some(1), 3, 30),
            (None, 4, 40),
        ] {
            w.push(adapter, (0, t), id);
        }
        w.set_ready(1, true);
        w.set_ready(2, true);
        assert_eq!(w.pop_deferred(Some(1)), Some(((0, 1), 10)));
        assert_eq!(w.pop_deferred(Some(2)), Some(((0, 2), 20)));
        assert_eq!(w.pop_deferred(Some(1)), Some(((0, 3), 30)));
        assert_eq!(w.head(Some(1)), None);
        w.sync_heads();
        assert_eq!(w.len(), 1);
        assert!(!w.has(Some(1)) && !w.has(Some(2)));
        assert_eq!(w.first(), Some(((0, 4), None)));
        assert_eq!(w.first_ready(), Some(((0, 4), None)));
        w.push(Some(1), (0, 5), 50);
        w.push(Some(1), (0, 6), 60);
        assert_eq!(w.pop_deferred(Some(1)), Some(((0, 5), 50)));
        w.sync_heads();
        assert_eq!(
            w.adapters_in_order().collect::<Vec<_>>(),
            vec![None, Some(1)]
        );
        assert_eq!(w.first_ready(), Some(((0, 4), None)));
        assert_eq!(w.remove(None, (0, 4)), Some(40));
        assert_eq!(w.first_ready(), Some(((0, 6), Some(1))));
    }

    #[test]
    fn only_ready_adapters_are_admitted() {
        let mut w = WaitingQueues::default();
        w.push(Some(1), (0, 1), 10);
        w.push(Some(2), (0, 2), 20);
        assert_eq!(w.first_ready(), None);
        w.set_ready(2, true);
        assert_eq!(w.first_ready(), Some(((0, 2), Some(2))));
        w.push(None, (0, 3), 30);
        w.set_ready(1, true);
        assert_eq!(w.first_ready(), Some(((0, 1), Some(1))));
        w.set_ready(1, false);
        w.remove(Some(2), (0, 2));
        assert_eq!(w.first_ready(), Some(((0, 3), None)));
        w.set_ready(3, true); // no queue yet: remembered for when one forms
        w.push(Some(3), (0, 0), 40);
        assert_eq!(w.first_ready(), Some(((0, 0), Some(3))));
    }
}
