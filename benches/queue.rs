//! Submission queue throughput: loraplex's lock-free queue beside a `Mutex<VecDeque>`
//! baseline, in the same run, with 1 and 4 producers and one consumer draining.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::RequestQueue;

const ITEMS: u64 = 100_000;
const CAPACITY: usize = 4096;

trait Queue: Send + Sync + 'static {
    fn push(&self, item: u64) -> bool;
    fn pop(&self) -> Option<u64>;
}

impl Queue for RequestQueue<u64> {
    fn push(&self, item: u64) -> bool {
        RequestQueue::push(self, item).is_ok()
    }
    fn pop(&self) -> Option<u64> {
        RequestQueue::pop(self)
    }
}

/// The baseline: a bounded deque behind a mutex.
struct MutexQueue(Mutex<VecDeque<u64>>);

impl Queue for MutexQueue {
    fn push(&self, item: u64) -> bool {
        let mut q = self.0.lock().unwrap();
        if q.len() == CAPACITY {
            return false;
        }
        q.push_back(item);
        true
    }
    fn pop(&self) -> Option<u64> {
        self.0.lock().unwrap().pop_front()
    }
}

/// `producers` threads push `ITEMS` in all while this thread pops them; returns their sum.
fn run<Q: Queue>(q: &Arc<Q>, producers: u64) -> u64 {
    let handles: Vec<_> = (0..producers)
        .map(|p| {
            let q = Arc::clone(q);
            thread::spawn(move || {
                for i in (p..ITEMS).step_by(producers as usize) {
                    while !q.push(black_box(i)) {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    let (mut sum, mut got) = (0, 0);
    while got < ITEMS {
        if let Some(v) = q.pop() {
            sum += v;
            got += 1;
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    sum
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_push_pop");
    group.throughput(Throughput::Elements(ITEMS));
    for producers in [1u64, 4] {
        let lockfree = Arc::new(RequestQueue::<u64>::new(CAPACITY).unwrap());
        group.bench_with_input(
            BenchmarkId::new("lockfree", producers),
            &producers,
            |b, &p| b.iter(|| black_box(run(&lockfree, p))),
        );
        let mutex = Arc::new(MutexQueue(Mutex::new(VecDeque::with_capacity(CAPACITY))));
        group.bench_with_input(
            BenchmarkId::new("mutex_vecdeque", producers),
            &producers,
            |b, &p| b.iter(|| black_box(run(&mutex, p))),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
