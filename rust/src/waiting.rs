//! Waiting requests: one queue per lane (an adapter, or the base model, and under fair share
//! a tenant: requests of one adapter from two tenants wait in two lanes), each ordered by
//! (priority, arrival), plus two indexes of the lanes' heads: all of them (the order adapters
//! are read ahead in), and those whose adapter is ready to run (the order admission takes them
//! in). The scheduler finds the next admissible request in O(log n), never scanning requests
//! whose adapter is not loaded.

use std::collections::{BTreeMap, BTreeSet};

use crate::FastMap;
use crate::FastSet;

use crate::kv::RequestId;
use crate::request::AdapterId;

/// Which adapter a request runs on: its key, or `None` for the base model.
pub type AdapterKey = Option<AdapterId>;

/// A tenant named by requests (fair share's clients), interned; 0: none named.
pub type TenantId = u64;

/// A waiting lane: an adapter and a tenant (0 when the request names none, or without fair
/// share, where every request of an adapter waits in one lane).
pub type Lane = (AdapterKey, TenantId);

/// Order among waiting requests: lower priority value first, then earlier arrival.
pub type OrderKey = (i32, u64);

/// Per-lane waiting queues.
#[derive(Default)]
pub struct WaitingQueues {
    queues: FastMap<Lane, BTreeMap<OrderKey, RequestId>>,
    /// Each adapter's lanes by their heads, sorted (most adapters have one lane; an
    /// adapter's entry is kept when it empties, so that lanes coming and going allocate
    /// nothing).
    /// Kept once a tenant's lane has been seen (`multi`); before, every adapter has at
    /// most the one lane (`(adapter, 0)`) and nothing here is needed.
    lanes: FastMap<AdapterKey, Vec<(OrderKey, TenantId)>>,
    multi: bool,
    /// Each adapter's first head (over its lanes).
    heads: BTreeSet<(OrderKey, AdapterKey)>,
    /// The heads of the lanes whose adapter is ready (the base model's always is).
    ready_heads: BTreeSet<(OrderKey, Lane)>,
    ready: FastSet<AdapterId>,
    len: usize,
    /// Lanes whose first requests [`WaitingQueues::pop_deferred`] took, with their head
    /// before: the indexes are brought up to date by [`WaitingQueues::sync_heads`].
    stale: Vec<(Lane, OrderKey)>,
    /// The lanes of `stale`, once it is long.
    stale_set: FastSet<Lane>,
}

/// How long `stale` is searched before a set is kept beside it.
const STALE_SCAN: usize = 32;

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

    /// `lane`'s head moves from `old` to `new` (either absent): every index follows, with
    /// one look-up of the adapter's lanes.
    fn move_head(&mut self, lane: Lane, old: Option<OrderKey>, new: Option<OrderKey>) {
        let (adapter, tenant) = lane;
        if let Some(k) = old {
            self.ready_heads.remove(&(k, lane));
        }
        if let Some(k) = new.filter(|_| self.is_ready(adapter)) {
            self.ready_heads.insert((k, lane));
        }
        if !self.multi {
            // the adapter's one lane: its head is the adapter's
            if let Some(k) = old {
                self.heads.remove(&(k, adapter));
            }
            if let Some(k) = new {
                self.heads.insert((k, adapter));
            }
            return;
        }
        let lanes = self.lanes.entry(adapter).or_default();
        let first_before = lanes.first().map(|(k, _)| *k);
        if let Some(i) = old.and_then(|k| lanes.binary_search(&(k, tenant)).ok()) {
            lanes.remove(i);
        }
        if let Some(Err(i)) = new.map(|k| lanes.binary_search(&(k, tenant))) {
            lanes.insert(i, (new.expect("given"), tenant));
        }
        let first_after = lanes.first().map(|(k, _)| *k);
        if first_before != first_after {
            if let Some(k) = first_before {
                self.heads.remove(&(k, adapter));
            }
            if let Some(k) = first_after {
                self.heads.insert((k, adapter));
            }
        }
    }

    /// The first tenant's lane: from now on each adapter's lanes are kept in `lanes`.
    fn keep_lanes(&mut self) {
        self.multi = true;
        for (lane, queue) in &self.queues {
            if let Some((k, _)) = queue.first_key_value() {
                self.lanes.entry(lane.0).or_default().push((*k, lane.1));
            }
        }
    }

    /// Marks `adapter`'s weights ready to run (or not): its lanes join (or leave) admission.
    pub fn set_ready(&mut self, adapter: AdapterId, ready: bool) {
        let changed = if ready {
            self.ready.insert(adapter)
        } else {
            self.ready.remove(&adapter)
        };
        if !changed {
            return;
        }
        let tenants: Vec<TenantId> = self.lanes_of(Some(adapter)).collect();
        for tenant in tenants {
            let lane = (Some(adapter), tenant);
            let Some((k, _)) = self.head(lane) else {
                continue;
            };
            let head = (k, lane);
            if ready {
                self.ready_heads.insert(head);
            } else {
                self.ready_heads.remove(&head);
            }
        }
    }

    /// Adds a request; `key` must be unique.
    pub fn push(&mut self, lane: Lane, key: OrderKey, id: RequestId) {
        if lane.1 != 0 && !self.multi {
            self.keep_lanes();
        }
        let queue = self.queues.entry(lane).or_default();
        let old_head = queue.first_key_value().map(|(k, _)| *k);
        queue.insert(key, id);
        self.len += 1;
        if old_head.is_none_or(|h| key < h) {
            self.move_head(lane, old_head, Some(key));
        }
    }

    /// Removes a request, wherever it stands in its lane.
    pub fn remove(&mut self, lane: Lane, key: OrderKey) -> Option<RequestId> {
        let queue = self.queues.get_mut(&lane)?;
        let was_head = queue.first_key_value().is_some_and(|(k, _)| *k == key);
        let id = queue.remove(&key)?;
        self.len -= 1;
        if was_head {
            let next = queue.first_key_value().map(|(k, _)| *k);
            if next.is_none() {
                self.queues.remove(&lane);
            }
            self.move_head(lane, Some(key), next);
        }
        Some(id)
    }

    /// Removes the first request of `lane`, leaving the head indexes as they were (one
    /// update per lane, not per request, when admission drains a lane):
    /// [`WaitingQueues::sync_heads`] must follow before anything but [`WaitingQueues::head`]
    /// and more of these.
    pub fn pop_deferred(&mut self, lane: Lane) -> Option<(OrderKey, RequestId)> {
        let queue = self.queues.get_mut(&lane)?;
        let (key, id) = queue.pop_first()?;
        self.len -= 1;
        // each lane listed once, with its head before: searched in the list while it is
        // short, in a set beside it once long (admission may drain thousands of lanes)
        let listed = if self.stale.len() < STALE_SCAN {
            self.stale.iter().any(|(l, _)| *l == lane)
        } else {
            if self.stale_set.is_empty() {
                self.stale_set.extend(self.stale.iter().map(|(l, _)| *l));
            }
            !self.stale_set.insert(lane)
        };
        if !listed {
            self.stale.push((lane, key));
        }
        Some((key, id))
    }

    /// Brings the head indexes up to date after [`WaitingQueues::pop_deferred`].
    pub fn sync_heads(&mut self) {
        self.stale_set.clear();
        for (lane, old_head) in std::mem::take(&mut self.stale) {
            let queue = &self.queues[&lane];
            let next = queue.first_key_value().map(|(k, _)| *k);
            if next == Some(old_head) {
                continue;
            }
            self.move_head(lane, Some(old_head), next);
            if next.is_none() {
                self.queues.remove(&lane);
            }
        }
    }

    /// The first request of `lane`.
    pub fn head(&self, lane: Lane) -> Option<(OrderKey, RequestId)> {
        let (k, id) = self.queues.get(&lane)?.first_key_value()?;
        Some((*k, *id))
    }

    /// The first request for `adapter`, over its lanes (as the head indexes know them).
    pub fn adapter_head(&self, adapter: AdapterKey) -> Option<(OrderKey, RequestId)> {
        if !self.multi {
            return self.head((adapter, 0));
        }
        let &(_, tenant) = self.lanes.get(&adapter)?.first()?;
        self.head((adapter, tenant))
    }

    /// The tenants of `adapter`'s lanes, by their heads (none if nothing waits for it).
    pub fn lanes_of(&self, adapter: AdapterKey) -> impl Iterator<Item = TenantId> + '_ {
        let kept = self.lanes.get(&adapter).into_iter().flatten();
        let one = !self.multi && self.queues.contains_key(&(adapter, 0));
        kept.map(|(_, t)| *t).chain(one.then_some(0))
    }

    /// Every request waiting for `adapter`, in order.
    pub fn ids_of(&self, adapter: AdapterKey) -> Vec<RequestId> {
        let mut all: Vec<(OrderKey, RequestId)> = self
            .lanes_of(adapter)
            .filter_map(|t| self.queues.get(&(adapter, t)))
            .flat_map(|q| q.iter().map(|(k, id)| (*k, *id)))
            .collect();
        all.sort_unstable();
        all.into_iter().map(|(_, id)| id).collect()
    }

    /// Whether any request waits for `adapter`.
    pub fn has(&self, adapter: AdapterKey) -> bool {
        match self.multi {
            true => self.lanes.get(&adapter).is_some_and(|l| !l.is_empty()),
            false => self.queues.contains_key(&(adapter, 0)),
        }
    }

    /// Each adapter with waiting requests, once, by its oldest head: the order admission
    /// considers them in.
    pub fn adapters_in_order(&self) -> impl Iterator<Item = AdapterKey> + '_ {
        self.heads.iter().map(|(_, adapter)| *adapter)
    }

    /// The first waiting request overall, ready or not.
    pub fn first(&self) -> Option<(OrderKey, Lane)> {
        let &(k, adapter) = self.heads.first()?;
        let tenant = match self.multi {
            true => self.lanes[&adapter].first()?.1,
            false => 0,
        };
        Some((k, (adapter, tenant)))
    }

    /// Each lane's head whose adapter is ready (the base model's included).
    pub fn ready_heads(&self) -> impl Iterator<Item = (OrderKey, Lane)> + '_ {
        self.ready_heads.iter().copied()
    }

    /// The adapters marked ready that requests wait for (the base model not among them).
    pub fn ready_adapters(&self) -> impl Iterator<Item = AdapterId> + '_ {
        self.ready.iter().copied().filter(|a| self.has(Some(*a)))
    }

    /// The first waiting request whose adapter is ready.
    pub fn first_ready(&self) -> Option<(OrderKey, Lane)> {
        self.ready_heads.first().copied()
    }

    /// The first request among the given adapters' lanes.
    pub fn first_among(
        &self,
        adapters: impl IntoIterator<Item = AdapterKey>,
    ) -> Option<(OrderKey, Lane)> {
        adapters
            .into_iter()
            .flat_map(|a| self.lanes_of(a).map(move |t| (a, t)))
            .filter_map(|lane| self.head(lane).map(|(k, _)| (k, lane)))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_track_each_queue() {
        let mut w = WaitingQueues::default();
        w.push((Some(1), 0), (0, 5), 50);
        w.push((Some(2), 0), (0, 3), 30);
        w.push((Some(1), 0), (0, 1), 10);
        w.push((None, 0), (-1, 9), 90);
        assert_eq!(w.first(), Some(((-1, 9), (None, 0))));
        assert_eq!(
            w.first_among([Some(1), Some(2)]),
            Some(((0, 1), (Some(1), 0)))
        );
        assert_eq!(w.remove((Some(1), 0), (0, 1)), Some(10));
        assert_eq!(
            w.first_among([Some(1), Some(2)]),
            Some(((0, 3), (Some(2), 0)))
        );
        assert_eq!(w.remove((None, 0), (-1, 9)), Some(90));
        assert_eq!(w.remove((Some(2), 0), (0, 3)), Some(30));
        assert_eq!(w.first(), Some(((0, 5), (Some(1), 0))));
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
            w.push((adapter, 0), (0, t), id);
        }
        w.set_ready(1, true);
        w.set_ready(2, true);
        assert_eq!(w.pop_deferred((Some(1), 0)), Some(((0, 1), 10)));
        assert_eq!(w.pop_deferred((Some(2), 0)), Some(((0, 2), 20)));
        assert_eq!(w.pop_deferred((Some(1), 0)), Some(((0, 3), 30)));
        assert_eq!(w.head((Some(1), 0)), None);
        w.sync_heads();
        assert_eq!(w.len(), 1);
        assert!(!w.has(Some(1)) && !w.has(Some(2)));
        assert_eq!(w.first(), Some(((0, 4), (None, 0))));
        assert_eq!(w.first_ready(), Some(((0, 4), (None, 0))));
        w.push((Some(1), 0), (0, 5), 50);
        w.push((Some(1), 0), (0, 6), 60);
        assert_eq!(w.pop_deferred((Some(1), 0)), Some(((0, 5), 50)));
        w.sync_heads();
        assert_eq!(
            w.adapters_in_order().collect::<Vec<_>>(),
            vec![None, Some(1)]
        );
        assert_eq!(w.first_ready(), Some(((0, 4), (None, 0))));
        assert_eq!(w.remove((None, 0), (0, 4)), Some(40));
        assert_eq!(w.first_ready(), Some(((0, 6), (Some(1), 0))));
    }

    #[test]
    fn only_ready_adapters_are_admitted() {
        let mut w = WaitingQueues::default();
        w.push((Some(1), 0), (0, 1), 10);
        w.push((Some(2), 0), (0, 2), 20);
        assert_eq!(w.first_ready(), None);
        w.set_ready(2, true);
        assert_eq!(w.first_ready(), Some(((0, 2), (Some(2), 0))));
        w.push((None, 0), (0, 3), 30);
        w.set_ready(1, true);
        assert_eq!(w.first_ready(), Some(((0, 1), (Some(1), 0))));
        w.set_ready(1, false);
        w.remove((Some(2), 0), (0, 2));
        assert_eq!(w.first_ready(), Some(((0, 3), (None, 0))));
        w.set_ready(3, true); // no queue yet: remembered for when one forms
        w.push((Some(3), 0), (0, 0), 40);
        assert_eq!(w.first_ready(), Some(((0, 0), (Some(3), 0))));
    }

    #[test]
    fn an_adapter_of_several_lanes_is_one_adapter() {
        let mut w = WaitingQueues::default();
        w.push((Some(1), 7), (0, 2), 20);
        w.push((Some(1), 0), (0, 3), 30);
        w.push((Some(2), 0), (0, 4), 40);
        w.push((Some(1), 7), (0, 5), 50);
        assert_eq!(w.lanes_of(Some(1)).collect::<Vec<_>>(), vec![7, 0]);
        assert_eq!(w.adapter_head(Some(1)), Some(((0, 2), 20)));
        assert_eq!(
            w.adapters_in_order().collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
        assert_eq!(w.ids_of(Some(1)), vec![20, 30, 50]);
        assert_eq!(w.first_ready(), None);
        w.set_ready(1, true); // both lanes join admission
        assert_eq!(w.ready_heads().count(), 2);
        assert_eq!(w.pop_deferred((Some(1), 7)), Some(((0, 2), 20)));
        w.sync_heads();
        assert_eq!(w.first_ready(), Some(((0, 3), (Some(1), 0))));
        assert_eq!(w.remove((Some(1), 0), (0, 3)), Some(30));
        assert_eq!(w.lanes_of(Some(1)).collect::<Vec<_>>(), vec![7]);
        assert_eq!(
            w.first_among([Some(1), Some(2)]),
            Some(((0, 4), (Some(2), 0)))
        );
        assert_eq!(w.remove((Some(1), 7), (0, 5)), Some(50));
        assert!(!w.has(Some(1)));
        w.set_ready(1, false);
        assert_eq!(w.len(), 1);
    }
}
