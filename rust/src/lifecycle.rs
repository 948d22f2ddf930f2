//! The adapter lifecycle beside batch formation: registration and in-place reloads, reads
//! staged and placed into the host tier, pins, removal, which adapters may be admitted, the
//! device slot traffic a step causes, and read-ahead (which adapters the waiting requests
//! will want, read in the order admission will take them). Methods of [`Scheduler`]; the
//! batch itself is formed in `scheduler`.

use crate::adapters::{Key, Placement, ReadJob, Residency};
use crate::batch::{Eviction, SchedulerOutput, SlotLoad};
use crate::error::{Error, Result};
use crate::kv::RequestId;
use crate::lru::Acquired;
use crate::request::{AdapterId, LoRARequest};
use crate::scheduler::Scheduler;
use crate::waiting::AdapterKey;
use crate::FastMap;

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

impl Scheduler {
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
        let upcoming = self.upcoming(&[key]);
        let (placement, evicted) = self.place(key, explicit, &upcoming);
        self.unready(evicted);
        if explicit && placement == Placement::Wait {
            self.adapters.unplace(key);
        }
        placement
    }

    /// Where the host tier's adapters and `extra` come, relative to each other, in the
    /// order admission takes the waiting queues (arrival order; under fair share, their
    /// clients' counters first): only these are ever compared (which one to evict, and
    /// whether one is wanted before `key`), so only these are ranked. Not waiting: absent.
    fn upcoming(&self, extra: &[Key]) -> FastMap<Key, usize> {
        let host = self
            .adapters
            .host
            .entries_by_recency()
            .into_iter()
            .map(|(k, _)| k);
        let mut keys: Vec<Key> = host.chain(extra.iter().copied()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut ranked: Vec<(u64, crate::waiting::OrderKey, Key)> = keys
            .into_iter()
            .filter_map(|k| match self.fair.is_some() {
                true => self
                    .fair_adapter_head(Some(k))
                    .map(|(bits, order, _, _)| (bits, order, k)),
                false => self
                    .waiting
                    .adapter_head(Some(k))
                    .map(|(order, _)| (0, order, k)),
            })
            .collect();
        ranked.sort_unstable();
        ranked
            .into_iter()
            .enumerate()
            .map(|(i, (_, _, k))| (k, i))
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
    pub(crate) fn drop_if_unused(&mut self, key: Key) {
        let unused = !self.active.contains_key(&key) && !self.waiting.has(Some(key));
        if unused && self.adapters.is_retired(key) {
            self.adapters.forget(key);
            self.waiting.set_ready(key, false);
        }
    }

    /// Slots that running requests' adapters and pinned adapters hold together.
    pub(crate) fn num_committed_slots(&self) -> usize {
        let device = &self.adapters.device;
        let active_pinned = self.active.keys().filter(|a| device.is_pinned(a)).count();
        self.active.len() + device.num_pinned() - active_pinned
    }

    /// Whether a slot is left for an adapter that is neither running nor pinned.
    fn has_free_slot(&self) -> bool {
        self.num_committed_slots() < self.config.max_loras
    }

    pub(crate) fn can_admit(&self, adapter: AdapterKey) -> bool {
        adapter.is_none_or(|a| {
            self.adapters.residency(a) == Residency::Ready
                && (self.active.contains_key(&a)
                    || self.adapters.device.is_pinned(&a)
                    || self.has_free_slot())
        })
    }

    /// Queues the slot traffic of a device acquisition for the next output: the eviction,
    /// and on a miss the load from the host tier.
    pub(crate) fn record_acquired(&mut self, key: Key, acquired: Acquired<Key>) {
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
    pub(crate) fn read_ahead(&mut self, out: &mut SchedulerOutput) {
        out.unheld.append(&mut self.adapters.unheld);
        let validated = self.adapters.validated_keys();
        let upcoming = if validated.is_empty() {
            FastMap::default()
        } else {
            self.upcoming(&validated)
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
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
