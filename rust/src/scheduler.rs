//! Batch formation: which requests run this step, with how many tokens, on which adapter
//! slots and KV blocks.
//!
//! Each step: running requests first (decode, or the next chunk of a long prompt; when KV
//! blocks run out the newest running request is preempted), then waiting ones in
//! (priority, arrival) order. A waiting request whose adapter has no slot is passed over
//! without blocking those behind it whose adapter is active; if the oldest waiting request is
//! passed over for `max_skipped_steps` steps, other adapters' admissions stop until a slot
//! drains for it. Running requests never span more than `max_loras` adapters (pinned ones
//! included), so every running request's adapter fits on the device at once.

use std::collections::HashSet;

use crate::FastMap;
use std::sync::Arc;

use crate::batch::{Eviction, ScheduledSeq, SchedulerOutput, SlotLoad, NO_SLOT};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::kv::{BlockManager, RequestId};
use crate::lru::{Acquired, LruCache};
use crate::queue::RequestQueue;
use crate::request::AdapterId;
use crate::submit::{Command, NewRequest, Submitter};
use crate::waiting::{AdapterKey, OrderKey, WaitingQueues};

struct Seq {
    adapter: AdapterKey,
    order: OrderKey,
    num_tokens: usize,
    num_computed: usize,
}

/// The scheduler. Single consumer: one thread calls `schedule` / `postprocess`; any number
/// submit through [`Submitter`]s.
pub struct Scheduler {
    config: SchedulerConfig,
    queue: Arc<RequestQueue<Command>>,
    kv: BlockManager,
    device: LruCache<AdapterId>,
    host: LruCache<AdapterId>,
    seqs: FastMap<RequestId, Seq>,
    waiting: WaitingQueues,
    /// Admission order; the newest (last) is preempted first.
    running: Vec<RequestId>,
    /// Running requests per adapter.
    active: FastMap<AdapterId, usize>,
    /// What the last `schedule` ran, for `postprocess`.
    last: Vec<(RequestId, usize)>,
    num_arrivals: u64,
    step: u64,
    /// The oldest waiting request, and the step since which it has been passed over.
    passed_over: Option<(RequestId, u64)>,
    /// Slot traffic decided between steps (pinning), reported by the next `schedule`.
    pending: SchedulerOutput,
}

impl Scheduler {
    /// A scheduler with empty caches.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the limits cannot work together.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            queue: Arc::new(RequestQueue::new(config.queue_capacity)?),
            kv: BlockManager::new(config.num_blocks, config.block_size),
            device: LruCache::new(config.max_loras),
            host: LruCache::new(config.max_cpu_loras),
            config,
            seqs: FastMap::default(),
            waiting: WaitingQueues::default(),
            running: Vec::new(),
            active: FastMap::default(),
            last: Vec::new(),
            num_arrivals: 0,
            step: 0,
            passed_over: None,
            pending: SchedulerOutput::default(),
        })
    }

    /// A handle that submits to this scheduler from any thread.
    pub fn submitter(&self) -> Submitter {
        Submitter::new(Arc::clone(&self.queue), self.config.max_model_len)
    }

    /// The limits in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// KV block accounting (read-only).
    pub fn kv(&self) -> &BlockManager {
        &self.kv
    }

    /// Device slots (read-only).
    pub fn device_slots(&self) -> &LruCache<AdapterId> {
        &self.device
    }

    /// Requests waiting to be admitted.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and not finished.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether anything is waiting, running, or still in the submission queue.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty() || !self.queue.is_empty()
    }

    /// Pins `adapter` to a device slot: never evicted until unpinned. If it was not resident,
    /// its load (and any eviction) is reported by the next `schedule()`.
    ///
    /// # Errors
    /// [`Error::NoFreeSlot`] when every slot is pinned or held by running requests' adapters.
    pub fn pin_adapter(&mut self, adapter: AdapterId) -> Result<()> {
        let no_slot = Error::NoFreeSlot {
            capacity: self.config.max_loras,
            adapter,
        };
        if !self.can_admit(Some(adapter)) {
            return Err(no_slot);
        }
        self.drain_pending();
        let pinned_after = self.device.num_pinned() + usize::from(!self.device.is_pinned(&adapter));
        if pinned_after >= self.config.max_loras && self.waits_for_unpinned(Some(adapter)) {
            return Err(no_slot);
        }
        let active = &self.active;
        let acquired = self
            .device
            .acquire(&adapter, |k| active.contains_key(k))
            .ok_or(no_slot)?;
        self.device.set_pinned(&adapter, true);
        self.record_acquired(adapter, acquired, &HashSet::new());
        self.host.set_pinned(&adapter, true);
        Ok(())
    }

    /// Whether a waiting request uses an adapter that is not pinned (besides `also_pinned`).
    fn waits_for_unpinned(&self, also_pinned: AdapterKey) -> bool {
        self.waiting
            .adapters_in_order()
            .flatten()
            .any(|a| Some(a) != also_pinned && !self.device.is_pinned(&a))
    }

    /// Keeps `adapter`'s validated weights in the host tier (least recently used unpinned
    /// adapters make room). Returns its host slot and the adapter evicted for it, or `None`
    /// when every host slot is pinned: its weights are then read again when it is needed.
    pub fn cache_adapter(&mut self, adapter: AdapterId) -> Option<(usize, Option<AdapterId>)> {
        let acquired = self.host.acquire(&adapter, |_| false)?;
        Some((acquired.slot, acquired.evicted))
    }

    /// Adapters held in a device slot or the host tier, ascending: what `list_loras` shows.
    pub fn resident_adapters(&self) -> Vec<AdapterId> {
        let mut all: Vec<AdapterId> = self
            .device
            .entries_by_recency()
            .into_iter()
            .map(|e| e.0)
            .collect();
        all.extend(self.host.entries_by_recency().into_iter().map(|e| e.0));
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Drops `adapter` from the device slots and the host tier at once. With `force`, first
    /// aborts every request that uses it (returned, so the caller can fail them); without,
    /// refuses while any does.
    ///
    /// # Errors
    /// [`Error::AdapterInUse`] when requests use it and `force` is false.
    pub fn remove_adapter(&mut self, adapter: AdapterId, force: bool) -> Result<Vec<RequestId>> {
        self.drain_pending();
        let mut users = self.waiting.ids_of(Some(adapter));
        let seqs = &self.seqs;
        users.extend(
            self.running
                .iter()
                .filter(|id| seqs[*id].adapter == Some(adapter)),
        );
        if !force && !users.is_empty() {
            return Err(Error::AdapterInUse {
                adapter,
                num_requests: users.len(),
            });
        }
        for id in &users {
            self.remove(*id);
        }
        self.device.remove(&adapter);
        self.host.remove(&adapter);
        Ok(users)
    }

    /// Unpins `adapter`; it stays resident until evicted. Returns whether it was pinned.
    pub fn unpin_adapter(&mut self, adapter: AdapterId) -> bool {
        let was = self.device.is_pinned(&adapter);
        self.device.set_pinned(&adapter, false);
        self.host.set_pinned(&adapter, false);
        was
    }

    /// Slots that running requests' adapters and pinned adapters hold together.
    fn num_committed_slots(&self) -> usize {
        let active_pinned = self
            .active
            .keys()
            .filter(|a| self.device.is_pinned(a))
            .count();
        self.active.len() + self.device.num_pinned() - active_pinned
    }

    /// Whether a slot is left for an adapter that is neither running nor pinned.
    fn has_free_slot(&self) -> bool {
        self.num_committed_slots() < self.config.max_loras
    }

    fn can_admit(&self, adapter: AdapterKey) -> bool {
        adapter.is_none_or(|a| {
            self.active.contains_key(&a) || self.device.is_pinned(&a) || self.has_free_slot()
        })
    }

    /// Up to `limit` adapters that the next steps may have to read from disk: those of
    /// waiting requests (submissions drained first), in the order admission considers them,
    /// held neither in a device slot nor in the host tier. The engine reads and validates them
    /// before [`Scheduler::schedule`] can evict anything for them.
    pub fn upcoming_reads(&mut self, limit: usize) -> Vec<AdapterId> {
        self.drain_pending();
        self.waiting
            .adapters_in_order()
            .flatten()
            .filter(|a| self.device.get(a).is_none() && self.host.get(a).is_none())
            .filter(|a| {
                self.device.num_pinned() < self.config.max_loras || self.device.is_pinned(a)
            })
            .take(limit)
            .collect()
    }

    /// Forms the next batch. Call [`Scheduler::postprocess`] after running it.
    pub fn schedule(&mut self) -> SchedulerOutput {
        if !self.last.is_empty() {
            self.postprocess(&[]);
        }
        self.step += 1;
        let mut out = std::mem::take(&mut self.pending);
        self.drain_queue(&mut out);
        self.reject_unservable(&mut out);
        let mut tokens_left = self.config.max_num_batched_tokens;
        let mut batch = Vec::new();
        self.schedule_running(&mut batch, &mut tokens_left, &mut out.preempted);
        if out.preempted.is_empty() {
            self.admit_waiting(&mut batch, &mut tokens_left);
        }
        self.assign_slots(batch, &mut out);
        out.group_by_slot();
        out
    }

    /// Drains submissions into the waiting queues between steps (their traffic is reported by
    /// the next `schedule`).
    fn drain_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        self.drain_queue(&mut pending);
        self.pending = pending;
    }

    /// With every device slot pinned, a waiting request whose adapter is not pinned can never
    /// run: it is refused (reported in `rejected`) rather than left to wait forever.
    fn reject_unservable(&mut self, out: &mut SchedulerOutput) {
        if self.device.num_pinned() < self.config.max_loras {
            return;
        }
        let stuck: Vec<AdapterId> = self
            .waiting
            .adapters_in_order()
            .flatten()
            .filter(|a| !self.device.is_pinned(a))
            .collect();
        for adapter in stuck {
            for id in self.waiting.ids_of(Some(adapter)) {
                self.remove(id);
                let error = Error::NoFreeSlot {
                    capacity: self.config.max_loras,
                    adapter,
                };
                out.rejected.push((id, error));
            }
        }
    }

    fn drain_queue(&mut self, out: &mut SchedulerOutput) {
        for command in self.queue.drain() {
            match command {
                Command::Add(req) => {
                    if let Err(e) = self.add(req) {
                        out.rejected.push((req.id, e));
                    }
                }
                Command::Abort(id) => {
                    if self.remove(id) {
                        out.aborted.push(id);
                    }
                }
            }
        }
    }

    fn add(&mut self, req: NewRequest) -> Result<()> {
        if self.seqs.contains_key(&req.id) {
            return Err(Error::DuplicateRequest(req.id));
        }
        self.num_arrivals += 1;
        let order = (req.priority, self.num_arrivals);
        self.waiting.push(req.adapter, order, req.id);
        let seq = Seq {
            adapter: req.adapter,
            order,
            num_tokens: req.num_prompt_tokens,
            num_computed: 0,
        };
        self.seqs.insert(req.id, seq);
        Ok(())
    }

    /// Forgets `id` wherever it is; `false` if unknown.
    fn remove(&mut self, id: RequestId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        if self.waiting.remove(seq.adapter, seq.order).is_none() {
            self.running.retain(|r| *r != id);
            self.release(id, seq.adapter);
        }
        self.last.retain(|(r, _)| *r != id);
        true
    }

    /// Frees a running request's blocks and adapter reference.
    fn release(&mut self, id: RequestId, adapter: AdapterKey) {
        self.kv.free(id);
        if let Some(a) = adapter {
            if let Some(n) = self.active.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.active.remove(&a);
                }
            }
        }
    }

    fn schedule_running(
        &mut self,
        batch: &mut Vec<(RequestId, usize)>,
        tokens_left: &mut usize,
        preempted: &mut Vec<RequestId>,
    ) {
        let mut i = 0;
        while i < self.running.len() && *tokens_left > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let chunk = (seq.num_tokens - seq.num_computed).min(*tokens_left);
            let target = seq.num_computed + chunk;
            while !self.kv.allocate(id, target) {
                let Some(victim) = self.running.pop() else {
                    break;
                };
                self.preempt(victim);
                preempted.push(victim);
                if victim == id {
                    return;
                }
            }
            batch.push((id, chunk));
            *tokens_left -= chunk;
            i += 1;
        }
    }

    fn preempt(&mut self, id: RequestId) {
        let seq = self.seqs.get_mut(&id).expect("running request is known");
        seq.num_computed = 0;
        let (adapter, order) = (seq.adapter, seq.order);
        self.release(id, adapter);
        self.waiting.push(adapter, order, id);
    }

    fn admit_waiting(&mut self, batch: &mut Vec<(RequestId, usize)>, tokens_left: &mut usize) {
        let mut drain_for = self.update_aging();
        // Once no slot is free, only running or pinned adapters (and the base model) can be
        // admitted, and admitting them frees no slot: the candidates stay fixed for the step.
        let mut restricted: Option<Vec<AdapterKey>> = None;
        while self.running.len() < self.config.max_num_seqs && *tokens_left > 0 {
            let next = match drain_for {
                Some(a) => self
                    .waiting
                    .first_among([a, None].into_iter().filter(|k| self.can_admit(*k))),
                None if restricted.is_none() && self.has_free_slot() => self.waiting.first(),
                None => {
                    let keys = restricted.get_or_insert_with(|| {
                        let pinned = self.device.pinned_keys().into_iter();
                        let active = self.active.keys().copied();
                        active.chain(pinned).map(Some).chain([None]).collect()
                    });
                    self.waiting.first_among(keys.iter().copied())
                }
            };
            let Some((order, adapter)) = next else { break };
            let id = self.waiting.head(adapter).expect("head exists").1;
            let seq = &self.seqs[&id];
            let chunk = (seq.num_tokens - seq.num_computed).min(*tokens_left);
            if !self.kv.allocate(id, seq.num_computed + chunk) {
                break; // first come, first served on memory: no overtaking a big prompt
            }
            self.waiting.remove(adapter, order);
            self.running.push(id);
            if let Some(a) = adapter {
                *self.active.entry(a).or_insert(0) += 1;
            }
            if self.passed_over.is_some_and(|(p, _)| p == id) {
                self.passed_over = None;
                drain_for = None;
            }
            batch.push((id, chunk));
            *tokens_left -= chunk;
        }
    }

    /// Tracks how long the oldest waiting request has lacked an adapter slot; returns its
    /// adapter once that exceeds `max_skipped_steps`.
    fn update_aging(&mut self) -> Option<AdapterKey> {
        let Some((_, adapter)) = self.waiting.first().filter(|(_, a)| !self.can_admit(*a)) else {
            self.passed_over = None;
            return None;
        };
        let id = self.waiting.head(adapter).expect("head exists").1;
        let since = match self.passed_over {
            Some((p, since)) if p == id => since,
            _ => self.step,
        };
        self.passed_over = Some((id, since));
        (self.step - since >= self.config.max_skipped_steps).then_some(adapter)
    }

    fn assign_slots(&mut self, batch: Vec<(RequestId, usize)>, out: &mut SchedulerOutput) {
        let mut slots: FastMap<AdapterId, i32> = FastMap::default();
        let mut loading = HashSet::new();
        let adapters: Vec<AdapterId> = batch
            .iter()
            .filter_map(|(id, _)| self.seqs[id].adapter)
            .collect();
        let mut acquisitions = Vec::new();
        for a in adapters {
            if slots.contains_key(&a) {
                continue;
            }
            let active = &self.active;
            // Admission keeps running + pinned adapters within max_loras, so this succeeds.
            let acquired = self
                .device
                .acquire(&a, |k| active.contains_key(k))
                .expect("admission reserved a slot");
            slots.insert(a, acquired.slot as i32);
            if !acquired.hit {
                loading.insert(a);
            }
            acquisitions.push((a, acquired));
        }
        // Host-tier traffic once every load of the step is known: no adapter loses its host
        // copy to another loaded in the same step and then has to be read from disk.
        for (a, acquired) in acquisitions {
            self.record_acquired(a, acquired, &loading);
        }
        let pending = std::mem::take(&mut self.pending);
        out.loads.extend(pending.loads);
        out.evictions.extend(pending.evictions);
        out.host_evictions.extend(pending.host_evictions);
        for (id, chunk) in batch {
            let seq = &self.seqs[&id];
            out.seqs.push(ScheduledSeq {
                request_id: id,
                adapter: seq.adapter,
                slot: seq.adapter.map_or(NO_SLOT, |a| slots[&a]),
                num_computed_tokens: seq.num_computed,
                num_new_tokens: chunk,
                samples: seq.num_computed + chunk == seq.num_tokens,
                block_table: self.kv.block_table(id).to_vec(),
            });
            self.last.push((id, chunk));
        }
    }

    /// Queues the slot traffic of a device acquisition for the next output: the eviction,
    /// and on a miss the load, read from the host tier (filled from disk on a host miss).
    fn record_acquired(
        &mut self,
        adapter: AdapterId,
        acquired: Acquired<AdapterId>,
        loading: &HashSet<AdapterId>,
    ) {
        if let Some(evicted) = acquired.evicted {
            self.pending.evictions.push(Eviction {
                slot: acquired.slot,
                adapter: evicted,
            });
        }
        if acquired.hit {
            return;
        }
        let host = self.host.acquire(&adapter, |k| loading.contains(k));
        self.pending.loads.push(SlotLoad {
            slot: acquired.slot,
            adapter,
            host_slot: host.as_ref().map(|h| h.slot),
            from_host: host.as_ref().is_some_and(|h| h.hit),
        });
        if let Some(Acquired {
            slot,
            evicted: Some(e),
            ..
        }) = host
        {
            self.pending
                .host_evictions
                .push(Eviction { slot, adapter: e });
        }
    }

    /// Applies the last step's results: tokens computed, one sampled token per request that
    /// sampled, and `finished` (reported by the caller: EOS, stop strings, `max_tokens`).
    /// Returns the requests the scheduler itself finished for reaching `max_model_len`.
    pub fn postprocess(&mut self, finished: &[RequestId]) -> Vec<RequestId> {
        let mut done: HashSet<RequestId> = finished.iter().copied().collect();
        let mut length_capped = Vec::new();
        for (id, chunk) in std::mem::take(&mut self.last) {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.num_computed += chunk;
            if seq.num_computed == seq.num_tokens {
                seq.num_tokens += 1;
                if seq.num_tokens >= self.config.max_model_len && done.insert(id) {
                    length_capped.push(id);
                }
            }
        }
        if !done.is_empty() {
            self.running.retain(|r| !done.contains(r));
            for id in done {
                if let Some(seq) = self.seqs.remove(&id) {
                    if self.waiting.remove(seq.adapter, seq.order).is_none() {
                        self.release(id, seq.adapter);
                    }
                }
            }
        }
        length_capped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_loras: usize, max_cpu_loras: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_loras,
            max_cpu_loras,
            ..SchedulerConfig::default()
        })
        .unwrap()
    }

    fn submit(s: &Scheduler, id: RequestId, adapter: Option<AdapterId>) {
        let req = NewRequest {
            id,
            num_prompt_tokens: 4,
            adapter,
            priority: 0,
        };
        s.submitter().add(req).unwrap();
    }

    #[test]
    fn remove_adapter_counts_queued_requests() {
        let mut s = scheduler(1, 1);
        submit(&s, 1, Some(7));
        let err = s.remove_adapter(7, false).unwrap_err();
        assert_eq!(
            err,
            Error::AdapterInUse {
                adapter: 7,
                num_requests: 1
            }
        );
        assert_eq!(s.schedule().seqs.len(), 1); // still served
    }

    #[test]
    fn every_slot_pinned_refuses_other_adapters() {
        let mut s = scheduler(1, 2);
        s.pin_adapter(1).unwrap();
        submit(&s, 10, Some(2));
        submit(&s, 11, Some(1));
        let out = s.schedule();
        assert_eq!(out.seqs.len(), 1);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].0, 10);
        assert!(matches!(
            out.rejected[0].1,
            Error::NoFreeSlot { adapter: 2, .. }
        ));
        s.postprocess(&[11]);
        assert!(!s.has_unfinished());
        assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
    }

    #[test]
    fn pinning_the_last_slot_past_waiting_requests_is_refused() {
        let mut s = scheduler(1, 2);
        submit(&s, 1, Some(2));
        assert!(matches!(
            s.pin_adapter(1),
            Err(Error::NoFreeSlot { adapter: 1, .. })
        ));
        assert!(s.pin_adapter(2).is_ok()); // its own requests are not stranded
    }

    #[test]
    fn host_tier_caches_lru_and_keeps_pins() {
        let mut s = scheduler(1, 2);
        assert_eq!(s.cache_adapter(1), Some((0, None)));
        assert_eq!(s.cache_adapter(2), Some((1, None)));
        s.pin_adapter(1).unwrap();
        assert_eq!(s.cache_adapter(3), Some((1, Some(2)))); // 1 is pinned: 2 goes
        assert_eq!(s.resident_adapters(), vec![1, 3]);
        s.unpin_adapter(1);
        assert_eq!(s.cache_adapter(4), Some((0, Some(1))));
        assert_eq!(s.resident_adapters(), vec![1, 3, 4]); // 1 is still in its device slot
    }
}
