//! Batch formation: which requests run this step, with how many tokens, on which adapter
//! slots and KV blocks; and which adapters to read ahead of need.
//!
//! Each step: running requests first (decode, or the next chunk of a long prompt; when KV
//! blocks run out the newest running request is preempted), then waiting ones in
//! (priority, arrival) order. A waiting request is admitted once its adapter's weights are in
//! the host tier; until then others run, and the adapter's read is handed to the engine's
//! loader pool, in the order admission will want it. A waiting request whose adapter has no
//! device slot is passed over without blocking those behind it whose adapter is active; if the
//! oldest waiting request is passed over for `max_skipped_steps` steps, other adapters'
//! admissions stop until it can run. Running requests never span more than `max_loras`
//! adapters (pinned ones included), so every running request's adapter fits on the device.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::adapters::{Adapters, Key, Placement, ReadJob, Residency};
use crate::batch::{Eviction, ScheduledSeq, SchedulerOutput, SlotLoad, NO_SLOT};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::kv::{BlockKey, BlockManager, RequestId};
use crate::lru::Acquired;
use crate::queue::RequestQueue;
use crate::request::{AdapterId, LoRARequest};
use crate::submit::{Command, NewRequest, Submitter};
use crate::waiting::{AdapterKey, OrderKey, WaitingQueues};
use crate::FastMap;

struct Seq {
    adapter: AdapterKey,
    order: OrderKey,
    num_tokens: usize,
    num_computed: usize,
    /// Its part in the prefix cache (`None`: none).
    cache: Option<SeqCache>,
}

/// A request's token ids and block hashes, for the prefix cache.
struct SeqCache {
    /// Every known token: the prompt, then each one sampled.
    tokens: Vec<u32>,
    /// Whether admission may start from cached blocks.
    read: bool,
    /// The chained hashes of its first full blocks (they depend only on the tokens and the
    /// weights version, so they outlive a preemption).
    hashes: Vec<u64>,
    /// Blocks of its current table the cache knows (found there, or recorded).
    recorded: usize,
    /// What its first block chains after: 0, or its `cache_salt`'s hash.
    salt: u64,
}

impl SeqCache {
    /// Hashes its first `blocks` full blocks (those not hashed yet).
    fn hash_upto(&mut self, kv: &BlockManager, version: BlockKey, blocks: usize) {
        let bs = kv.block_size();
        while self.hashes.len() < blocks {
            let i = self.hashes.len();
            let parent = if i == 0 {
                self.salt
            } else {
                self.hashes[i - 1]
            };
            let h = kv.block_hash(parent, version, &self.tokens[i * bs..(i + 1) * bs]);
            self.hashes.push(h);
        }
    }
}

/// The weights version a request's KV is computed with: its adapter key, or 0 (the base).
fn version_of(adapter: AdapterKey) -> BlockKey {
    adapter.unwrap_or(0)
}

/// What [`Scheduler::stage_adapter`] did.
#[derive(Debug, Clone)]
pub enum Staging {
    /// The weights are in the host tier (now most recently used).
    Ready,
    /// A read is in flight already.
    Loading,
    /// Perform this read (a host slot is given once the weights prove valid).
    Read(ReadJob),
}

/// The scheduler. Single consumer: one thread at a time calls `schedule` / `postprocess`
/// and the adapter methods; any number submit through [`Submitter`]s.
pub struct Scheduler {
    config: SchedulerConfig,
    queue: Arc<RequestQueue<Command>>,
    kv: BlockManager,
    adapters: Adapters,
    seqs: FastMap<RequestId, Seq>,
    waiting: WaitingQueues,
    /// Admission order; the newest (last) is preempted first.
    running: Vec<RequestId>,
    /// Running requests per adapter key.
    active: FastMap<Key, usize>,
    /// What the last `schedule` ran, for `postprocess`.
    last: Vec<(RequestId, usize)>,
    num_arrivals: u64,
    step: u64,
    /// The oldest waiting request, and the step since which it has been passed over.
    passed_over: Option<(RequestId, u64)>,
    /// Slot traffic and failures decided between steps, reported by the next `schedule`.
    pending: SchedulerOutput,
    /// Requests admitted this step: (tokens looked up in the prefix cache, tokens found).
    lookups: FastMap<RequestId, (usize, usize)>,
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
            adapters: Adapters::new(config.max_loras, config.max_cpu_loras),
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
            lookups: FastMap::default(),
        })
    }

    /// Forgets every cached prefix (vLLM's `reset_prefix_cache`): no later request finds
    /// one; blocks in use stay with their requests. Returns how many were cached.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.kv.reset_prefix_cache()
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

    /// Adapter identity and tiers (read-only).
    pub fn adapters(&self) -> &Adapters {
        &self.adapters
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

    /// Registers an adapter (id, name and path uniqueness enforced); returns the key its
    /// requests are submitted under and whether it is new.
    ///
    /// # Errors
    /// [`Error::AdapterConflict`] naming both adapters.
    pub fn register_adapter(&mut self, request: &LoRARequest) -> Result<(Key, bool)> {
        self.adapters.register(request)
    }

    /// New weights for a registered adapter (`load_inplace`): returns their key and whether
    /// the replaced weights were pinned (they are unpinned, and dropped once unused).
    ///
    /// # Errors
    /// [`Error::AdapterConflict`] when the id is registered under another name.
    pub fn reload_adapter(&mut self, request: &LoRARequest) -> Result<(Key, bool)> {
        let (key, old) = self.adapters.reload(request)?;
        if let Some(old) = old {
            self.kv.forget_version(old); // no later request finds the old weights' KV
        }
        let was_pinned = old.is_some_and(|old| {
            let pinned = self.unpin_adapter(old);
            self.drop_if_unused(old);
            pinned
        });
        Ok((key, was_pinned))
    }

    /// The key of adapter `id`'s current weights.
    pub fn adapter_key(&self, id: AdapterId) -> Option<Key> {
        self.adapters.key_of(id)
    }

    /// Asks for `key`'s weights in the host tier now (`add_lora`).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when `key` was removed.
    pub fn stage_adapter(&mut self, key: Key) -> Result<Staging> {
        if !self.adapters.is_live(key) {
            return Err(Error::UnknownAdapter(key));
        }
        Ok(match self.adapters.residency(key) {
            Residency::Ready => {
                self.adapters.host.touch(&key);
                Staging::Ready
            }
            Residency::Loading => Staging::Loading,
            Residency::Absent => match self.adapters.begin_read(key) {
                Some(job) => Staging::Read(job),
                None => Staging::Loading,
            },
        })
    }

    fn unready(&mut self, evicted: Option<Key>) {
        if let Some(e) = evicted {
            self.waiting.set_ready(e, false);
        }
    }

    /// The loader pool read and validated `key`'s weights: where to put them. A read ahead
    /// of need never evicts an adapter in use, pinned, or wanted sooner by the waiting queue;
    /// it evicts one the queue wants later only when no request runs (a running one will
    /// free a slot that nothing wants, without a second read of a wanted adapter).
    /// Otherwise it waits for a slot ([`Placement::Wait`]; a later `schedule` names one in
    /// `commits`). An `explicit` one (`add_lora`) may evict any adapter nothing uses, and
    /// with none is dropped after validation (`Wait`: read again when needed). Either way
    /// the victim is one the waiting queue does not want (the least recently used), else
    /// the one it wants last.
    pub fn adapter_validated(&mut self, key: Key, explicit: bool) -> Placement {
        let upcoming = self.upcoming();
        let (placement, evicted) = self.place(key, explicit, &upcoming);
        self.unready(evicted);
        if explicit && placement == Placement::Wait {
            self.adapters.unplace(key);
        }
        placement
    }

    /// Where each adapter comes in the order admission takes the waiting queue's adapters.
    fn upcoming(&self) -> FastMap<Key, usize> {
        self.waiting
            .adapters_in_order()
            .flatten()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect()
    }

    /// Places `key`'s validated weights (see [`Self::adapter_validated`]); `upcoming` is
    /// [`Self::upcoming`].
    fn place(
        &mut self,
        key: Key,
        explicit: bool,
        upcoming: &FastMap<Key, usize>,
    ) -> (Placement, Option<Key>) {
        // what a read ahead keeps of what the queue wants: all of it while requests run,
        // else what comes before `key` (everything, if the queue does not want `key`)
        let keep_before = if explicit {
            0
        } else if self.running.is_empty() {
            upcoming.get(&key).copied().unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let active = &self.active;
        self.adapters.place(key, |k| {
            if active.contains_key(k) {
                return None;
            }
            match upcoming.get(k) {
                None => Some(usize::MAX),
                Some(&at) if at < keep_before => None,
                Some(&at) => Some(at),
            }
        })
    }

    /// `key`'s weights are in `host_slot`: its requests can be admitted.
    pub fn adapter_loaded(&mut self, key: Key, host_slot: usize) {
        if self.adapters.end_fill(key, host_slot) {
            self.waiting.set_ready(key, true);
        }
    }

    /// The loader pool could not read (or copy) `key`'s weights: the adapter is forgotten
    /// and every request that uses it fails with `message` (reported by the next
    /// `schedule`).
    pub fn adapter_failed(&mut self, key: Key, message: &str) {
        self.drain_pending();
        for id in self.waiting.ids_of(Some(key)) {
            self.remove(id);
            let error = Error::AdapterFailed(message.to_string());
            self.pending.rejected.push((id, error));
        }
        self.adapters.fail(key);
        self.waiting.set_ready(key, false);
    }

    /// Pins `key`'s weights to a device slot (and the host tier): never evicted until
    /// unpinned. If they were not on the device, the load is reported by the next `schedule`.
    ///
    /// # Errors
    /// [`Error::AdapterNotLoaded`] when they are not in the host tier; [`Error::NoFreeSlot`]
    /// when every slot is pinned or held by running requests' adapters, or pinning the last
    /// one would strand other adapters' waiting requests.
    pub fn pin_adapter(&mut self, key: Key) -> Result<()> {
        let id = self.adapters.request(key).map_or(key, |r| r.lora_int_id);
        if self.adapters.residency(key) != Residency::Ready {
            return Err(Error::AdapterNotLoaded(id));
        }
        let no_slot = Error::NoFreeSlot {
            capacity: self.config.max_loras,
            adapter: id,
        };
        if !self.can_admit(Some(key)) {
            return Err(no_slot);
        }
        self.drain_pending();
        let device = &self.adapters.device;
        let pinned_after = device.num_pinned() + usize::from(!device.is_pinned(&key));
        if pinned_after >= self.config.max_loras && self.waits_for_unpinned(Some(key)) {
            return Err(no_slot);
        }
        let active = &self.active;
        let acquired = self
            .adapters
            .device
            .acquire(&key, |k| active.contains_key(k))
            .ok_or(no_slot)?;
        self.adapters.device.set_pinned(&key, true);
        self.adapters.host.set_pinned(&key, true);
        self.record_acquired(key, acquired);
        Ok(())
    }

    /// Whether a waiting request uses an adapter that is not pinned (besides `also_pinned`).
    fn waits_for_unpinned(&self, also_pinned: AdapterKey) -> bool {
        self.waiting
            .adapters_in_order()
            .flatten()
            .any(|a| Some(a) != also_pinned && !self.adapters.device.is_pinned(&a))
    }

    /// Unpins `key`; it stays resident until evicted. Returns whether it was pinned.
    pub fn unpin_adapter(&mut self, key: Key) -> bool {
        let was = self.adapters.device.is_pinned(&key);
        self.adapters.device.set_pinned(&key, false);
        self.adapters.host.set_pinned(&key, false);
        was
    }

    /// The ids of the adapters held ready in the host tier (and so possibly on the device),
    /// ascending: what `list_loras` shows.
    pub fn resident_adapters(&self) -> Vec<AdapterId> {
        self.adapters.resident_ids()
    }

    /// Forgets adapter `id` (every set of its weights) from both tiers and the registry. With
    /// `force`, first aborts every request that uses it (returned, so the caller can fail
    /// them); without, refuses while any does.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when `id` is not registered; [`Error::AdapterInUse`] when
    /// requests use it and `force` is false.
    pub fn remove_adapter(&mut self, id: AdapterId, force: bool) -> Result<Vec<RequestId>> {
        self.drain_pending();
        let keys = self.adapters.keys_of(id);
        if keys.is_empty() {
            return Err(Error::UnknownAdapter(id));
        }
        let mut users = Vec::new();
        for key in &keys {
            users.extend(self.waiting.ids_of(Some(*key)));
            let seqs = &self.seqs;
            users.extend(
                self.running
                    .iter()
                    .filter(|r| seqs[*r].adapter == Some(*key)),
            );
        }
        if !force && !users.is_empty() {
            return Err(Error::AdapterInUse {
                adapter: id,
                num_requests: users.len(),
            });
        }
        for r in &users {
            self.remove(*r);
        }
        for key in keys {
            self.adapters.forget(key);
            self.waiting.set_ready(key, false);
            self.kv.forget_version(key);
        }
        Ok(users)
    }

    /// Drops a reload's replaced weights once no request uses them.
    fn drop_if_unused(&mut self, key: Key) {
        let unused = !self.active.contains_key(&key) && !self.waiting.has(Some(key));
        if unused && self.adapters.is_retired(key) {
            self.adapters.forget(key);
            self.waiting.set_ready(key, false);
        }
    }

    /// Slots that running requests' adapters and pinned adapters hold together.
    fn num_committed_slots(&self) -> usize {
        let device = &self.adapters.device;
        let active_pinned = self.active.keys().filter(|a| device.is_pinned(a)).count();
        self.active.len() + device.num_pinned() - active_pinned
    }

    /// Whether a slot is left for an adapter that is neither running nor pinned.
    fn has_free_slot(&self) -> bool {
        self.num_committed_slots() < self.config.max_loras
    }

    fn can_admit(&self, adapter: AdapterKey) -> bool {
        adapter.is_none_or(|a| {
            self.adapters.residency(a) == Residency::Ready
                && (self.active.contains_key(&a)
                    || self.adapters.device.is_pinned(&a)
                    || self.has_free_slot())
        })
    }

    /// Forms the next batch. Call [`Scheduler::postprocess`] after running it.
    pub fn schedule(&mut self) -> SchedulerOutput {
        if !self.last.is_empty() {
            self.postprocess(&[], &[]);
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
        self.read_ahead(&mut out);
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
        let device = &self.adapters.device;
        if device.num_pinned() < self.config.max_loras {
            return;
        }
        let stuck: Vec<Key> = self
            .waiting
            .adapters_in_order()
            .flatten()
            .filter(|a| !device.is_pinned(a))
            .collect();
        for key in stuck {
            let adapter = self.adapters.request(key).map_or(key, |r| r.lora_int_id);
            for id in self.waiting.ids_of(Some(key)) {
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
                    let id = req.id;
                    if let Err(e) = self.add(req) {
                        out.rejected.push((id, e));
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
        if req.adapter.is_some_and(|k| !self.adapters.is_live(k)) {
            let reason = "its adapter was removed before the request was scheduled";
            return Err(Error::AdapterFailed(reason.to_string()));
        }
        self.num_arrivals += 1;
        let order = (req.priority, self.num_arrivals);
        self.waiting.push(req.adapter, order, req.id);
        let salt = req
            .cache_salt
            .as_deref()
            .map_or(0, |s| self.kv.salt_hash(s));
        let cache = req.prompt.map(|tokens| SeqCache {
            tokens,
            read: req.read_cache,
            hashes: Vec::new(),
            recorded: 0,
            salt,
        });
        let seq = Seq {
            adapter: req.adapter,
            order,
            num_tokens: req.num_prompt_tokens,
            num_computed: 0,
            cache,
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
        } else if let Some(key) = seq.adapter {
            self.drop_if_unused(key);
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
                    self.drop_if_unused(a);
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
        if let Some(c) = seq.cache.as_mut() {
            c.recorded = 0;
        }
        let (adapter, order) = (seq.adapter, seq.order);
        self.release(id, adapter);
        self.waiting.push(adapter, order, id);
    }

    fn admit_waiting(&mut self, batch: &mut Vec<(RequestId, usize)>, tokens_left: &mut usize) {
        let mut drain_for = self.update_aging();
        // Slots held by running and pinned adapters, kept up to date as requests join.
        let mut committed = self.num_committed_slots();
        // Once no slot is free, only running or pinned adapters (and the base model) can be
        // admitted, and admitting them frees no slot: the candidates stay fixed for the step,
        // and their queues' heads are kept here, one updated per admission.
        let mut restricted: Option<BTreeSet<(OrderKey, AdapterKey)>> = None;
        while self.running.len() < self.config.max_num_seqs && *tokens_left > 0 {
            let next = match drain_for {
                Some(a) => self
                    .waiting
                    .first_among([a, None].into_iter().filter(|k| self.can_admit(*k))),
                None if restricted.is_none() && committed < self.config.max_loras => {
                    self.waiting.first_ready()
                }
                None => {
                    let heads = restricted.get_or_insert_with(|| {
                        let pinned = self.adapters.device.pinned_keys().into_iter();
                        let active = self.active.keys().copied();
                        let keys = active.chain(pinned).map(Some).chain([None]);
                        let waiting = &self.waiting;
                        keys.filter_map(|a| waiting.head(a).map(|(k, _)| (k, a)))
                            .collect()
                    });
                    heads.first().copied()
                }
            };
            let Some((order, adapter)) = next else { break };
            let id = self.waiting.head(adapter).expect("head exists").1;
            let (hit, queried) = self.prefix_hit(id);
            let seq = &self.seqs[&id];
            let start = hit.len() * self.kv.block_size();
            let chunk = (seq.num_tokens - start).min(*tokens_left); // uncached tokens only
            let allocated = if hit.is_empty() {
                self.kv.allocate(id, start + chunk)
            } else {
                self.kv.allocate_with_prefix(id, &hit, start + chunk)
            };
            if !allocated {
                break; // first come, first served on memory: no overtaking a big prompt
            }
            let seq = self.seqs.get_mut(&id).expect("waiting request is known");
            seq.num_computed = start;
            if let Some(c) = seq.cache.as_mut() {
                c.recorded = hit.len();
            }
            self.lookups.insert(id, (queried, start));
            if let Some(heads) = restricted.as_mut() {
                // the global head indexes are synced once, after the loop
                self.waiting.pop_deferred(adapter);
                heads.remove(&(order, adapter));
                if let Some((k, _)) = self.waiting.head(adapter) {
                    heads.insert((k, adapter));
                }
            } else {
                self.waiting.remove(adapter, order);
            }
            self.running.push(id);
            if let Some(a) = adapter {
                let count = self.active.entry(a).or_insert(0);
                if *count == 0 && !self.adapters.device.is_pinned(&a) {
                    committed += 1;
                }
                *count += 1;
            }
            if self.passed_over.is_some_and(|(p, _)| p == id) {
                self.passed_over = None;
                drain_for = None;
            }
            batch.push((id, chunk));
            *tokens_left -= chunk;
        }
        self.waiting.sync_heads();
    }

    /// The cached blocks a waiting request may start from (at most all but its last token:
    /// one is always computed, for its logits), and how many tokens it looked up.
    fn prefix_hit(&mut self, id: RequestId) -> (Vec<u32>, usize) {
        let seq = self.seqs.get_mut(&id).expect("waiting request is known");
        let version = version_of(seq.adapter);
        let Some(c) = seq.cache.as_mut().filter(|c| c.read) else {
            return (Vec::new(), 0);
        };
        let blocks = (seq.num_tokens - 1) / self.kv.block_size();
        c.hash_upto(&self.kv, version, blocks);
        (
            self.kv
                .lookup(version, c.salt, &c.hashes[..blocks], &c.tokens),
            seq.num_tokens,
        )
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
        let mut slots: FastMap<Key, (i32, i32)> = FastMap::default();
        for (id, _) in &batch {
            let Some(a) = self.seqs[id].adapter else {
                continue;
            };
            if slots.contains_key(&a) {
                continue;
            }
            let active = &self.active;
            // Admission keeps running + pinned adapters within max_loras, so this succeeds.
            let acquired = self
                .adapters
                .device
                .acquire(&a, |k| active.contains_key(k))
                .expect("admission reserved a slot");
            let host_slot = self
                .adapters
                .host
                .touch(&a)
                .expect("admitted weights are ready");
            slots.insert(a, (acquired.slot as i32, host_slot as i32));
            self.record_acquired(a, acquired);
        }
        let pending = std::mem::take(&mut self.pending);
        out.loads.extend(pending.loads);
        out.evictions.extend(pending.evictions);
        out.rejected.extend(pending.rejected);
        for (id, chunk) in batch {
            let looked = self.lookups.remove(&id).unwrap_or((0, 0));
            let seq = &self.seqs[&id];
            let (slot, host_slot) = seq.adapter.map_or((NO_SLOT, NO_SLOT), |a| slots[&a]);
            out.seqs.push(ScheduledSeq {
                request_id: id,
                adapter: seq.adapter,
                slot,
                host_slot,
                num_computed_tokens: seq.num_computed,
                num_new_tokens: chunk,
                samples: seq.num_computed + chunk == seq.num_tokens,
                block_table: self.kv.block_table(id).to_vec(),
                num_queried_tokens: looked.0,
                num_cached_tokens: looked.1,
            });
            self.last.push((id, chunk));
        }
    }

    /// Queues the slot traffic of a device acquisition for the next output: the eviction,
    /// and on a miss the load from the host tier.
    fn record_acquired(&mut self, key: Key, acquired: Acquired<Key>) {
        if let Some(evicted) = acquired.evicted {
            self.pending.evictions.push(Eviction {
                slot: acquired.slot,
                adapter: evicted,
            });
        }
        if !acquired.hit {
            let host_slot = self
                .adapters
                .host
                .get(&key)
                .expect("device keys are host keys");
            self.pending.loads.push(SlotLoad {
                slot: acquired.slot,
                adapter: key,
                host_slot,
            });
        }
    }

    /// Places validated weights that waited for a host slot, then hands out reads for the
    /// adapters waiting requests need, in the order admission takes them, as far ahead as the
    /// host slots that running and pinned adapters leave free reach; at most `max_loading`
    /// in flight.
    fn read_ahead(&mut self, out: &mut SchedulerOutput) {
        out.unheld.append(&mut self.adapters.unheld);
        let validated = self.adapters.validated_keys();
        let upcoming = if validated.is_empty() {
            FastMap::default()
        } else {
            self.upcoming()
        };
        for key in validated {
            let (placement, evicted) = self.place(key, false, &upcoming);
            self.unready(evicted);
            if let Placement::Slot(slot) = placement {
                out.commits.push((key, slot));
            }
        }
        let held = self.adapters.validated_keys(); // (those still without a slot)
        if held.is_empty() && self.adapters.num_loading() >= self.config.max_loading {
            return; // no read to hand out, none held to give way: the queue is not walked
        }
        let reach = self
            .adapters
            .host
            .capacity()
            .saturating_sub(self.num_committed_slots())
            .max(1);
        let upcoming: Vec<Key> = self
            .waiting
            .adapters_in_order()
            .flatten()
            .take(reach)
            .collect();
        self.yield_held(held, &upcoming, out);
        let room = self
            .config
            .max_loading
            .saturating_sub(self.adapters.num_loading());
        if room == 0 {
            return;
        }
        for key in upcoming {
            if out.reads.len() == room {
                break;
            }
            if let Some(job) = self.adapters.begin_read(key) {
                out.reads.push(job);
            }
        }
    }

    /// Validated weights that wait for a host slot (`held`) count against `max_loading`.
    /// Where an adapter of `upcoming` (the queue's, in admission order) must be read and no read is
    /// left, the held weights the queue wants last, if later than it (or not at all), are
    /// dropped (`unheld`; read again when wanted): held weights never keep an adapter wanted
    /// sooner from being read. (Without it, weights held for a request since aborted, and
    /// others for a later one, could fill `max_loading` while the head of a strict FIFO
    /// queue waited for a read forever.)
    fn yield_held(&mut self, held: Vec<Key>, upcoming: &[Key], out: &mut SchedulerOutput) {
        if held.is_empty() {
            return;
        }
        let at = |k: &Key| upcoming.iter().position(|u| u == k).unwrap_or(usize::MAX);
        let mut held: Vec<(usize, Key)> = held.into_iter().map(|k| (at(&k), k)).collect();
        held.sort_unstable();
        let mut room = self
            .config
            .max_loading
            .saturating_sub(self.adapters.num_loading());
        for (i, key) in upcoming.iter().enumerate() {
            if self.adapters.residency(*key) != Residency::Absent {
                continue;
            }
            if room > 0 {
                room -= 1;
                continue;
            }
            match held.last() {
                Some(&(wanted_at, victim)) if wanted_at > i => {
                    held.pop();
                    self.adapters.unplace(victim);
                    out.unheld.push(victim);
                }
                _ => break,
            }
        }
    }

    /// Applies the last step's results: tokens computed, one sampled token per request that
    /// sampled (`sampled`: its id, for requests in the prefix cache; one missing there takes
    /// no further part), and `finished` (reported by the caller: EOS, stop strings,
    /// `max_tokens`). Full blocks computed this step enter the prefix cache. Returns the
    /// requests the scheduler itself finished for reaching `max_model_len`.
    pub fn postprocess(
        &mut self,
        finished: &[RequestId],
        sampled: &[(RequestId, u32)],
    ) -> Vec<RequestId> {
        let mut done: std::collections::HashSet<RequestId> = finished.iter().copied().collect();
        let sampled: FastMap<RequestId, u32> = sampled.iter().copied().collect();
        let mut length_capped = Vec::new();
        let bs = self.kv.block_size();
        for (id, chunk) in std::mem::take(&mut self.last) {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.num_computed += chunk;
            // the full blocks computed so far enter the cache (their tokens are all known)
            let version = version_of(seq.adapter);
            let current = seq
                .adapter
                .is_none_or(|k| self.adapters.is_live(k) && !self.adapters.is_retired(k));
            if let (Some(c), true) = (seq.cache.as_mut(), current) {
                let full = seq.num_computed / bs;
                c.hash_upto(&self.kv, version, full);
                while c.recorded < full {
                    let i = c.recorded;
                    let parent = if i == 0 { c.salt } else { c.hashes[i - 1] };
                    let tokens = &c.tokens[i * bs..(i + 1) * bs];
                    self.kv
                        .cache_block(id, i, c.hashes[i], parent, version, tokens);
                    c.recorded += 1;
                }
            } // (a replaced version's blocks would be found by no later request)
            if seq.num_computed == seq.num_tokens {
                seq.num_tokens += 1;
                if seq.num_tokens >= self.config.max_model_len && done.insert(id) {
                    length_capped.push(id);
                }
                match (seq.cache.as_mut(), sampled.get(&id)) {
                    (Some(c), Some(&token)) => c.tokens.push(token),
                    (Some(_), None) => seq.cache = None, // its tokens are no longer known
                    (None, _) => {}
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

    /// One request runs at a time; `slots` device and host slots.
    fn one_seat(slots: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_num_seqs: 1,
            max_loras: slots,
            max_cpu_loras: slots,
            ..SchedulerConfig::default()
        })
        .unwrap()
    }

    /// Registers adapter `id` and reads it into the host tier at once.
    fn ready(s: &mut Scheduler, id: i64) -> Key {
        let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
        let key = s.register_adapter(&request).unwrap().0;
        if let Staging::Read(_) = s.stage_adapter(key).unwrap() {
            if let Placement::Slot(slot) = s.adapter_validated(key, true) {
                s.adapter_loaded(key, slot);
            }
        }
        key
    }

    fn submit(s: &Scheduler, id: RequestId, adapter: Option<Key>) {
        let req = NewRequest {
            id,
            num_prompt_tokens: 4,
            adapter,
            priority: 0,
            ..Default::default()
        };
        s.submitter().add(req).unwrap();
    }

    #[test]
    fn remove_adapter_counts_queued_requests() {
        let mut s = scheduler(1, 1);
        let k = ready(&mut s, 7);
        submit(&s, 1, Some(k));
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
        let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
        s.pin_adapter(k1).unwrap();
        submit(&s, 10, Some(k2));
        submit(&s, 11, Some(k1));
        let out = s.schedule();
        assert_eq!(out.seqs.len(), 1);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].0, 10);
        assert!(matches!(
            out.rejected[0].1,
            Error::NoFreeSlot { adapter: 2, .. }
        ));
        s.postprocess(&[11], &[]);
        assert!(!s.has_unfinished());
        assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
    }

    #[test]
    fn pinning_the_last_slot_past_waiting_requests_is_refused() {
        let mut s = scheduler(1, 2);
        let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
        submit(&s, 1, Some(k2));
        assert!(matches!(
            s.pin_adapter(k1),
            Err(Error::NoFreeSlot { adapter: 1, .. })
        ));
        assert!(s.pin_adapter(k2).is_ok()); // its own requests are not stranded
    }

    #[test]
    fn waiting_requests_run_once_their_adapter_is_read() {
        let mut s = scheduler(2, 2);
        let request = LoRARequest::new("slow", 5, "/a/slow").unwrap();
        let (key, _) = s.register_adapter(&request).unwrap();
        submit(&s, 1, Some(key));
        submit(&s, 2, None);
        let out = s.schedule();
        assert_eq!(out.seqs.len(), 1); // the base request runs meanwhile
        assert_eq!(out.reads.len(), 1);
        let job = out.reads[0].clone();
        assert_eq!((job.key, job.request.lora_int_id), (key, 5));
        assert!(s.schedule().reads.is_empty()); // one read per adapter
        let Placement::Slot(slot) = s.adapter_validated(key, false) else {
            panic!("a free host slot")
        };
        s.adapter_loaded(key, slot);
        let out = s.schedule();
        assert_eq!(
            out.seqs.iter().map(|q| q.request_id).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(out.loads[0].host_slot, slot);
    }

    #[test]
    fn a_failed_read_fails_only_its_requests() {
        let mut s = scheduler(2, 2);
        let bad = LoRARequest::new("bad", 5, "/a/bad").unwrap();
        let (key, _) = s.register_adapter(&bad).unwrap();
        let good = ready(&mut s, 6);
        submit(&s, 1, Some(key));
        submit(&s, 2, Some(good));
        assert_eq!(s.schedule().reads[0].key, key);
        s.adapter_failed(key, "adapter 'bad': corrupt");
        submit(&s, 3, Some(key)); // submitted after the failure
        let out = s.schedule();
        let rejected: Vec<_> = out
            .rejected
            .iter()
            .map(|(id, e)| (*id, e.to_string()))
            .collect();
        assert_eq!(rejected[0], (1, "adapter 'bad': corrupt".to_string()));
        assert_eq!(rejected[1].0, 3);
        assert_eq!(s.adapter_key(5), None);
        assert_eq!(s.resident_adapters(), vec![6]);
    }

    #[test]
    fn a_read_ahead_waits_rather_than_evict_what_is_wanted_sooner() {
        let mut s = scheduler(1, 1);
        let first = ready(&mut s, 1);
        let request = LoRARequest::new("later", 2, "/a/later").unwrap();
        let (later, _) = s.register_adapter(&request).unwrap();
        submit(&s, 1, Some(first));
        submit(&s, 2, Some(later));
        let out = s.schedule(); // runs request 1; reads 'later'
        assert_eq!((out.seqs.len(), out.reads.len()), (1, 1));
        assert_eq!(s.adapter_validated(later, false), Placement::Wait); // 1 is in use
        s.postprocess(&[1], &[]);
        let out = s.schedule(); // adapter 1 is idle now: the waiting weights get its slot
        assert_eq!(out.commits, vec![(later, 0)]);
        assert_eq!(s.resident_adapters(), Vec::<i64>::new());
        s.adapter_loaded(later, 0);
        assert_eq!(s.schedule().seqs[0].request_id, 2);
    }

    #[test]
    fn held_weights_give_way_to_a_read_wanted_sooner() {
        // one host slot, one read in flight: weights held for a request since aborted must
        // not keep the next request's adapter from being read (found by scheduler_props)
        let mut s = Scheduler::new(SchedulerConfig {
            max_loras: 1,
            max_cpu_loras: 1,
            max_loading: 1,
            max_skipped_steps: 0,
            ..SchedulerConfig::default()
        })
        .unwrap();
        let first = ready(&mut s, 1);
        let reg = |s: &mut Scheduler, id: i64| {
            let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
            s.register_adapter(&request).unwrap().0
        };
        let (held, next) = (reg(&mut s, 2), reg(&mut s, 3));
        submit(&s, 1, Some(first));
        submit(&s, 2, Some(held));
        let out = s.schedule(); // runs request 1; reads adapter 2
        assert_eq!(
            out.reads.iter().map(|r| r.key).collect::<Vec<_>>(),
            vec![held]
        );
        assert_eq!(s.adapter_validated(held, false), Placement::Wait); // 1 is in use
        s.submitter().abort(2).unwrap();
        submit(&s, 3, Some(next));
        let out = s.schedule();
        assert_eq!(out.unheld, vec![held]);
        assert_eq!(
            out.reads.iter().map(|r| r.key).collect::<Vec<_>>(),
            vec![next]
        );
        s.postprocess(&[1], &[]);
        assert_eq!(s.adapter_validated(next, false), Placement::Slot(0));
        s.adapter_loaded(next, 0);
        assert_eq!(s.schedule().seqs[0].request_id, 3);
    }

    #[test]
    fn placement_evicts_what_the_queue_wants_last() {
        let mut s = one_seat(3);
        let (k1, k2, _k3) = (ready(&mut s, 1), ready(&mut s, 2), ready(&mut s, 3));
        let reg = |s: &mut Scheduler, id: i64| {
            let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
            s.register_adapter(&request).unwrap().0
        };
        let (k4, k5, k6) = (reg(&mut s, 4), reg(&mut s, 5), reg(&mut s, 6));
        submit(&s, 10, None); // runs; the others wait for the one seat
        submit(&s, 11, Some(k4));
        submit(&s, 12, Some(k1));
        submit(&s, 13, Some(k2));
        submit(&s, 14, Some(k5));
        let out = s.schedule();
        assert_eq!(out.seqs.len(), 1);
        assert!(out.reads.iter().any(|job| job.key == k4));
        // 1 is the least recently used, but 3 is the one nobody waits for
        let Placement::Slot(slot) = s.adapter_validated(k4, false) else {
            panic!("3 can go")
        };
        s.adapter_loaded(k4, slot);
        assert_eq!(s.resident_adapters(), vec![1, 2, 4]);
        // 5 comes after 4, 1 and 2 in the queue: it waits rather than evict them
        if let Staging::Read(_) = s.stage_adapter(k5).unwrap() {
            assert_eq!(s.adapter_validated(k5, false), Placement::Wait);
        }
        // an explicit add evicts the one the queue wants last (2), not the oldest (1)
        assert!(matches!(s.stage_adapter(k6).unwrap(), Staging::Read(_)));
        assert!(matches!(s.adapter_validated(k6, true), Placement::Slot(_)));
        assert_eq!(s.resident_adapters(), vec![1, 4]);
        assert!(s.adapters.residency(k2) != Residency::Ready);
    }

    #[test]
    fn a_read_ahead_waits_for_a_running_request_rather_than_evict_a_wanted_adapter() {
        let mut s = one_seat(2);
        let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
        let request = LoRARequest::new("a3", 3, "/a/3").unwrap();
        let k3 = s.register_adapter(&request).unwrap().0;
        submit(&s, 10, None); // runs first
        submit(&s, 11, Some(k3));
        submit(&s, 12, Some(k1));
        submit(&s, 13, Some(k2));
        let (mut reads, mut finished) = (Vec::new(), Vec::new());
        for _ in 0..40 {
            let out = s.schedule();
            for job in &out.reads {
                reads.push(job.key);
                // 1 and 2 are wanted by waiting requests and a request runs: 3 waits
                match s.adapter_validated(job.key, false) {
                    Placement::Slot(slot) => s.adapter_loaded(job.key, slot),
                    Placement::Wait => assert!(s.num_running() > 0),
                    Placement::Gone => panic!("nothing removed it"),
                }
            }
            for &(key, slot) in &out.commits {
                s.adapter_loaded(key, slot);
            }
            let ids: Vec<_> = out.seqs.iter().map(|q| q.request_id).collect();
            s.postprocess(&ids, &[]); // each request ends after one step
            finished.extend(ids);
            if !s.has_unfinished() {
                break;
            }
        }
        finished.sort_unstable();
        assert_eq!(finished, [10, 11, 12, 13]);
        assert_eq!(reads, [k3]); // no adapter read twice: 3 took a slot nothing wanted
        assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
    }

    #[test]
    fn host_tier_evicts_lru_and_keeps_pins() {
        let mut s = scheduler(1, 2);
        let k1 = ready(&mut s, 1);
        ready(&mut s, 2);
        s.pin_adapter(k1).unwrap();
        ready(&mut s, 3); // 1 is pinned: 2 goes
        assert_eq!(s.resident_adapters(), vec![1, 3]);
        s.unpin_adapter(k1);
        ready(&mut s, 4);
        assert_eq!(s.resident_adapters(), vec![3, 4]);
    }

    #[test]
    fn a_reload_serves_running_requests_on_the_old_weights() {
        let mut s = scheduler(2, 3);
        let old = ready(&mut s, 1);
        submit(&s, 1, Some(old));
        assert_eq!(s.schedule().seqs.len(), 1);
        let request = LoRARequest::new("a1", 1, "/a/1").unwrap();
        let (new, was_pinned) = s.reload_adapter(&request).unwrap();
        assert!(new != old && !was_pinned);
        assert!(s.adapters().is_live(old)); // still running
        s.postprocess(&[1], &[]);
        assert!(!s.adapters().is_live(old));
        assert_eq!(s.adapter_key(1), Some(new));
    }
}
