//! `schedule()` latency with many waiting requests over many adapters, in steady state: each
//! step admits a batch (256 requests, `max_loras = 8`), the batch finishes, and as many new
//! requests arrive, so the waiting count stays put. Only `schedule()` is timed (it includes
//! draining the step's submissions).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::{NewRequest, Scheduler, SchedulerConfig};

const PROMPT: usize = 16;

fn request(id: u64, adapters: u64) -> NewRequest {
    NewRequest {
        id,
        num_prompt_tokens: PROMPT,
        adapter: Some((id % adapters) as i64 + 1),
        priority: 0,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    group.throughput(Throughput::Elements(1));
    for waiting in [1_000u64, 10_000, 100_000] {
        for adapters in [8u64, 64, 1_000] {
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
            };
            let mut sched = Scheduler::new(cfg).unwrap();
            let sub = sched.submitter();
            let mut next = 0;
            for _ in 0..waiting {
                sub.add(request(next, adapters)).unwrap();
                next += 1;
            }
            let out = sched.schedule(); // drain the backlog untimed
            let mut finished: Vec<u64> = out.seqs.iter().map(|s| s.request_id).collect();
            let id = BenchmarkId::new(format!("{adapters}_adapters"), waiting);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        sched.postprocess(&finished);
                        for _ in 0..finished.len() {
                            sub.add(request(next, adapters)).unwrap();
                            next += 1;
                        }
                        let start = Instant::now();
                        let out = black_box(sched.schedule());
                        total += start.elapsed();
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
