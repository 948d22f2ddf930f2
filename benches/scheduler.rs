//! `schedule()` latency with many waiting requests over many adapters, in steady state: each
//! step admits a batch (256 requests, `max_loras = 8`), the batch finishes, and as many new
//! requests arrive, so the waiting count stays put. Adapter reads the step hands out complete
//! before the next step (an instant loader). Only `schedule()` is timed (it includes draining
//! the step's submissions and choosing the reads). The `_fair` cases run the same with
//! `scheduling_policy="fair"`, each adapter a client (`postprocess` charging their service);
//! `_fair_tenants`, with 1,000 tenants as the clients, each over many of 64 adapters (a
//! request's tenant is its id modulo 1,000, its adapter its id modulo 64).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::{LoRARequest, NewRequest, Placement, Scheduler, SchedulerConfig, SchedulerOutput};

const PROMPT: usize = 16;

fn request(id: u64, keys: &[i64], tenants: u64) -> NewRequest {
    NewRequest {
        id,
        num_prompt_tokens: PROMPT,
        adapter: Some(keys[id as usize % keys.len()]),
        priority: 0,
        tenant: (tenants > 0).then(|| format!("t{}", id % tenants)),
        ..Default::default()
    }
}

fn load(sched: &mut Scheduler, out: &SchedulerOutput) {
    for job in &out.reads {
        if let Placement::Slot(slot) = sched.adapter_validated(job.key, false) {
            sched.adapter_loaded(job.key, slot);
        }
    }
    for (key, slot) in &out.commits {
        sched.adapter_loaded(*key, *slot);
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    group.throughput(Throughput::Elements(1));
    let mut cases: Vec<(u64, u64, bool, u64)> = Vec::new();
    for waiting in [1_000u64, 10_000, 100_000] {
        for adapters in [8u64, 64, 1_000] {
            cases.push((waiting, adapters, false, 0));
        }
    }
    cases.push((10_000, 1_000, true, 0));
    cases.push((10_000, 64, true, 1_000));
    {
        for (waiting, adapters, fair, tenants) in cases {
            let cfg = SchedulerConfig {
                max_num_seqs: 256,
                max_num_batched_tokens: 8192,
                max_model_len: 2048,
                block_size: 16,
                num_blocks: 4096,
                max_loras: 8,
                max_cpu_loras: 32,
                max_skipped_steps: 32,
                queue_capacity: 200_000,
                max_loading: 8,
            };
            let mut sched = Scheduler::new(cfg).unwrap();
            sched.set_fair_share(fair);
            let keys: Vec<i64> = (1..=adapters as i64)
                .map(|id| {
                    let r = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
                    sched.register_adapter(&r).unwrap().0
                })
                .collect();
            let sub = sched.submitter();
            let mut next = 0;
            for _ in 0..waiting {
                sub.add(request(next, &keys, tenants)).unwrap();
                next += 1;
            }
            let mut finished = Vec::new();
            for _ in 0..4 {
                // drain the backlog and fill the host tier, untimed
                sched.postprocess(&finished, &[]);
                for _ in 0..finished.len() {
                    sub.add(request(next, &keys, tenants)).unwrap();
                    next += 1;
                }
                let out = sched.schedule();
                load(&mut sched, &out);
                finished = out.seqs.iter().map(|s| s.request_id).collect();
            }
            let policy = match (fair, tenants) {
                (false, _) => String::new(),
                (true, 0) => "_fair".to_string(),
                (true, t) => format!("_fair_{t}_tenants"),
            };
            let id = BenchmarkId::new(format!("{adapters}_adapters{policy}"), waiting);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        sched.postprocess(&finished, &[]);
                        for _ in 0..finished.len() {
                            sub.add(request(next, &keys, tenants)).unwrap();
                            next += 1;
                        }
                        let start = Instant::now();
                        let out = black_box(sched.schedule());
                        total += start.elapsed();
                        load(&mut sched, &out);
                        finished = out.seqs.iter().map(|s| s.request_id).collect();
                    }
                    total
                })
            });
            assert!(
                sched.num_waiting() as u64 + 300 >= waiting,
                "the backlog must stay put"
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
