//! The submission queue, tested in the manner of crossbeam's `tests/array_queue.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use loraplex::{Error, RequestQueue};

#[test]
fn smoke() {
    let q = RequestQueue::new(2).unwrap();
    q.push(7).unwrap();
    assert_eq!(q.pop(), Some(7));
    assert_eq!(q.pop(), None);
    assert!(q.is_empty());
}

#[test]
fn capacity_is_a_clear_error_that_hands_the_item_back() {
    let q = RequestQueue::new(3).unwrap();
    for i in 0..3 {
        q.push(i).unwrap();
    }
    let full = q.push(99).unwrap_err();
    assert_eq!(full.item, 99);
    assert_eq!(full.error, Error::QueueFull { capacity: 3 });
    assert!(full.error.to_string().contains("full"));
    assert_eq!(q.drain(), vec![0, 1, 2]);
    assert!(RequestQueue::<u8>::new(0).is_err());
}

/// Four producers, one consumer: every item arrives exactly once, and each producer's items
/// arrive in the order it pushed them.
#[test]
fn mpsc_exactly_once_and_per_producer_fifo() {
    const PER: usize = 20_000;
    let q = Arc::new(RequestQueue::new(64).unwrap());
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                for i in 0..PER {
                    let mut item = (p, i);
                    while let Err(full) = q.push(item) {
                        item = full.item;
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let mut next = [0usize; 4];
    let mut received = 0;
    while received < 4 * PER {
        for (p, i) in q.drain() {
            assert_eq!(
                i, next[p],
                "producer {p}'s items out of order or duplicated"
            );
            next[p] += 1;
            received += 1;
        }
    }
    for h in producers {
        h.join().unwrap();
    }
    assert_eq!(next, [PER; 4]);
    assert!(q.is_empty());
}

/// Items left in a dropped queue are dropped exactly once.
#[test]
fn drops() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }
    let q = RequestQueue::new(10).unwrap();
    for _ in 0..7 {
        assert!(q.push(Counted).is_ok());
    }
    drop(q.pop());
    assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    drop(q);
    assert_eq!(DROPS.load(Ordering::SeqCst), 7);
}
