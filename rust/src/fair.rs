//! Fair share across clients: a virtual token counter per client, as VTC (Sheng et al.,
//! "Fairness in Serving Large Language Models", OSDI'24). A client is an adapter (its
//! `lora_int_id`; 0 the base model). Each counter is the client's weighted service: prompt
//! tokens computed for it count [`PROMPT_WEIGHT`], tokens generated for it
//! [`OUTPUT_WEIGHT`], both divided by the client's weight (1 unless set). Admission takes the
//! backlogged client with the least counter (the scheduler skips, without charging, one
//! whose adapter cannot get a slot this step); a client that arrives after being idle starts
//! at the least counter of those backlogged, never below its own: idling banks no credit.
//!
//! Why 1 and 2: on this engine a prompt token is one row of a batched prefill matmul, while
//! a generated token costs a whole decode step's weight reads shared by fewer rows; VTC's
//! authors weigh output at twice input for the same reason, and measured costs here agree
//! within that factor (benches/README.md, the step split).

use std::collections::BTreeSet;

use crate::adapters::Residency;
use crate::scheduler::Scheduler;
use crate::waiting::{AdapterKey, OrderKey};
use crate::FastMap;

/// Service a computed prompt token counts.
pub const PROMPT_WEIGHT: f64 = 1.0;
/// Service a generated token counts.
pub const OUTPUT_WEIGHT: f64 = 2.0;

/// A client: an adapter's `lora_int_id`, or 0 for the base model.
pub type ClientId = i64;

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
        let floor = self
            .clients
            .iter()
            .filter(|(id, c)| c.backlog > 0 && **id != client)
            .map(|(_, c)| c.counter)
            .min_by(f64::total_cmp);
        if let Some(floor) = floor {
            let c = self.entry(client);
            c.counter = c.counter.max(floor);
        }
    }

    /// A request of `client` ended (finished, aborted or refused).
    pub fn leave(&mut self, client: ClientId) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.backlog = c.backlog.saturating_sub(1);
        }
    }

    /// Service given to `client`: `prompt` prompt tokens computed, `output` generated.
    /// Returns its counter after.
    pub fn charge(&mut self, client: ClientId, prompt: usize, output: usize) -> f64 {
        let cost = PROMPT_WEIGHT * prompt as f64 + OUTPUT_WEIGHT * output as f64;
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
        self.entry(client).weight = weight;
    }

    fn entry(&mut self, client: ClientId) -> &mut Client {
        self.clients.entry(client).or_insert(Client {
            counter: 0.0,
            weight: 1.0,
            backlog: 0,
        })
    }
}

/// A fair-share candidate: (its client's counter as bits, its head's order, its queue).
pub(crate) type FairHead = (u64, OrderKey, AdapterKey);

impl Scheduler {
    /// Turns fair share across clients on (`scheduling_policy="fair"`; see `fair`) or off.
    pub fn set_fair_share(&mut self, on: bool) {
        self.fair = on.then(FairShare::default);
    }

    /// A client's share weight under fair share (1 unless set).
    pub fn set_client_weight(&mut self, client: ClientId, weight: f64) {
        if let Some(f) = self.fair.as_mut() {
            f.set_weight(client, weight);
        }
    }

    /// A client's weighted service so far under fair share (0 without it).
    pub fn client_service(&self, client: ClientId) -> f64 {
        self.fair.as_ref().map_or(0.0, |f| f.counter(client))
    }

    /// Fair share's candidates: the heads of the queues that may be admitted now (any
    /// ready one while a device slot is free, else those of running and pinned adapters and
    /// the base), keyed by their client's counter, then (priority, arrival).
    pub(crate) fn fair_candidates(&self, free_slot: bool) -> BTreeSet<FairHead> {
        let adapters: Vec<AdapterKey> = if free_slot {
            self.waiting.ready_heads().map(|(_, a)| a).collect()
        } else {
            self.slotted_queues()
        };
        let ready =
            |a: &AdapterKey| a.is_none_or(|k| self.adapters.residency(k) == Residency::Ready);
        adapters
            .into_iter()
            .filter(ready)
            .filter_map(|a| self.fair_head(a))
            .collect()
    }

    /// `adapter`'s queue head as a fair-share candidate (None if the queue is empty).
    pub(crate) fn fair_head(&self, adapter: AdapterKey) -> Option<FairHead> {
        let (order, id) = self.waiting.head(adapter)?;
        let fair = self.fair.as_ref()?;
        // counters are never negative, so their bits order as the numbers do
        Some((
            fair.counter(self.seqs[&id].client).to_bits(),
            order,
            adapter,
        ))
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
