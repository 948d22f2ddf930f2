//! Fair share across clients: a virtual token counter per client, as VTC (Sheng et al.,
//! "Fairness in Serving Large Language Models", OSDI'24). A client is an adapter (its
//! `lora_int_id`; 0 the base model). Each counter is the client's weighted service: prompt
//! tokens computed for it count [`PROMPT_WEIGHT`], tokens generated for it
//! [`OUTPUT_WEIGHT`], both divided by the client's weight (1 unless set). Admission takes the
//! backlogged client with the least counter (the scheduler skips, without charging, one
//! whose adapter cannot get a slot this step); a client that arrives after being idle starts
//! at the least counter of those backlogged, never below its own: idling banks no credit.
//!
//! A request may name a tenant instead (the OpenAI `user` field, `tenant=` offline): then
//! the tenant is its client, over whichever adapters it uses. Tenants are interned as they
//! come; an idle tenant whose counter the least backlogged one has passed is forgotten (it
//! would come back at that least counter anyway), so what is kept stays bounded by the
//! clients in play, whatever names requests bring.
//!
//! Why 1 and 2: on this engine a prompt token is one row of a batched prefill matmul, while
//! a generated token costs a whole decode step's weight reads shared by fewer rows; VTC's
//! authors weigh output at twice input for the same reason, and measured costs here agree
//! within that factor (benches/README.md, the step split).

use std::collections::BTreeSet;

use crate::adapters::Residency;
use crate::scheduler::Scheduler;
use crate::waiting::{AdapterKey, Lane, OrderKey, TenantId};
use crate::FastMap;

/// Service a computed prompt token counts.
pub const PROMPT_WEIGHT: f64 = 1.0;
/// Service a generated token counts.
pub const OUTPUT_WEIGHT: f64 = 2.0;

/// A client: an adapter's `lora_int_id`, 0 for the base model, or a tenant `t` as `-t`.
pub type ClientId = i64;

/// The client of tenant `t` (adapters' ids are positive, the base model's 0).
pub fn tenant_client(t: TenantId) -> ClientId {
    -(t as ClientId)
}

/// Tenants are pruned when there are this many more than after the last pruning.
const PRUNE_MIN: usize = 64;

/// One client's counter, weight and backlog (unfinished requests).
#[derive(Debug, Clone, Copy)]
struct Client {
    counter: f64,
    weight: f64,
    backlog: usize,
}

/// The counters, the backlog (unfinished requests) and the weights of every client, in one
/// map (each admission and arrival touches one entry once).
#[derive(Debug, Default)]
pub struct FairShare {
    clients: FastMap<ClientId, Client>,
    /// Weights set for adapters (and the base) by id, for tenants by name.
    weights: FastMap<ClientId, f64>,
    tenant_weights: FastMap<Box<str>, f64>,
    /// Interned tenants, both ways; ids are never reused.
    tenants: FastMap<Box<str>, TenantId>,
    names: FastMap<TenantId, Box<str>>,
    last_tenant: TenantId,
    prune_at: usize,
    /// Whether tenants have come: from the first on, each adapter's lanes are kept in
    /// `lanes` (before, every adapter has one lane, the candidates are its head).
    indexed: bool,
    /// Each adapter's lanes by (their client's counter as bits, their head's order): a
    /// counter here may lag its client's (it only grows), and is brought up to date when
    /// its lane comes up for admission.
    lanes: FastMap<AdapterKey, BTreeSet<(u64, OrderKey, TenantId, ClientId)>>,
    /// The entry of each lane in `lanes`.
    keyed: FastMap<Lane, (u64, OrderKey, ClientId)>,
    /// The least counter among backlogged clients (`Some(None)`: none is), while known:
    /// arrivals in one drain share one scan; a charge or a departure forgets it.
    floor: Option<Option<f64>>,
}

impl FairShare {
    /// A request of `client` arrives (lifting an idle client to the least backlogged
    /// counter).
    pub fn arrive(&mut self, client: ClientId) {
        let c = self.entry(client);
        c.backlog += 1;
        if c.backlog > 1 {
            return;
        }
        // the others' least counter (this client was idle, so it is not among them)
        let floor = match self.floor {
            Some(known) => known,
            None => self
                .clients
                .iter()
                .filter(|(id, c)| c.backlog > 0 && **id != client)
                .map(|(_, c)| c.counter)
                .min_by(f64::total_cmp),
        };
        let c = self.entry(client);
        if let Some(floor) = floor {
            c.counter = c.counter.max(floor);
        }
        // lifted to at least the least, it leaves the least as it was (or is it, if alone)
        self.floor = Some(Some(floor.unwrap_or(c.counter)));
    }

    /// A request of `client` ended (finished, aborted or refused).
    pub fn leave(&mut self, client: ClientId) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.backlog = c.backlog.saturating_sub(1);
            if c.backlog == 0 {
                self.floor = None;
            }
        }
    }

    /// Service given to `client`: `prompt` prompt tokens computed, `output` generated.
    /// Returns its counter after.
    pub fn charge(&mut self, client: ClientId, prompt: usize, output: usize) -> f64 {
        let cost = PROMPT_WEIGHT * prompt as f64 + OUTPUT_WEIGHT * output as f64;
        self.floor = None;
        let c = self.entry(client);
        c.counter += cost / c.weight;
        c.counter
    }

    /// `client`'s counter (its weighted service, lifted as described).
    pub fn counter(&self, client: ClientId) -> f64 {
        self.clients.get(&client).map_or(0.0, |c| c.counter)
    }

    /// `client`'s share weight (a client of weight 2 gets twice the service of one of 1).
    pub fn set_weight(&mut self, client: ClientId, weight: f64) {
        self.weights.insert(client, weight);
        if let Some(c) = self.clients.get_mut(&client) {
            c.weight = weight;
        }
    }

    /// The share weight of the tenant `name` (whenever requests name it).
    pub fn set_tenant_weight(&mut self, name: &str, weight: f64) {
        self.tenant_weights.insert(name.into(), weight);
        if let Some(&t) = self.tenants.get(name) {
            if let Some(c) = self.clients.get_mut(&tenant_client(t)) {
                c.weight = weight;
            }
        }
    }

    /// The tenant named `name`, interned.
    pub fn tenant(&mut self, name: &str) -> TenantId {
        if let Some(&t) = self.tenants.get(name) {
            return t;
        }
        if self.tenants.len() >= self.prune_at.max(PRUNE_MIN) {
            self.prune();
        }
        self.last_tenant += 1;
        let t = self.last_tenant;
        self.tenants.insert(name.into(), t);
        self.names.insert(t, name.into());
        t
    }

    /// The tenants known now: (name, counter, unfinished requests), by name.
    pub fn tenants(&self) -> Vec<(String, f64, usize)> {
        let mut all: Vec<(String, f64, usize)> = self
            .tenants
            .iter()
            .map(|(name, t)| {
                let c = self.clients.get(&tenant_client(*t));
                let (counter, backlog) = c.map_or((0.0, 0), |c| (c.counter, c.backlog));
                (name.to_string(), counter, backlog)
            })
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Forgets the idle tenants whose counter is at most the least backlogged one's: back,
    /// they would start there anyway (with nothing backlogged, nothing is forgotten).
    fn prune(&mut self) {
        let floor = self
            .clients
            .values()
            .filter(|c| c.backlog > 0)
            .map(|c| c.counter)
            .min_by(f64::total_cmp);
        if let Some(floor) = floor {
            let gone: Vec<ClientId> = self
                .clients
                .iter()
                .filter(|(id, c)| **id < 0 && c.backlog == 0 && c.counter <= floor)
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.clients.remove(&id);
                if let Some(name) = self.names.remove(&(-id as TenantId)) {
                    self.tenants.remove(&name);
                }
            }
        }
        self.prune_at = 2 * self.tenants.len();
    }

    fn entry(&mut self, client: ClientId) -> &mut Client {
        let (weights, tenant_weights, names) = (&self.weights, &self.tenant_weights, &self.names);
        self.clients.entry(client).or_insert_with(|| {
            let weight = if client < 0 {
                let name = names.get(&(-client as TenantId));
                name.and_then(|n| tenant_weights.get(n)).copied()
            } else {
                weights.get(&client).copied()
            };
            Client {
                counter: 0.0,
                weight: weight.unwrap_or(1.0),
                backlog: 0,
            }
        })
    }
}

/// A fair-share candidate: (its client's counter as bits, its head's order, its lane, its
/// client).
pub(crate) type FairHead = (u64, OrderKey, Lane, ClientId);

impl Scheduler {
    /// Turns fair share across clients on (`scheduling_policy="fair"`; see `fair`) or off
    /// (before requests come: those waiting keep the lanes they came in).
    pub fn set_fair_share(&mut self, on: bool) {
        self.fair = on.then(FairShare::default);
    }

    /// A client's share weight under fair share (1 unless set).
    pub fn set_client_weight(&mut self, client: ClientId, weight: f64) {
        if let Some(f) = self.fair.as_mut() {
            f.set_weight(client, weight);
        }
    }

    /// A tenant's share weight under fair share (1 unless set), by its name.
    pub fn set_tenant_weight(&mut self, name: &str, weight: f64) {
        if let Some(f) = self.fair.as_mut() {
            f.set_tenant_weight(name, weight);
        }
    }

    /// A client's weighted service so far under fair share (0 without it).
    pub fn client_service(&self, client: ClientId) -> f64 {
        self.fair.as_ref().map_or(0.0, |f| f.counter(client))
    }

    /// The tenants fair share knows now: (name, weighted service, unfinished requests).
    pub fn tenant_service(&self) -> Vec<(String, f64, usize)> {
        self.fair.as_ref().map_or_else(Vec::new, FairShare::tenants)
    }

    /// The tenant named `name` for a request about to wait (interned; the first one turns
    /// the per-adapter lane index on).
    pub(crate) fn fair_tenant(&mut self, name: &str) -> TenantId {
        let Some(f) = self.fair.as_mut() else {
            return 0;
        };
        let t = f.tenant(name);
        if !f.indexed {
            f.indexed = true;
            let adapters: Vec<AdapterKey> = self.waiting.adapters_in_order().collect();
            for adapter in adapters {
                let tenants: Vec<TenantId> = self.waiting.lanes_of(adapter).collect();
                for tenant in tenants {
                    self.fair_sync_lane((adapter, tenant));
                }
            }
        }
        t
    }

    fn indexed(&self) -> bool {
        self.fair.as_ref().is_some_and(|f| f.indexed)
    }

    /// Fair share's candidates: the lanes that may be admitted now (of any ready adapter
    /// while a device slot is free, else of running and pinned adapters and the base),
    /// keyed by their client's counter, then (priority, arrival): every such lane's head,
    /// or once tenants have come, each such adapter's best lane.
    pub(crate) fn fair_candidates(&self, free_slot: bool) -> BTreeSet<FairHead> {
        let ready =
            |a: AdapterKey| a.is_none_or(|k| self.adapters.residency(k) == Residency::Ready);
        if self.indexed() {
            let adapters: Vec<AdapterKey> = if free_slot {
                let ready = self.waiting.ready_adapters().map(Some);
                ready.chain([None]).collect()
            } else {
                self.slotted_adapters()
            };
            return adapters
                .into_iter()
                .filter(|a| ready(*a))
                .filter_map(|a| self.fair_adapter_head(a))
                .collect();
        }
        let lanes: Vec<Lane> = if free_slot {
            self.waiting.ready_heads().map(|(_, lane)| lane).collect()
        } else {
            self.slotted_queues()
        };
        lanes
            .into_iter()
            .filter(|l| ready(l.0))
            .filter_map(|l| self.fair_head(l))
            .collect()
    }

    /// `lane`'s head as a candidate, keyed by its client's counter now.
    fn fair_head(&self, lane: Lane) -> Option<FairHead> {
        let (order, id) = self.waiting.head(lane)?;
        let client = self.seqs[&id].client;
        Some((self.counter_bits(client), order, lane, client))
    }

    /// `adapter`'s best lane as a candidate (once tenants have come, its counter maybe
    /// lagging); None: nothing waits for it.
    pub(crate) fn fair_adapter_head(&self, adapter: AdapterKey) -> Option<FairHead> {
        let f = self.fair.as_ref()?;
        if !f.indexed {
            let lanes = self.waiting.lanes_of(adapter);
            return lanes.filter_map(|t| self.fair_head((adapter, t))).min();
        }
        let &(bits, order, tenant, client) = f.lanes.get(&adapter)?.first()?;
        Some((bits, order, (adapter, tenant), client))
    }

    /// After an admission from `lane`: its adapter's candidate (taken by the admission, or
    /// by `drained`, aging's, instead) is renewed.
    /// `counter`: the lane's client's (`client`: a lane's requests are all one client's),
    /// after the admission.
    pub(crate) fn fair_renew(
        &self,
        heads: &mut BTreeSet<FairHead>,
        (lane, drained): (Lane, bool),
        client: ClientId,
        counter: f64,
    ) {
        let next = if self.indexed() {
            if drained {
                heads.retain(|h| h.2 .0 != lane.0);
            }
            self.fair_adapter_head(lane.0)
        } else {
            if drained {
                heads.retain(|h| h.2 != lane);
            }
            let next = self.waiting.head(lane);
            next.map(|(order, _)| (counter.to_bits(), order, lane, client))
        };
        heads.extend(next);
    }

    /// The candidate of the least counter. A candidate whose key lags its client's counter
    /// (a tenant's lane on another adapter, or an adapter's reloaded weights', was admitted
    /// since it was keyed) is keyed again and the choice made again: keys only lag below
    /// the truth, so the one returned is the true least.
    pub(crate) fn pop_fair(&mut self, heads: &mut BTreeSet<FairHead>) -> Option<FairHead> {
        loop {
            let head = heads.pop_first()?;
            let (bits, order, lane, client) = head;
            let now = self.counter_bits(client);
            if now == bits {
                return Some(head);
            }
            let f = self.fair.as_mut().expect("fair share is on");
            if !f.indexed {
                heads.insert((now, order, lane, client));
                continue;
            }
            let set = f.lanes.get_mut(&lane.0).expect("the lane is indexed");
            set.remove(&(bits, order, lane.1, client));
            set.insert((now, order, lane.1, client));
            f.keyed.insert(lane, (now, order, client));
            heads.extend(self.fair_adapter_head(lane.0));
        }
    }

    /// Once tenants have come: brings `lane`'s entry in the lane index in line with its
    /// head (call after anything that may change it), keyed by its client's counter now.
    pub(crate) fn fair_sync_lane(&mut self, lane: Lane) {
        let Some(f) = self.fair.as_mut().filter(|f| f.indexed) else {
            return;
        };
        let head = self.waiting.head(lane);
        let old = f.keyed.get(&lane).copied();
        if old.map(|(_, o, _)| o) == head.map(|(o, _)| o) {
            return;
        }
        let client = head.map(|(_, id)| self.seqs[&id].client);
        let bits = client.map_or(0, |c| f.counter(c).to_bits());
        let set = f.lanes.entry(lane.0).or_default();
        if let Some((bits, o, c)) = old {
            set.remove(&(bits, o, lane.1, c));
        }
        match (head, client) {
            (Some((o, _)), Some(client)) => {
                set.insert((bits, o, lane.1, client));
                f.keyed.insert(lane, (bits, o, client));
            }
            _ => {
                f.keyed.remove(&lane);
            }
        }
    }

    /// `client`'s counter as bits: counters are never negative, so their bits order as the
    /// numbers do.
    pub(crate) fn counter_bits(&self, client: ClientId) -> u64 {
        self.fair
            .as_ref()
            .map_or(0, |f| f.counter(client).to_bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_client_returns_at_the_least_backlogged_counter() {
        let mut f = FairShare::default();
        f.arrive(1);
        f.arrive(2);
        f.charge(1, 100, 0);
        f.charge(2, 40, 10);
        f.arrive(3); // new: starts at the least backlogged (2's 60), not at 0
        assert_eq!(f.counter(3), 60.0);
        f.leave(3);
        f.charge(2, 0, 100);
        f.arrive(3); // back after idling: lifted to 1's 100, the least now
        assert_eq!(f.counter(3), 100.0);
        f.set_weight(4, 2.0);
        f.charge(4, 10, 5);
        assert_eq!(f.counter(4), 10.0);
    }
}
