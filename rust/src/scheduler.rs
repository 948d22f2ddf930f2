//! Batch formation: which requests run this step, with how many tokens, on which adapter
//! slots and KV blocks (the adapter lifecycle and read-ahead, the scheduler's other idea,
//! are in `lifecycle`; the prefix cache's blocks in `kv`).
//!
//! Each step: running requests first (decode, or the next chunk of a long prompt; when KV
//! blocks run out the newest running request is preempted), then waiting ones in
//! (priority, arrival) order. A waiting request is admitted once its adapter's weights are in
//! the host tier; until then others run, and the adapter's read is handed to the engine's
//! loader pool, in the order admission will want it. A waiting request whose adapter has no
//! device slot is passed over without blocking those behind it whose adapter is active; if the
//! oldest waiting request is passed over for `max_skipped_steps` steps, other adapters'
//! admissions stop until it can run. Under fair share (`fair`), waiting requests are taken
//! by their client's least counter instead of by arrival, each lane (an adapter's requests,
//! or one tenant's of them) by its head. Running requests never span more than `max_loras`
//! adapters (pinned ones included), so every running request's adapter fits on the device.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::adapters::{Adapters, Key};
use crate::batch::{ScheduledSeq, SchedulerOutput, NO_SLOT};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::fair::{tenant_client, ClientId, FairHead, FairShare};
use crate::kv::{cache_computed, prefix_hit, BlockManager, RequestId, SeqCache};
use crate::queue::RequestQueue;
use crate::submit::{Command, NewRequest, Submitter};
use crate::waiting::{AdapterKey, Lane, OrderKey, TenantId, WaitingQueues};
use crate::FastMap;

pub(crate) struct Seq {
    pub(crate) adapter: AdapterKey,
    /// The tenant it names under fair share (0: none; see `fair`).
    tenant: TenantId,
    order: OrderKey,
    pub(crate) num_tokens: usize,
    pub(crate) num_computed: usize,
    /// Its part in the prefix cache (`None`: none).
    pub(crate) cache: Option<SeqCache>,
    /// Whose share it counts against (fair share), and its prompt's length.
    pub(crate) client: ClientId,
    num_prompt: usize,
    /// Whether its prompt has been charged (a preempted request is not charged twice).
    prompt_charged: bool,
}

impl Seq {
    fn lane(&self) -> Lane {
        (self.adapter, self.tenant)
    }
}

/// The scheduler. Single consumer: one thread at a time calls `schedule` / `postprocess`
/// and the adapter methods; any number submit through [`Submitter`]s.
pub struct Scheduler {
    pub(crate) config: SchedulerConfig,
    pub(crate) queue: Arc<RequestQueue<Command>>,
    pub(crate) kv: BlockManager,
    pub(crate) adapters: Adapters,
    pub(crate) seqs: FastMap<RequestId, Seq>,
    pub(crate) waiting: WaitingQueues,
    /// Admission order; the newest (last) is preempted first.
    pub(crate) running: Vec<RequestId>,
    /// Running requests per adapter key.
    pub(crate) active: FastMap<Key, usize>,
    /// What the last `schedule` ran, for `postprocess`.
    pub(crate) last: Vec<(RequestId, usize)>,
    pub(crate) num_arrivals: u64,
    pub(crate) step: u64,
    /// The oldest waiting request, and the step since which it has been passed over.
    pub(crate) passed_over: Option<(RequestId, u64)>,
    /// Slot traffic and failures decided between steps, reported by the next `schedule`.
    pub(crate) pending: SchedulerOutput,
    /// Requests admitted this step: (tokens looked up in the prefix cache, tokens found).
    pub(crate) lookups: FastMap<RequestId, (usize, usize)>,
    /// With `scheduling_policy="fair"`: each client's virtual token counter.
    pub(crate) fair: Option<FairShare>,
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
            fair: None,
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
    pub(crate) fn drain_pending(&mut self) {
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
        // without fair share, a tenant changes nothing
        let tenant = req
            .tenant
            .as_deref()
            .map_or(0, |name| self.fair_tenant(name));
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
        let client = match tenant {
            0 => req
                .adapter
                .map_or(0, |k| self.adapters.request(k).map_or(k, |r| r.lora_int_id)),
            t => tenant_client(t),
        };
        if let Some(f) = self.fair.as_mut() {
            f.arrive(client);
        }
        let seq = Seq {
            adapter: req.adapter,
            tenant,
            order,
            num_tokens: req.num_prompt_tokens,
            num_computed: 0,
            cache,
            client,
            num_prompt: req.num_prompt_tokens,
            prompt_charged: false,
        };
        self.seqs.insert(req.id, seq);
        self.waiting.push((req.adapter, tenant), order, req.id);
        self.fair_sync_lane((req.adapter, tenant));
        Ok(())
    }

    /// Forgets `id` wherever it is; `false` if unknown.
    pub(crate) fn remove(&mut self, id: RequestId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        if let Some(f) = self.fair.as_mut() {
            f.leave(seq.client);
        }
        if self.waiting.remove(seq.lane(), seq.order).is_none() {
            self.running.retain(|r| *r != id);
            self.release(id, seq.adapter);
        } else {
            self.fair_sync_lane(seq.lane());
            if let Some(key) = seq.adapter {
                self.drop_if_unused(key);
            }
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
        let (lane, order) = (seq.lane(), seq.order);
        self.release(id, lane.0);
        self.waiting.push(lane, order, id);
        self.fair_sync_lane(lane);
    }

    fn admit_waiting(&mut self, batch: &mut Vec<(RequestId, usize)>, tokens_left: &mut usize) {
        let mut drain_for = self.update_aging();
        // Slots held by running and pinned adapters, kept up to date as requests join.
        let mut committed = self.num_committed_slots();
        // Once no slot is free, only running or pinned adapters (and the base model) can be
        // admitted, and admitting them frees no slot: the candidates stay fixed for the step,
        // and their lanes' heads are kept here, one updated per admission.
        let mut restricted: Option<BTreeSet<(OrderKey, Lane)>> = None;
        // Fair share's candidates (built for "a slot is free" or not), least counter first.
        let mut fair_heads: Option<(bool, BTreeSet<FairHead>)> = None;
        let mut picked: Option<FairHead> = None;
        while self.running.len() < self.config.max_num_seqs && *tokens_left > 0 {
            let free_slot = restricted.is_none() && committed < self.config.max_loras;
            let next = match drain_for {
                None if self.fair.is_some() => {
                    if fair_heads
                        .as_ref()
                        .is_none_or(|(free, _)| *free != free_slot)
                    {
                        fair_heads = Some((free_slot, self.fair_candidates(free_slot)));
                    }
                    let heads = &mut fair_heads.as_mut().expect("built").1;
                    picked = self.pop_fair(heads);
                    picked.map(|(_, order, lane, _)| (order, lane))
                }
                Some(a) => self
                    .waiting
                    .first_among([a, None].into_iter().filter(|k| self.can_admit(*k))),
                None if restricted.is_none() && committed < self.config.max_loras => {
                    self.waiting.first_ready()
                }
                None => {
                    let heads = restricted.get_or_insert_with(|| {
                        let waiting = &self.waiting;
                        let lanes = self.slotted_queues().into_iter();
                        lanes
                            .filter_map(|l| waiting.head(l).map(|(k, _)| (k, l)))
                            .collect()
                    });
                    heads.first().copied()
                }
            };
            let Some((order, lane)) = next else { break };
            let adapter = lane.0;
            let id = self.waiting.head(lane).expect("head exists").1;
            let seq = self.seqs.get_mut(&id).expect("waiting request is known");
            let (hit, queried) = prefix_hit(&self.kv, seq);
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
            seq.num_computed = start;
            let (client, mut counter) = (seq.client, 0.0); // its client's, after this
            if let Some(f) = self.fair.as_mut() {
                let prompt = seq.num_prompt.saturating_sub(start);
                let charged = if seq.prompt_charged { 0 } else { prompt }; // once, uncached
                seq.prompt_charged = true;
                counter = f.charge(client, charged, 0);
            }
            if let Some(c) = seq.cache.as_mut() {
                c.recorded = hit.len();
            }
            self.lookups.insert(id, (queried, start));
            if fair_heads.is_some() {
                self.waiting.pop_deferred(lane); // synced after the loop, as below
            } else if let Some(heads) = restricted.as_mut() {
                // the global head indexes are synced once, after the loop
                self.waiting.pop_deferred(lane);
                heads.remove(&(order, lane));
                if let Some((k, _)) = self.waiting.head(lane) {
                    heads.insert((k, lane));
                }
            } else {
                self.waiting.remove(lane, order);
            }
            self.fair_sync_lane(lane);
            if let Some((_, heads)) = fair_heads.as_mut() {
                // only the admitted client's counter moved, and its lane's entry with it (its
                // other lanes', if a tenant's over several adapters, when they come up)
                let drained = picked.take().is_none(); // admitted by aging's drain instead
                self.fair_renew(heads, (lane, drained), client, counter);
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

    /// The adapters admission may take from once no device slot is free: running and
    /// pinned ones (they hold one) and the base model.
    pub(crate) fn slotted_adapters(&self) -> Vec<AdapterKey> {
        let pinned = self.adapters.device.pinned_keys().into_iter();
        let mut keys: Vec<AdapterKey> = pinned
            .chain(self.active.keys().copied())
            .map(Some)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.push(None);
        keys
    }

    /// The lanes of [`Self::slotted_adapters`].
    pub(crate) fn slotted_queues(&self) -> Vec<Lane> {
        let waiting = &self.waiting;
        let adapters = self.slotted_adapters().into_iter();
        adapters
            .flat_map(|a| waiting.lanes_of(a).map(move |t| (a, t)))
            .collect()
    }

    /// Tracks how long the oldest waiting request has lacked an adapter slot; returns its
    /// adapter once that exceeds `max_skipped_steps`.
    fn update_aging(&mut self) -> Option<AdapterKey> {
        let first = self.waiting.first().filter(|(_, l)| !self.can_admit(l.0));
        let Some((_, lane)) = first else {
            self.passed_over = None;
            return None;
        };
        let adapter = lane.0;
        let id = self.waiting.head(lane).expect("head exists").1;
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
        for (id, chunk) in std::mem::take(&mut self.last) {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.num_computed += chunk;
            cache_computed(&mut self.kv, &self.adapters, id, seq); // its full blocks so far
            if seq.num_computed == seq.num_tokens {
                seq.num_tokens += 1;
                if let Some(f) = self.fair.as_mut() {
                    f.charge(seq.client, 0, 1);
                }
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
                    if let Some(f) = self.fair.as_mut() {
                        f.leave(seq.client);
                    }
                    if self.waiting.remove(seq.lane(), seq.order).is_none() {
                        self.release(id, seq.adapter);
                    } else {
                        self.fair_sync_lane(seq.lane());
                    }
                }
            }
        }
        length_capped
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
