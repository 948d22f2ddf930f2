//! Adapter residency in one place: identity (the registry), the host tier of validated
//! weights (filled off the step thread by the engine's loader pool), the device slots, pins.
//!
//! The scheduler knows adapters by *key*, one per set of weights: a reload (`load_inplace`)
//! gets a new key, so requests already running finish on the weights they started with while
//! new ones use the new weights; the replaced key is dropped once nothing uses it. Every
//! device-resident key is also host-resident (the host copy is what a device slot is loaded
//! from), so on a backend whose device is the host a device slot needs no second copy.

use std::collections::BTreeSet;

use crate::error::Result;
use crate::lru::LruCache;
use crate::registry::AdapterRegistry;
use crate::request::{AdapterId, LoRARequest};
use crate::FastMap;

/// The scheduler's name for one set of an adapter's weights.
pub type Key = i64;

/// A read for the engine's loader pool: `request`'s adapter from disk, validated, then placed
/// (`adapter_validated`) and copied into the host slot the core names.
#[derive(Debug, Clone)]
pub struct ReadJob {
    /// The weights' key.
    pub key: Key,
    /// The adapter to read.
    pub request: LoRARequest,
}

/// Where a key's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// On disk only.
    Absent,
    /// Being read, validated and waiting for a host slot, or being copied into one.
    Loading,
    /// Validated, in a host slot.
    Ready,
}

/// What a validated read gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Copy the weights into this host slot, then report `adapter_loaded`.
    Slot(usize),
    /// No host slot can be had now: hold the weights; the core names a slot later.
    Wait,
    /// The key was forgotten meanwhile: drop the weights.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    /// Read and validated by the loader pool, no host slot yet.
    Reading,
    Validated,
    /// Being copied into its host slot.
    Filling,
    Ready,
}

struct Weights {
    request: LoRARequest,
    state: State,
    /// Forgotten while its copy was in flight: its host slot is freed when the copy ends.
    dropped: bool,
    /// Replaced by a reload: dropped once no request uses it.
    retired: bool,
}

/// Identity and tiers. Pins are kept in both tiers' LRUs; a key is in the host LRU while it is
/// being copied into its slot or ready there.
pub struct Adapters {
    registry: AdapterRegistry,
    current: FastMap<AdapterId, Key>,
    weights: FastMap<Key, Weights>,
    pub(crate) host: LruCache<Key>,
    pub(crate) device: LruCache<Key>,
    num_loading: usize,
    next_key: Key,
    /// Validated weights forgotten before they got a slot: the engine drops its copy.
    pub(crate) unheld: Vec<Key>,
    /// Keys whose validated weights wait for a host slot (few: at most `max_loading`).
    validated: BTreeSet<Key>,
}

impl Adapters {
    /// No adapters; `max_loras` device slots and `max_cpu_loras` host slots.
    pub fn new(max_loras: usize, max_cpu_loras: usize) -> Self {
        Self {
            registry: AdapterRegistry::new(),
            current: FastMap::default(),
            weights: FastMap::default(),
            host: LruCache::new(max_cpu_loras),
            device: LruCache::new(max_loras),
            num_loading: 0,
            next_key: 1,
            unheld: Vec::new(),
            validated: BTreeSet::new(),
        }
    }

    fn new_key(&mut self, request: &LoRARequest) -> Key {
        let key = self.next_key;
        self.next_key += 1;
        let weights = Weights {
            request: request.clone(),
            state: State::Absent,
            dropped: false,
            retired: false,
        };
        self.weights.insert(key, weights);
        self.current.insert(request.lora_int_id, key);
        key
    }

    /// Registers `request` (id, name and path uniqueness enforced); returns the key of its
    /// current weights and whether it was new.
    ///
    /// # Errors
    /// [`crate::Error::AdapterConflict`] naming both adapters.
    pub fn register(&mut self, request: &LoRARequest) -> Result<(Key, bool)> {
        if self.registry.register(request)? {
            return Ok((self.new_key(request), true));
        }
        Ok((self.current[&request.lora_int_id], false))
    }

    /// Gives a registered adapter new weights (vLLM's `load_inplace`): a new key, possibly a
    /// new path; returns it and the replaced key, now retired.
    ///
    /// # Errors
    /// [`crate::Error::AdapterConflict`] when the id is registered under another name.
    pub fn reload(&mut self, request: &LoRARequest) -> Result<(Key, Option<Key>)> {
        let Some(old) = self.registry.get(request.lora_int_id) else {
            return Ok((self.register(request)?.0, None));
        };
        if old.lora_name != request.lora_name {
            self.registry.register(request)?; // the conflict, naming both
        }
        self.registry.unregister(request.lora_int_id)?;
        self.registry.register(request)?;
        let old_key = self.current[&request.lora_int_id];
        if let Some(w) = self.weights.get_mut(&old_key) {
            w.retired = true;
        }
        Ok((self.new_key(request), Some(old_key)))
    }

    /// The adapter registered under `name` (its identity: id, name, current path).
    pub fn by_name(&self, name: &str) -> Option<LoRARequest> {
        self.registry.get_by_name(name)
    }

    /// Every registered adapter, by ascending id.
    pub fn registered(&self) -> Vec<LoRARequest> {
        let ids = self.registry.ids();
        ids.into_iter()
            .filter_map(|id| self.registry.get(id))
            .collect()
    }

    /// The key of `id`'s current weights.
    pub fn key_of(&self, id: AdapterId) -> Option<Key> {
        self.current.get(&id).copied()
    }

    /// Every live key of `id` (current and retired).
    pub fn keys_of(&self, id: AdapterId) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .weights
            .iter()
            .filter(|(_, w)| w.request.lora_int_id == id && !w.dropped)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Whether `key` names weights that requests may use.
    pub fn is_live(&self, key: Key) -> bool {
        self.weights.get(&key).is_some_and(|w| !w.dropped)
    }

    /// Whether `key` was replaced by a reload.
    pub fn is_retired(&self, key: Key) -> bool {
        self.weights.get(&key).is_some_and(|w| w.retired)
    }

    /// The adapter `key` belongs to.
    pub fn request(&self, key: Key) -> Option<&LoRARequest> {
        self.weights.get(&key).map(|w| &w.request)
    }

    fn state(&self, key: Key) -> Option<State> {
        self.weights.get(&key).map(|w| w.state)
    }

    /// Where `key`'s weights are.
    pub fn residency(&self, key: Key) -> Residency {
        match self.state(key) {
            None | Some(State::Absent) => Residency::Absent,
            Some(State::Ready) => Residency::Ready,
            Some(_) => Residency::Loading,
        }
    }

    /// Reads handed out and not yet ready (validated weights waiting for a slot included).
    pub fn num_loading(&self) -> usize {
        self.num_loading
    }

    /// Keys whose validated weights wait for a host slot.
    pub fn validated_keys(&self) -> Vec<Key> {
        self.validated.iter().copied().collect()
    }

    /// Hands out the read of an absent key (`None` otherwise). Nothing is evicted until the
    /// weights prove valid.
    pub fn begin_read(&mut self, key: Key) -> Option<ReadJob> {
        let w = self.weights.get_mut(&key)?;
        if w.state != State::Absent {
            return None;
        }
        w.state = State::Reading;
        self.num_loading += 1;
        Some(ReadJob {
            key,
            request: w.request.clone(),
        })
    }

    /// A read proved valid: gives it a host slot if one can be had without evicting a pinned
    /// key, one being copied, or one `rank` keeps (`None`); of the others the highest rank
    /// goes (see [`LruCache::acquire_ranked`]). Returns the placement and the key evicted
    /// for it (its device slot, if any, is freed too).
    pub fn place(
        &mut self,
        key: Key,
        rank: impl Fn(&Key) -> Option<usize>,
    ) -> (Placement, Option<Key>) {
        if !matches!(self.state(key), Some(State::Reading | State::Validated)) {
            return (Placement::Gone, None);
        }
        let weights = &self.weights;
        let acquired = self.host.acquire_ranked(&key, |k| {
            if weights.get(k).is_some_and(|w| w.state == State::Filling) {
                None
            } else {
                rank(k)
            }
        });
        let w = self.weights.get_mut(&key).expect("checked");
        let Some(acquired) = acquired else {
            w.state = State::Validated;
            self.validated.insert(key);
            return (Placement::Wait, None);
        };
        w.state = State::Filling;
        self.validated.remove(&key);
        if let Some(evicted) = acquired.evicted {
            self.device.remove(&evicted);
            if let Some(e) = self.weights.get_mut(&evicted) {
                e.state = State::Absent;
            }
        }
        (Placement::Slot(acquired.slot), acquired.evicted)
    }

    /// A validated read that will not be placed (no room for an explicit `add_lora`): the key
    /// is absent again, to be read when needed.
    pub fn unplace(&mut self, key: Key) {
        if let Some(w) = self.weights.get_mut(&key) {
            if matches!(w.state, State::Reading | State::Validated) {
                w.state = State::Absent;
                self.validated.remove(&key);
                self.num_loading -= 1;
            }
        }
    }

    /// Ends `key`'s copy into `host_slot`. Returns whether the weights are now ready (false:
    /// the key was forgotten meanwhile, or the report does not match a copy in flight).
    pub fn end_fill(&mut self, key: Key, host_slot: usize) -> bool {
        let filling =
            self.host.get(&key) == Some(host_slot) && self.state(key) == Some(State::Filling);
        if !filling {
            return false;
        }
        self.num_loading -= 1;
        let w = self.weights.get_mut(&key).expect("checked");
        w.state = State::Ready;
        if w.dropped {
            self.weights.remove(&key);
            self.host.remove(&key);
            return false;
        }
        true
    }

    /// Forgets weights whose read or copy failed; the loader is done with their slot.
    pub fn fail(&mut self, key: Key) {
        if let Some(w) = self.weights.get_mut(&key) {
            if w.state == State::Filling {
                w.state = State::Absent;
                self.num_loading -= 1;
                self.host.remove(&key);
                if w.dropped {
                    self.weights.remove(&key);
                    return;
                }
            }
        }
        self.forget(key);
    }

    /// Forgets `key`'s weights: its slots, and the adapter's identity if they are its current
    /// ones. A copy in flight keeps its host slot until it ends.
    pub fn forget(&mut self, key: Key) {
        let Some(w) = self.weights.get_mut(&key) else {
            return;
        };
        if w.dropped {
            return;
        }
        let id = w.request.lora_int_id;
        let state = w.state;
        if self.current.get(&id) == Some(&key) {
            self.current.remove(&id);
            let _ = self.registry.unregister(id);
        }
        self.device.remove(&key);
        match state {
            State::Filling => w.dropped = true,
            _ => {
                if matches!(state, State::Reading | State::Validated) {
                    self.num_loading -= 1;
                }
                if state == State::Validated {
                    self.unheld.push(key);
                    self.validated.remove(&key);
                }
                self.weights.remove(&key);
                self.host.remove(&key);
            }
        }
    }

    /// The ids of the adapters whose current weights are held (ready) in a slot, ascending:
    /// what `list_loras` shows.
    pub fn resident_ids(&self) -> Vec<AdapterId> {
        let mut ids: Vec<AdapterId> = self
            .current
            .iter()
            .filter(|(_, k)| self.residency(**k) == Residency::Ready)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, id: i64) -> LoRARequest {
        LoRARequest::new(name, id, format!("/a/{name}")).unwrap()
    }

    fn load(a: &mut Adapters, key: Key) -> (Placement, Option<Key>) {
        a.begin_read(key).unwrap();
        let placed = a.place(key, |_| Some(usize::MAX));
        if let (Placement::Slot(slot), _) = placed {
            assert!(a.end_fill(key, slot));
        }
        placed
    }

    #[test]
    fn nothing_is_evicted_before_a_read_proves_valid() {
        let mut a = Adapters::new(1, 1);
        let (k1, new) = a.register(&req("x", 7)).unwrap();
        assert!(new);
        assert_eq!(load(&mut a, k1), (Placement::Slot(0), None));
        let (k2, _) = a.register(&req("y", 8)).unwrap();
        a.begin_read(k2).unwrap();
        assert_eq!(a.residency(k2), Residency::Loading);
        assert_eq!(a.resident_ids(), vec![7]); // x stays while y is read
        assert_eq!(
            a.place(k2, |k| (*k != k1).then_some(0)),
            (Placement::Wait, None)
        );
        assert_eq!(a.place(k2, |_| Some(0)), (Placement::Slot(0), Some(k1)));
        a.forget(k2); // forgotten while copied: the slot stays reserved
        let (k3, _) = a.register(&req("z", 9)).unwrap();
        a.begin_read(k3).unwrap();
        assert_eq!(a.place(k3, |_| Some(0)), (Placement::Wait, None));
        assert!(!a.end_fill(k2, 0));
        assert_eq!(a.place(k3, |_| Some(0)), (Placement::Slot(0), None));
        a.forget(k1);
        assert_eq!(a.place(k1, |_| Some(0)), (Placement::Gone, None));
    }

    #[test]
    fn reload_retires_the_old_key() {
        let mut a = Adapters::new(1, 2);
        let (k1, _) = a.register(&req("x", 7)).unwrap();
        let (k2, old) = a.reload(&req("x", 7)).unwrap();
        assert_eq!(old, Some(k1));
        assert!(a.is_retired(k1) && !a.is_retired(k2));
        assert_eq!(a.key_of(7), Some(k2));
        assert_eq!(a.keys_of(7), vec![k1, k2]);
        assert!(a.reload(&req("other", 7)).is_err());
    }
}
