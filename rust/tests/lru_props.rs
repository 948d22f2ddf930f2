//! The LRU against a naive model: a Vec of resident keys in recency order.

use std::collections::{HashMap, HashSet};

use loraplex::LruCache;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire(u8, Vec<u8>),
    /// `acquire_ranked` with each key's rank (None: kept; 3: usize::MAX, "not wanted").
    AcquireRanked(u8, Vec<Option<u8>>),
    Touch(u8),
    Pin(u8, bool),
    Remove(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..10, prop::collection::vec(0u8..10, 0..4)).prop_map(|(k, p)| Op::Acquire(k, p)),
        3 => (0u8..10, prop::collection::vec(prop::option::of(0u8..4), 10))
            .prop_map(|(k, r)| Op::AcquireRanked(k, r)),
        2 => (0u8..10).prop_map(Op::Touch),
        1 => (0u8..10, any::<bool>()).prop_map(|(k, p)| Op::Pin(k, p)),
        1 => (0u8..10).prop_map(Op::Remove),
    ]
}

/// Least recently used first.
#[derive(Default)]
struct Model {
    order: Vec<u8>,
    pinned: HashSet<u8>,
}

impl Model {
    fn touch(&mut self, k: u8) -> bool {
        let Some(i) = self.order.iter().position(|x| *x == k) else {
            return false;
        };
        self.order.remove(i);
        self.order.push(k);
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_naive_model(capacity in 0usize..5, ops in prop::collection::vec(op(), 1..80)) {
        let mut cache = LruCache::new(capacity);
        let mut model = Model::default();
        let mut slots: HashMap<u8, usize> = HashMap::new();
        for op in ops {
            match op {
                Op::Acquire(..) | Op::AcquireRanked(..) => {
                    // the plain form is the ranked one with every unprotected key "not wanted"
                    let (k, ranks, got) = match op {
                        Op::Acquire(k, protected) => {
                            let got = cache.acquire(&k, |x| protected.contains(x));
                            let ranks: Vec<Option<usize>> = (0..10u8)
                                .map(|x| (!protected.contains(&x)).then_some(usize::MAX))
                                .collect();
                            (k, ranks, got)
                        }
                        Op::AcquireRanked(k, r) => {
                            let ranks: Vec<Option<usize>> = r
                                .into_iter()
                                .map(|x| x.map(|v| if v == 3 { usize::MAX } else { v as usize }))
                                .collect();
                            let got = cache.acquire_ranked(&k, |x| ranks[*x as usize]);
                            (k, ranks, got)
                        }
                        _ => unreachable!(),
                    };
                    if model.touch(k) {
                        let got = got.expect("resident key must hit");
                        prop_assert!(got.hit);
                        prop_assert_eq!(got.slot, slots[&k], "a resident key moved slot");
                        continue;
                    }
                    let victim = if model.order.len() < capacity {
                        None
                    } else {
                        // the highest rank among unpinned, unkept keys; the least recent of those
                        let mut best: Option<(usize, u8)> = None;
                        for x in &model.order {
                            if model.pinned.contains(x) {
                                continue;
                            }
                            if let Some(r) = ranks[*x as usize] {
                                if best.is_none_or(|(b, _)| r > b) {
                                    best = Some((r, *x));
                                }
                            }
                        }
                        match best {
                            Some((_, v)) => Some(v),
                            None => {
                                prop_assert!(got.is_none(), "evicted a pinned or kept key");
                                continue;
                            }
                        }
                    };
                    let got = got.expect("a slot was available");
                    prop_assert!(!got.hit);
                    prop_assert_eq!(got.evicted, victim);
                    if let Some(v) = victim {
                        model.order.retain(|x| *x != v);
                        prop_assert_eq!(slots.remove(&v), Some(got.slot), "the new key must take the victim's slot");
                    }
                    model.order.push(k);
                    prop_assert!(got.slot < capacity);
                    prop_assert!(!slots.values().any(|s| *s == got.slot), "slot given twice");
                    slots.insert(k, got.slot);
                }
                Op::Touch(k) => {
                    prop_assert_eq!(cache.touch(&k), model.touch(k).then(|| slots[&k]));
                }
                Op::Pin(k, p) => {
                    let resident = model.order.contains(&k);
                    prop_assert_eq!(cache.set_pinned(&k, p), resident);
                    if resident && p { model.pinned.insert(k); }
                    if resident && !p { model.pinned.remove(&k); }
                }
                Op::Remove(k) => {
                    prop_assert_eq!(cache.remove(&k), slots.remove(&k));
                    model.order.retain(|x| *x != k);
                    model.pinned.remove(&k);
                }
            }
            prop_assert_eq!(cache.len(), model.order.len());
            prop_assert_eq!(cache.num_pinned(), model.pinned.len());
            let by_recency: Vec<u8> = cache.entries_by_recency().into_iter().map(|(k, _)| k).collect();
            prop_assert_eq!(by_recency, model.order.clone());
        }
    }
}
