//! Fair share (VTC) properties, driving the scheduler alone: for any two clients that stay
//! backlogged over an interval (VTC's sense: each has a request waiting to be admitted
//! throughout; a client whose requests all run cannot be given more), the difference of the weighted service they receive in it
//! stays within `2U`, where
//!
//!     U = (PROMPT_WEIGHT * P + max_num_seqs * OUTPUT_WEIGHT * O) / w_min
//!
//! (`P` the largest prompt, `O` the largest output, `w_min` the least client weight): a
//! client is admitted only while its counter is the least, so it can lead another by at
//! most one admission's prompt and what its running requests (at most `max_num_seqs`) can
//! still generate; a client back from idling keeps that bound (it starts at the least
//! counter, or its own if higher, which was within `U` when it left). Over an interval the
//! lead can swing from `-U` to `U`. And the engine is never left idle: while a request waits,
//! every step is full (all `max_num_seqs` seats taken or the whole token budget used).
//!
//! Both hold with each adapter a client, and with tenants as the clients, each tenant's
//! requests spread over several adapters and each adapter's requests over several tenants.

use std::collections::HashMap;

use loraplex::fair::{OUTPUT_WEIGHT, PROMPT_WEIGHT};
use loraplex::{LoRARequest, NewRequest, Placement, Scheduler, SchedulerConfig, Staging};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Req {
    client: usize,
    /// Its adapter when clients are tenants (else the client's own).
    adapter: usize,
    arrival: u64,
    prompt: usize,
    output: usize,
}

const MAX_PROMPT: usize = 24;
const MAX_OUTPUT: usize = 12;
/// Adapters the tenants' requests spread over.
const TENANT_ADAPTERS: usize = 3;

fn workload() -> impl Strategy<Value = (usize, usize, Vec<f64>, Vec<Req>)> {
    (
        1usize..6,
        0usize..8,
        prop::collection::vec(prop::sample::select(vec![1.0, 2.0, 3.0]), 2..5),
    )
        .prop_flat_map(|(seqs, extra, weights)| {
            let clients = weights.len();
            let req = (
                0..clients,
                0..TENANT_ADAPTERS,
                0u64..30,
                1..=MAX_PROMPT,
                1..=MAX_OUTPUT,
            )
                .prop_map(|(client, adapter, arrival, prompt, output)| Req {
                    client,
                    adapter,
                    arrival,
                    prompt,
                    output,
                });
            (
                Just(seqs),
                Just(extra),
                Just(weights),
                prop::collection::vec(req, 4..60),
            )
        })
}

fn ready(s: &mut Scheduler, id: i64) -> i64 {
    let request = LoRARequest::new(format!("c{id}"), id, format!("/c/{id}")).unwrap();
    let key = s.register_adapter(&request).unwrap().0;
    if let Staging::Read(_) = s.stage_adapter(key).unwrap() {
        if let Placement::Slot(slot) = s.adapter_validated(key, true) {
            s.adapter_loaded(key, slot);
        }
    }
    key
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn backlogged_clients_service_stays_within_the_bound_and_no_seat_idles(
        (max_num_seqs, extra, weights, reqs) in workload()
    ) {
        check(max_num_seqs, extra, &weights, reqs, false)?;
    }

    #[test]
    fn tenants_over_shared_adapters_keep_the_same_bound(
        (max_num_seqs, extra, weights, reqs) in workload()
    ) {
        check(max_num_seqs, extra, &weights, reqs, true)?;
    }
}

/// Drives the scheduler through `reqs`, checking both properties; with `tenants`, each
/// client is a tenant named by its requests, over `TENANT_ADAPTERS` shared adapters.
fn check(
    max_num_seqs: usize,
    extra: usize,
    weights: &[f64],
    mut reqs: Vec<Req>,
    tenants: bool,
) -> Result<(), TestCaseError> {
    reqs.sort_by_key(|r| r.arrival);
    let clients = weights.len();
    let adapters = if tenants { TENANT_ADAPTERS } else { clients };
    let cfg = SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: max_num_seqs + extra + MAX_PROMPT / 2,
        max_model_len: MAX_PROMPT + MAX_OUTPUT,
        block_size: 4,
        num_blocks: max_num_seqs * (MAX_PROMPT + MAX_OUTPUT).div_ceil(4) + 4,
        max_loras: adapters,
        max_cpu_loras: adapters,
        max_skipped_steps: 1 << 20,
        queue_capacity: 1024,
        max_loading: 2,
    };
    let mut s = Scheduler::new(cfg.clone()).unwrap();
    s.set_fair_share(true);
    let keys: Vec<i64> = (0..adapters).map(|a| ready(&mut s, a as i64 + 1)).collect();
    for (c, w) in weights.iter().enumerate() {
        match tenants {
            true => s.set_tenant_weight(&format!("tenant-{c}"), *w),
            false => s.set_client_weight(c as i64 + 1, *w),
        }
    }
    let w_min = weights.iter().copied().fold(f64::INFINITY, f64::min);
    let u = (PROMPT_WEIGHT * MAX_PROMPT as f64
        + max_num_seqs as f64 * OUTPUT_WEIGHT * MAX_OUTPUT as f64)
        / w_min;
    let sub = s.submitter();
    let mut service = vec![0.0f64; clients];
    let mut waiting = vec![0usize; clients]; // requests waiting to be admitted
    let mut queued: HashMap<u64, bool> = HashMap::new();
    let mut generated: HashMap<u64, usize> = HashMap::new();
    let mut admitted: HashMap<u64, bool> = HashMap::new();
    // per pair, the min and max of W_f - W_g over the current common backlog
    let mut span: HashMap<(usize, usize), (f64, f64)> = HashMap::new();
    let mut next = 0;
    for step in 0u64.. {
        prop_assert!(step < 100_000, "no progress");
        while next < reqs.len() && reqs[next].arrival <= step {
            let r = &reqs[next];
            sub.add(NewRequest {
                id: next as u64,
                num_prompt_tokens: r.prompt,
                adapter: Some(keys[if tenants { r.adapter } else { r.client }]),
                tenant: tenants.then(|| format!("tenant-{}", r.client)),
                ..Default::default()
            })
            .unwrap();
            waiting[r.client] += 1;
            queued.insert(next as u64, true);
            next += 1;
        }
        if next == reqs.len() && !s.has_unfinished() {
            break;
        }
        let out = s.schedule();
        prop_assert!(out.rejected.is_empty());
        if s.num_waiting() > 0 {
            prop_assert!(
                out.seqs.len() == max_num_seqs
                    || out.num_batched_tokens() == cfg.max_num_batched_tokens,
                "step {} left room ({} seats, {} tokens) while {} waited",
                step,
                out.seqs.len(),
                out.num_batched_tokens(),
                s.num_waiting()
            );
        }
        for id in &out.preempted {
            waiting[reqs[*id as usize].client] += 1;
            queued.insert(*id, true);
        }
        let mut finished = Vec::new();
        for q in &out.seqs {
            let r = &reqs[q.request_id as usize];
            if queued.insert(q.request_id, false) == Some(true) {
                waiting[r.client] -= 1;
            }
            let w = weights[r.client];
            if !admitted.insert(q.request_id, true).unwrap_or(false) {
                service[r.client] += PROMPT_WEIGHT * r.prompt as f64 / w;
            }
            if q.samples {
                service[r.client] += OUTPUT_WEIGHT / w;
                let g = generated.entry(q.request_id).or_insert(0);
                *g += 1;
                if *g == r.output {
                    finished.push(q.request_id);
                }
            }
        }
        s.postprocess(&finished, &[]);
        for f in 0..clients {
            for g in f + 1..clients {
                if waiting[f] == 0 || waiting[g] == 0 {
                    span.remove(&(f, g));
                    continue;
                }
                let d = service[f] - service[g];
                let e = span.entry((f, g)).or_insert((d, d));
                e.0 = e.0.min(d);
                e.1 = e.1.max(d);
                prop_assert!(
                    e.1 - e.0 <= 2.0 * u + 1e-9,
                    "clients {f} and {g}: service apart by {} over a common backlog (2U = {})",
                    e.1 - e.0,
                    2.0 * u
                );
            }
        }
    }
    Ok(())
}
