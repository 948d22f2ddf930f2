//! LRU operations at device-slot and host-tier sizes: hits, and misses that evict.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::LruCache;

const OPS: u64 = 10_000;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("lru");
    group.throughput(Throughput::Elements(OPS));
    for capacity in [8usize, 64, 1024] {
        let mut cache = LruCache::new(capacity);
        for k in 0..capacity as u64 {
            cache.acquire(&k, |_| false);
        }
        group.bench_with_input(
            BenchmarkId::new("acquire_hit", capacity),
            &capacity,
            |b, &cap| {
                b.iter(|| {
                    for i in 0..OPS {
                        black_box(cache.acquire(&(i % cap as u64), |_| false));
                    }
                })
            },
        );
        // keys cycle over twice the capacity: every acquire misses and evicts
        let mut next = capacity as u64;
        group.bench_with_input(
            BenchmarkId::new("acquire_evict", capacity),
            &capacity,
            |b, _| {
                b.iter(|| {
                    for _ in 0..OPS {
                        black_box(cache.acquire(&next, |k| *k == next - 1));
                        next += 1;
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
