//! The bounded, lock-free, multi-producer submission queue: `add_request` and
//! `abort_request` push from any thread; the scheduler drains it once per step.
//!
//! A thin wrapper over crossbeam's `ArrayQueue` (benchmarked against a `Mutex<VecDeque>` in
//! `benches/queue.rs`). A full queue hands the item back: no hang, no silent drop.

use crossbeam_queue::ArrayQueue;

use crate::error::Error;

/// A bounded MPMC queue. `Send + Sync` when `T: Send`.
pub struct RequestQueue<T> {
    inner: ArrayQueue<T>,
}

/// A push that did not fit: the item comes back with the error.
#[derive(Debug)]
pub struct Full<T> {
    /// The item that was not enqueued.
    pub item: T,
    /// [`Error::QueueFull`] with the queue's capacity.
    pub error: Error,
}

impl<T> RequestQueue<T> {
    /// A queue holding at most `capacity` items (`capacity >= 1`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `capacity` is 0.
    pub fn new(capacity: usize) -> Result<Self, Error> {
        if capacity == 0 {
            return Err(Error::InvalidConfig("queue capacity must be >= 1".into()));
        }
        Ok(Self {
            inner: ArrayQueue::new(capacity),
        })
    }

    /// Enqueues `item`, or hands it back with [`Error::QueueFull`].
    ///
    /// # Errors
    /// [`Full`] when the queue holds `capacity` items.
    pub fn push(&self, item: T) -> Result<(), Full<T>> {
        self.inner.push(item).map_err(|item| Full {
            item,
            error: Error::QueueFull {
                capacity: self.inner.capacity(),
            },
        })
    }

    /// Dequeues one item.
    pub fn pop(&self) -> Option<T> {
        self.inner.pop()
    }

    /// Dequeues everything present now, in FIFO order per producer.
    pub fn drain(&self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.inner.len());
        while let Some(item) = self.inner.pop() {
            out.push(item);
        }
        out
    }

    /// Items currently queued (a snapshot under concurrency).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the queue is empty (a snapshot under concurrency).
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The bound given at construction.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}
