//! Property tests of the scheduler, driven like the Python engine drives it: submit, schedule,
//! run (simulated: one sampled token per request that samples), postprocess. With the prefix
//! cache on, a shadow KV cache records which token, computed with which weights, each slot
//! holds: every request must read exactly its own tokens under its own adapter's version,
//! and never write into a block another request holds.

use std::collections::{HashMap, HashSet};

use loraplex::{
    LoRARequest, NewRequest, Placement, Scheduler, SchedulerConfig, SchedulerOutput, NO_SLOT,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Spec {
    arrival: u64,
    prompt: usize,
    output: usize,
    adapter: Option<i64>,
    priority: i32,
    abort_at: Option<u64>,
    /// Prompts of one family share their first `shared` tokens (and, past a shared prompt,
    /// what they sample).
    family: u32,
    shared: usize,
}

impl Spec {
    fn token(&self, id: usize, pos: usize) -> u32 {
        if pos < self.shared {
            self.family * 10_000 + pos as u32
        } else {
            1_000_000 + id as u32 * 10_000 + pos as u32
        }
    }
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        1usize..4,
        0usize..3,
        prop::sample::select(vec![1usize, 2, 4, 16]),
        8usize..48,
        0usize..24,
        1usize..8,
        0usize..64,
        0u64..6,
    )
        .prop_map(
            |(
                max_loras,
                extra_cpu,
                block_size,
                max_model_len,
                extra_blocks,
                max_num_seqs,
                extra_tokens,
                skips,
            )| {
                SchedulerConfig {
                    max_num_seqs,
                    max_num_batched_tokens: max_num_seqs + extra_tokens,
                    max_model_len,
                    block_size,
                    num_blocks: max_model_len.div_ceil(block_size) + extra_blocks,
                    max_loras,
                    max_cpu_loras: max_loras + extra_cpu,
                    max_skipped_steps: skips,
                    queue_capacity: 1024,
                    max_loading: 2,
                }
            },
        )
}

fn specs(max_model_len: usize) -> impl Strategy<Value = Vec<Spec>> {
    let spec = (
        0u64..20,
        1..=max_model_len,
        1usize..12,
        prop::option::weighted(0.8, 1i64..7),
        0i32..2,
        prop::option::weighted(0.1, 0u64..40),
        (0u32..3, 0..=max_model_len + 12),
    )
        .prop_map(
            |(arrival, prompt, output, adapter, priority, abort_at, (family, shared))| Spec {
                arrival,
                prompt,
                output,
                adapter,
                priority,
                abort_at,
                family,
                shared,
            },
        );
    prop::collection::vec(spec, 1..40).prop_map(|mut v| {
        v.sort_by_key(|s| s.arrival); // ids are submission order
        v
    })
}

fn workload() -> impl Strategy<Value = (SchedulerConfig, Vec<Spec>, Option<i64>)> {
    config().prop_flat_map(|c| {
        let len = c.max_model_len;
        (Just(c), specs(len), prop::option::of(1i64..7))
    })
}

/// Registers adapter `id` (every test adapter is named `a{id}`); returns its key.
fn register(sched: &mut Scheduler, id: i64) -> i64 {
    let request = LoRARequest::new(format!("a{id}"), id, format!("/adapters/{id}")).unwrap();
    sched.register_adapter(&request).unwrap().0
}

/// The loader pool, at once: every read the step handed out succeeds, and is copied into its
/// host slot when it gets one.
fn load_all(sched: &mut Scheduler, out: &SchedulerOutput, host: &mut HashMap<i64, usize>) {
    let placed = out
        .reads
        .iter()
        .filter_map(|job| match sched.adapter_validated(job.key, false) {
            Placement::Slot(slot) => Some((job.key, slot)),
            _ => None,
        });
    let placed: Vec<(i64, usize)> = placed.collect();
    for (key, slot) in placed.into_iter().chain(out.commits.iter().copied()) {
        host.insert(key, slot);
        sched.adapter_loaded(key, slot);
    }
}

/// What the simulation saw, for assertions after the run.
#[derive(Default)]
struct Seen {
    first_scheduled: HashMap<u64, u64>,
    done: HashSet<u64>,
    cached_tokens: usize,
}

/// Checks one step's output against the invariants; updates the simulated device slots.
fn check_step(
    cfg: &SchedulerConfig,
    out: &SchedulerOutput,
    slots: &mut HashMap<usize, i64>,
    pinned: Option<i64>,
) {
    assert!(
        out.num_batched_tokens() <= cfg.max_num_batched_tokens,
        "token budget exceeded"
    );
    assert!(out.seqs.len() <= cfg.max_num_seqs, "max_num_seqs exceeded");
    let in_batch: HashSet<i64> = out.seqs.iter().filter_map(|s| s.adapter).collect();
    assert!(
        in_batch.len() <= cfg.max_loras,
        "more than max_loras adapters in a batch"
    );
    for e in &out.evictions {
        assert!(
            !in_batch.contains(&e.adapter),
            "evicted adapter {} used by the batch",
            e.adapter
        );
        assert_ne!(Some(e.adapter), pinned, "pinned adapter evicted");
    }
    for load in &out.loads {
        assert!(load.slot < cfg.max_loras);
        slots.insert(load.slot, load.adapter);
    }
    let mut start = 0;
    let mut seen_slots = HashSet::new();
    let mut seq_iter = out.seqs.iter().peekable();
    for seg in &out.segments {
        assert_eq!(seg.start, start, "segments not contiguous");
        assert!(
            seen_slots.insert(seg.slot),
            "slot {} split across segments",
            seg.slot
        );
        let mut len = 0;
        while let Some(s) = seq_iter.next_if(|s| s.slot == seg.slot) {
            len += s.num_new_tokens;
        }
        assert_eq!(len, seg.len, "segment length");
        start += len;
    }
    assert!(seq_iter.next().is_none(), "seqs not grouped by slot");
    for s in &out.seqs {
        match s.adapter {
            None => assert_eq!((s.slot, s.host_slot), (NO_SLOT, NO_SLOT)),
            Some(a) => assert_eq!(
                slots.get(&(s.slot as usize)),
                Some(&a),
                "request {} reads slot {} without its adapter",
                s.request_id,
                s.slot
            ),
        }
        let need = (s.num_computed_tokens + s.num_new_tokens).div_ceil(cfg.block_size);
        assert!(s.block_table.len() >= need, "block table too short");
        assert!(s.num_new_tokens >= 1);
    }
}

fn check_kv(sched: &Scheduler) {
    let mut holders: HashMap<u32, HashSet<u64>> = HashMap::new();
    for (req, block) in sched.kv().owned_blocks() {
        assert!((block as usize) < sched.kv().num_blocks());
        assert!(
            holders.entry(block).or_default().insert(req),
            "block {block} twice in request {req}'s table"
        );
    }
    for (block, reqs) in &holders {
        assert_eq!(
            sched.kv().refs(*block) as usize,
            reqs.len(),
            "block {block}'s count"
        );
    }
    assert_eq!(
        holders.len() + sched.kv().num_free_blocks(),
        sched.kv().num_blocks(),
        "blocks leaked"
    );
}

/// The shadow KV cache: (block, offset) -> (token, weights version) written there.
type Shadow = HashMap<(u32, usize), (u32, i64)>;

/// Each scheduled request reads its own tokens under its own version at every position
/// before this step's, and writes this step's only into blocks it alone holds.
fn check_shadow(
    sched: &Scheduler,
    out: &SchedulerOutput,
    shadow: &mut Shadow,
    tokens: &HashMap<u64, Vec<u32>>,
) {
    let bs = sched.kv().block_size();
    for s in &out.seqs {
        let own = &tokens[&s.request_id];
        let version = s.adapter.unwrap_or(0);
        for (pos, &token) in own.iter().enumerate().take(s.num_computed_tokens) {
            let slot = (s.block_table[pos / bs], pos % bs);
            assert_eq!(
                shadow.get(&slot),
                Some(&(token, version)),
                "request {} reads position {pos} from another prefix or version",
                s.request_id
            );
        }
        assert!(s.num_cached_tokens <= s.num_computed_tokens);
        let new = own.iter().enumerate().skip(s.num_computed_tokens);
        for (pos, &token) in new.take(s.num_new_tokens) {
            let block = s.block_table[pos / bs];
            assert_eq!(
                sched.kv().refs(block),
                1,
                "request {} writes into shared block {block}",
                s.request_id
            );
            shadow.insert((block, pos % bs), (token, version));
        }
    }
}

fn simulate(cfg: &SchedulerConfig, specs: &[Spec], pin: Option<i64>, cache: bool) -> Seen {
    let mut sched = Scheduler::new(cfg.clone()).unwrap();
    let sub = sched.submitter();
    let keys: HashMap<i64, i64> = (1..7).map(|id| (id, register(&mut sched, id))).collect();
    let mut host = HashMap::new(); // key -> host slot of its finished read
    let pinned = pin.map(|p| keys[&p]).filter(|k| {
        if cfg.max_loras < 2 {
            return false;
        }
        if let Ok(loraplex::Staging::Read(_)) = sched.stage_adapter(*k) {
            if let Placement::Slot(slot) = sched.adapter_validated(*k, true) {
                host.insert(*k, slot);
                sched.adapter_loaded(*k, slot);
            }
        }
        sched.pin_adapter(*k).is_ok()
    });
    let mut slots = HashMap::new();
    let mut generated = vec![0usize; specs.len()];
    let mut shadow = Shadow::new();
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut seen = Seen::default();
    let last_event = specs
        .iter()
        .map(|s| s.arrival.max(s.abort_at.unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let work: usize = specs.iter().map(|s| s.prompt + s.output).sum();
    let bound = last_event + 50 + (work * (specs.len() + 1)) as u64;
    for step in 0.. {
        assert!(
            step < bound,
            "no progress after {step} steps: starvation or livelock"
        );
        for (id, s) in specs.iter().enumerate() {
            if s.arrival == step {
                let prompt: Vec<u32> = (0..s.prompt).map(|p| s.token(id, p)).collect();
                tokens.insert(id as u64, prompt.clone());
                let req = NewRequest {
                    id: id as u64,
                    num_prompt_tokens: s.prompt,
                    adapter: s.adapter.map(|a| keys[&a]),
                    priority: s.priority,
                    prompt: cache.then_some(prompt),
                    read_cache: cache,
                    cache_salt: None,
                    tenant: None,
                };
                sub.add(req).unwrap();
            }
        }
        for (id, s) in specs.iter().enumerate() {
            if s.abort_at == Some(step) {
                sub.abort(id as u64).unwrap();
            }
        }
        if step > last_event && !sched.has_unfinished() {
            break;
        }
        let out = sched.schedule();
        for load in &out.loads {
            assert_eq!(
                host.get(&load.adapter),
                Some(&load.host_slot),
                "loaded before read"
            );
        }
        for s in out.seqs.iter().filter(|s| s.adapter.is_some()) {
            let read_into = host[&s.adapter.unwrap()] as i32;
            assert_eq!(
                s.host_slot, read_into,
                "request {} runs on another host slot",
                s.request_id
            );
        }
        assert!(out.reads.len() <= cfg.max_loading);
        let hosted: HashSet<usize> = out.commits.iter().map(|c| c.1).collect();
        assert_eq!(
            hosted.len(),
            out.commits.len(),
            "two copies into one host slot"
        );
        load_all(&mut sched, &out, &mut host);
        assert!(out.rejected.is_empty());
        seen.done.extend(out.aborted.iter().copied());
        check_step(cfg, &out, &mut slots, pinned);
        check_kv(&sched);
        check_shadow(&sched, &out, &mut shadow, &tokens);
        let mut finished = Vec::new();
        let mut sampled = Vec::new();
        for s in &out.seqs {
            seen.first_scheduled.entry(s.request_id).or_insert(step);
            seen.cached_tokens += s.num_cached_tokens;
            if s.samples {
                let id = s.request_id as usize;
                generated[id] += 1;
                if generated[id] == specs[id].output {
                    finished.push(s.request_id);
                } else {
                    let own = tokens.get_mut(&s.request_id).unwrap();
                    let token = specs[id].token(id, own.len());
                    own.push(token);
                    sampled.push((s.request_id, token));
                }
            }
        }
        seen.done.extend(finished.iter().copied());
        seen.done.extend(sched.postprocess(&finished, &sampled));
    }
    check_kv(&sched);
    assert_eq!(
        sched.kv().num_free_blocks(),
        cfg.num_blocks,
        "blocks leaked after all requests ended"
    );
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_every_request_ends((cfg, specs, pin) in workload()) {
        let seen = simulate(&cfg, &specs, pin, false);
        prop_assert_eq!(seen.done.len(), specs.len(), "some request never finished");
        prop_assert_eq!(seen.cached_tokens, 0);
    }

    /// The same workloads with the prefix cache: the same invariants, every block back at
    /// the end (cached or free), and every read of a cached block its own prefix's.
    #[test]
    fn with_the_prefix_cache_reads_are_their_own_and_every_request_ends(
        (cfg, specs, pin) in workload()
    ) {
        let seen = simulate(&cfg, &specs, pin, true);
        prop_assert_eq!(seen.done.len(), specs.len(), "some request never finished");
    }

    #[test]
    fn arrival_order_kept_per_adapter_and_priority((cfg, specs, pin) in workload()) {
        let seen = simulate(&cfg, &specs, pin, false);
        for (a, sa) in specs.iter().enumerate() {
            for (b, sb) in specs.iter().enumerate().skip(a + 1) {
                if sa.adapter != sb.adapter || sa.priority != sb.priority || sa.abort_at.is_some() {
                    continue;
                }
                if let Some(tb) = seen.first_scheduled.get(&(b as u64)) {
                    let ta = seen.first_scheduled.get(&(a as u64));
                    prop_assert!(ta.is_some_and(|ta| ta <= tb), "request {a} admitted after {b}, which arrived later");
                }
            }
        }
    }
}

/// A waiting request whose adapter has no slot does not block a later request whose adapter
/// is already running.
#[test]
fn skipped_request_does_not_block_active_adapter() {
    let cfg = SchedulerConfig {
        max_loras: 1,
        max_cpu_loras: 1,
        max_skipped_steps: 100,
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(cfg).unwrap();
    let sub = sched.submitter();
    let (k1, k2) = (register(&mut sched, 1), register(&mut sched, 2));
    let req = |id, adapter| NewRequest {
        id,
        num_prompt_tokens: 4,
        adapter: Some(adapter),
        priority: 0,
        ..Default::default()
    };
    let mut host = HashMap::new();
    sub.add(req(0, k1)).unwrap();
    let out = sched.schedule(); // reads adapter 1
    load_all(&mut sched, &out, &mut host);
    assert_eq!(sched.schedule().seqs.len(), 1);
    sched.postprocess(&[], &[]);
    sub.add(req(1, k2)).unwrap(); // no slot: adapter 1 holds the only one
    sub.add(req(2, k1)).unwrap(); // adapter 1 is active: admitted past request 1
    let out = sched.schedule();
    let ids: Vec<u64> = out.seqs.iter().map(|s| s.request_id).collect();
    assert_eq!(ids, vec![0, 2]);
}

/// Aging: once the oldest waiting request has been passed over for `max_skipped_steps`,
/// requests of the running adapter stop being admitted, so it gets the slot when they drain.
#[test]
fn aging_bounds_skips() {
    let cfg = SchedulerConfig {
        max_loras: 1,
        max_cpu_loras: 1,
        max_skipped_steps: 2,
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(cfg).unwrap();
    let sub = sched.submitter();
    let (k1, k2) = (register(&mut sched, 1), register(&mut sched, 2));
    let req = |id, adapter| NewRequest {
        id,
        num_prompt_tokens: 2,
        adapter: Some(adapter),
        priority: 0,
        ..Default::default()
    };
    let mut host = HashMap::new();
    sub.add(req(0, k1)).unwrap();
    let out = sched.schedule(); // reads adapter 1
    load_all(&mut sched, &out, &mut host);
    sub.add(req(1, k2)).unwrap();
    let mut samples: HashMap<u64, usize> = HashMap::new();
    let mut admitted_at = None;
    for (step, next) in (0..40).zip(2u64..) {
        // a steady stream for adapter 1 whose requests overlap (each samples 3 tokens), so
        // adapter 1 always has running requests and never gives its slot up by itself
        sub.add(req(next, k1)).unwrap();
        let out = sched.schedule();
        load_all(&mut sched, &out, &mut host);
        if out.seqs.iter().any(|s| s.request_id == 1) {
            admitted_at = Some(step);
            break;
        }
        let mut finished = Vec::new();
        for s in out.seqs.iter().filter(|s| s.samples) {
            let n = samples.entry(s.request_id).or_default();
            *n += 1;
            if *n == 3 {
                finished.push(s.request_id);
            }
        }
        sched.postprocess(&finished, &[]);
    }
    let at = admitted_at.expect("adapter 2's request starved");
    // passed over for 2 steps, then adapter 1's running requests drain (3 steps each), then
    // adapter 2 is read into the host slot adapter 1 held (one step)
    assert!(at <= 2 + 3 + 2, "admitted only at step {at}");
}

/// A small scheduler for the prefix-cache tests: blocks of 4 tokens, 32 of them.
fn cache_config(max_loras: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_model_len: 64,
        block_size: 4,
        num_blocks: 32,
        max_loras,
        max_cpu_loras: max_loras,
        max_skipped_steps: 4,
        queue_capacity: 64,
        max_loading: 2,
    }
}

/// A prompt computed once is found again by the same weights only: the base, an adapter,
/// a reload of it and a request reading no cache each see their own; a hit's tokens are not
/// counted against the step's budget and the last prompt token is always computed.
#[test]
fn prefix_hits_are_per_weights_version() {
    let mut sched = Scheduler::new(cache_config(2)).unwrap();
    let sub = sched.submitter();
    let key = register(&mut sched, 1);
    let mut host = HashMap::new();
    let prompt: Vec<u32> = (100..112).collect(); // 12 tokens: 3 full blocks
    let run = |sched: &mut Scheduler,
               host: &mut HashMap<i64, usize>,
               id: u64,
               adapter: Option<i64>,
               tokens: &[u32],
               read: bool|
     -> usize {
        sub.add(NewRequest {
            id,
            num_prompt_tokens: tokens.len(),
            adapter,
            priority: 0,
            prompt: Some(tokens.to_vec()),
            read_cache: read,
            cache_salt: None,
            tenant: None,
        })
        .unwrap();
        let mut cached = None;
        for _ in 0..20 {
            let out = sched.schedule();
            load_all(sched, &out, host);
            if let Some(s) = out.seqs.iter().find(|s| s.request_id == id) {
                cached.get_or_insert(s.num_cached_tokens);
                assert_eq!(s.num_computed_tokens, cached.unwrap());
                assert_eq!(s.num_new_tokens, tokens.len() - cached.unwrap());
                sched.postprocess(&[id], &[]);
                return cached.unwrap();
            }
            sched.postprocess(&[], &[]);
        }
        panic!("request {id} never ran");
    };
    assert_eq!(run(&mut sched, &mut host, 0, None, &prompt, true), 0);
    assert_eq!(run(&mut sched, &mut host, 1, None, &prompt, true), 8); // not the last block
    let longer: Vec<u32> = (100..118).collect();
    assert_eq!(run(&mut sched, &mut host, 2, None, &longer, true), 12);
    assert_eq!(run(&mut sched, &mut host, 3, Some(key), &prompt, true), 0); // the adapter's own
    assert_eq!(run(&mut sched, &mut host, 4, Some(key), &prompt, true), 8);
    assert_eq!(run(&mut sched, &mut host, 5, None, &prompt, false), 0); // reads none
    let request = LoRARequest::new("a1", 1, "/adapters/1").unwrap();
    let (new_key, _) = sched.reload_adapter(&request).unwrap();
    assert_ne!(new_key, key);
    assert_eq!(
        run(&mut sched, &mut host, 6, Some(new_key), &prompt, true),
        0
    ); // new weights
    assert!(sched.kv().num_cached_blocks() > 0);
    assert!(sched.reset_prefix_cache() > 0);
    assert_eq!(run(&mut sched, &mut host, 7, None, &prompt, true), 0);
    assert_eq!(sched.kv().num_free_blocks(), 32);
}

/// Only requests with the same `cache_salt` share cached blocks.
#[test]
fn a_cache_salt_keeps_prefixes_apart() {
    let mut sched = Scheduler::new(cache_config(1)).unwrap();
    let sub = sched.submitter();
    let prompt: Vec<u32> = (1..14).collect();
    let mut run = |id: u64, salt: Option<&str>| -> usize {
        sub.add(NewRequest {
            id,
            num_prompt_tokens: prompt.len(),
            prompt: Some(prompt.clone()),
            read_cache: true,
            cache_salt: salt.map(str::to_string),
            ..Default::default()
        })
        .unwrap();
        let out = sched.schedule();
        let cached = out.seqs[0].num_cached_tokens;
        sched.postprocess(&[id], &[]);
        cached
    };
    assert_eq!(run(0, Some("tenant-a")), 0);
    assert_eq!(run(1, Some("tenant-b")), 0);
    assert_eq!(run(2, None), 0);
    assert_eq!(run(3, Some("tenant-a")), 12);
    assert_eq!(run(4, Some("tenant-b")), 12);
    assert_eq!(run(5, None), 12);
}
