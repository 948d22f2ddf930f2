//! The adapter lifecycle's unit tests (read, placement, pins, removal, reloads).

use super::*;
use crate::config::SchedulerConfig;
use crate::submit::NewRequest;

fn scheduler(max_loras: usize, max_cpu_loras: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_loras,
        max_cpu_loras,
        ..SchedulerConfig::default()
    })
    .unwrap()
}

/// One request runs at a time; `slots` device and host slots.
fn one_seat(slots: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs: 1,
        max_loras: slots,
        max_cpu_loras: slots,
        ..SchedulerConfig::default()
    })
    .unwrap()
}

/// Registers adapter `id` and reads it into the host tier at once.
fn ready(s: &mut Scheduler, id: i64) -> Key {
    let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
    let key = s.register_adapter(&request).unwrap().0;
    if let Staging::Read(_) = s.stage_adapter(key).unwrap() {
        if let Placement::Slot(slot) = s.adapter_validated(key, true) {
            s.adapter_loaded(key, slot);
        }
    }
    key
}

fn submit(s: &Scheduler, id: RequestId, adapter: Option<Key>) {
    let req = NewRequest {
        id,
        num_prompt_tokens: 4,
        adapter,
        priority: 0,
        ..Default::default()
    };
    s.submitter().add(req).unwrap();
}

#[test]
fn remove_adapter_counts_queued_requests() {
    let mut s = scheduler(1, 1);
    let k = ready(&mut s, 7);
    submit(&s, 1, Some(k));
    let err = s.remove_adapter(7, false).unwrap_err();
    assert_eq!(
        err,
        Error::AdapterInUse {
            adapter: 7,
            num_requests: 1
        }
    );
    assert_eq!(s.schedule().seqs.len(), 1); // still served
}

#[test]
fn every_slot_pinned_refuses_other_adapters() {
    let mut s = scheduler(1, 2);
    let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
    s.pin_adapter(k1).unwrap();
    submit(&s, 10, Some(k2));
    submit(&s, 11, Some(k1));
    let out = s.schedule();
    assert_eq!(out.seqs.len(), 1);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].0, 10);
    assert!(matches!(
        out.rejected[0].1,
        Error::NoFreeSlot { adapter: 2, .. }
    ));
    s.postprocess(&[11], &[]);
    assert!(!s.has_unfinished());
    assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
}

#[test]
fn pinning_the_last_slot_past_waiting_requests_is_refused() {
    let mut s = scheduler(1, 2);
    let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
    submit(&s, 1, Some(k2));
    assert!(matches!(
        s.pin_adapter(k1),
        Err(Error::NoFreeSlot { adapter: 1, .. })
    ));
    assert!(s.pin_adapter(k2).is_ok()); // its own requests are not stranded
}

#[test]
fn waiting_requests_run_once_their_adapter_is_read() {
    let mut s = scheduler(2, 2);
    let request = LoRARequest::new("slow", 5, "/a/slow").unwrap();
    let (key, _) = s.register_adapter(&request).unwrap();
    submit(&s, 1, Some(key));
    submit(&s, 2, None);
    let out = s.schedule();
    assert_eq!(out.seqs.len(), 1); // the base request runs meanwhile
    assert_eq!(out.reads.len(), 1);
    let job = out.reads[0].clone();
    assert_eq!((job.key, job.request.lora_int_id), (key, 5));
    assert!(s.schedule().reads.is_empty()); // one read per adapter
    let Placement::Slot(slot) = s.adapter_validated(key, false) else {
        panic!("a free host slot")
    };
    s.adapter_loaded(key, slot);
    let out = s.schedule();
    assert_eq!(
        out.seqs.iter().map(|q| q.request_id).collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(out.loads[0].host_slot, slot);
}

#[test]
fn a_failed_read_fails_only_its_requests() {
    let mut s = scheduler(2, 2);
    let bad = LoRARequest::new("bad", 5, "/a/bad").unwrap();
    let (key, _) = s.register_adapter(&bad).unwrap();
    let good = ready(&mut s, 6);
    submit(&s, 1, Some(key));
    submit(&s, 2, Some(good));
    assert_eq!(s.schedule().reads[0].key, key);
    s.adapter_failed(key, "adapter 'bad': corrupt");
    submit(&s, 3, Some(key)); // submitted after the failure
    let out = s.schedule();
    let rejected: Vec<_> = out
        .rejected
        .iter()
        .map(|(id, e)| (*id, e.to_string()))
        .collect();
    assert_eq!(rejected[0], (1, "adapter 'bad': corrupt".to_string()));
    assert_eq!(rejected[1].0, 3);
    assert_eq!(s.adapter_key(5), None);
    assert_eq!(s.resident_adapters(), vec![6]);
}

#[test]
fn a_read_ahead_waits_rather_than_evict_what_is_wanted_sooner() {
    let mut s = scheduler(1, 1);
    let first = ready(&mut s, 1);
    let request = LoRARequest::new("later", 2, "/a/later").unwrap();
    let (later, _) = s.register_adapter(&request).unwrap();
    submit(&s, 1, Some(first));
    submit(&s, 2, Some(later));
    let out = s.schedule(); // runs request 1; reads 'later'
    assert_eq!((out.seqs.len(), out.reads.len()), (1, 1));
    assert_eq!(s.adapter_validated(later, false), Placement::Wait); // 1 is in use
    s.postprocess(&[1], &[]);
    let out = s.schedule(); // adapter 1 is idle now: the waiting weights get its slot
    assert_eq!(out.commits, vec![(later, 0)]);
    assert_eq!(s.resident_adapters(), Vec::<i64>::new());
    s.adapter_loaded(later, 0);
    assert_eq!(s.schedule().seqs[0].request_id, 2);
}

#[test]
fn held_weights_give_way_to_a_read_wanted_sooner() {
    // one host slot, one read in flight: weights held for a request since aborted must
    // not keep the next request's adapter from being read (found by scheduler_props)
    let mut s = Scheduler::new(SchedulerConfig {
        max_loras: 1,
        max_cpu_loras: 1,
        max_loading: 1,
        max_skipped_steps: 0,
        ..SchedulerConfig::default()
    })
    .unwrap();
    let first = ready(&mut s, 1);
    let reg = |s: &mut Scheduler, id: i64| {
        let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
        s.register_adapter(&request).unwrap().0
    };
    let (held, next) = (reg(&mut s, 2), reg(&mut s, 3));
    submit(&s, 1, Some(first));
    submit(&s, 2, Some(held));
    let out = s.schedule(); // runs request 1; reads adapter 2
    assert_eq!(
        out.reads.iter().map(|r| r.key).collect::<Vec<_>>(),
        vec![held]
    );
    assert_eq!(s.adapter_validated(held, false), Placement::Wait); // 1 is in use
    s.submitter().abort(2).unwrap();
    submit(&s, 3, Some(next));
    let out = s.schedule();
    assert_eq!(out.unheld, vec![held]);
    assert_eq!(
        out.reads.iter().map(|r| r.key).collect::<Vec<_>>(),
        vec![next]
    );
    s.postprocess(&[1], &[]);
    assert_eq!(s.adapter_validated(next, false), Placement::Slot(0));
    s.adapter_loaded(next, 0);
    assert_eq!(s.schedule().seqs[0].request_id, 3);
}

#[test]
fn placement_evicts_what_the_queue_wants_last() {
    let mut s = one_seat(3);
    let (k1, k2, _k3) = (ready(&mut s, 1), ready(&mut s, 2), ready(&mut s, 3));
    let reg = |s: &mut Scheduler, id: i64| {
        let request = LoRARequest::new(format!("a{id}"), id, format!("/a/{id}")).unwrap();
        s.register_adapter(&request).unwrap().0
    };
    let (k4, k5, k6) = (reg(&mut s, 4), reg(&mut s, 5), reg(&mut s, 6));
    submit(&s, 10, None); // runs; the others wait for the one seat
    submit(&s, 11, Some(k4));
    submit(&s, 12, Some(k1));
    submit(&s, 13, Some(k2));
    submit(&s, 14, Some(k5));
    let out = s.schedule();
    assert_eq!(out.seqs.len(), 1);
    assert!(out.reads.iter().any(|job| job.key == k4));
    // 1 is the least recently used, but 3 is the one nobody waits for
    let Placement::Slot(slot) = s.adapter_validated(k4, false) else {
        panic!("3 can go")
    };
    s.adapter_loaded(k4, slot);
    assert_eq!(s.resident_adapters(), vec![1, 2, 4]);
    // 5 comes after 4, 1 and 2 in the queue: it waits rather than evict them
    if let Staging::Read(_) = s.stage_adapter(k5).unwrap() {
        assert_eq!(s.adapter_validated(k5, false), Placement::Wait);
    }
    // an explicit add evicts the one the queue wants last (2), not the oldest (1)
    assert!(matches!(s.stage_adapter(k6).unwrap(), Staging::Read(_)));
    assert!(matches!(s.adapter_validated(k6, true), Placement::Slot(_)));
    assert_eq!(s.resident_adapters(), vec![1, 4]);
    assert!(s.adapters.residency(k2) != Residency::Ready);
}

#[test]
fn a_read_ahead_waits_for_a_running_request_rather_than_evict_a_wanted_adapter() {
    let mut s = one_seat(2);
    let (k1, k2) = (ready(&mut s, 1), ready(&mut s, 2));
    let request = LoRARequest::new("a3", 3, "/a/3").unwrap();
    let k3 = s.register_adapter(&request).unwrap().0;
    submit(&s, 10, None); // runs first
    submit(&s, 11, Some(k3));
    submit(&s, 12, Some(k1));
    submit(&s, 13, Some(k2));
    let (mut reads, mut finished) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let out = s.schedule();
        for job in &out.reads {
            reads.push(job.key);
            // 1 and 2 are wanted by waiting requests and a request runs: 3 waits
            match s.adapter_validated(job.key, false) {
                Placement::Slot(slot) => s.adapter_loaded(job.key, slot),
                Placement::Wait => assert!(s.num_running() > 0),
                Placement::Gone => panic!("nothing removed it"),
            }
        }
        for &(key, slot) in &out.commits {
            s.adapter_loaded(key, slot);
        }
        let ids: Vec<_> = out.seqs.iter().map(|q| q.request_id).collect();
        s.postprocess(&ids, &[]); // each request ends after one step
        finished.extend(ids);
        if !s.has_unfinished() {
            break;
        }
    }
    finished.sort_unstable();
    assert_eq!(finished, [10, 11, 12, 13]);
    assert_eq!(reads, [k3]); // no adapter read twice: 3 took a slot nothing wanted
    assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
}

#[test]
fn host_tier_evicts_lru_and_keeps_pins() {
    let mut s = scheduler(1, 2);
    let k1 = ready(&mut s, 1);
    ready(&mut s, 2);
    s.pin_adapter(k1).unwrap();
    ready(&mut s, 3); // 1 is pinned: 2 goes
    assert_eq!(s.resident_adapters(), vec![1, 3]);
    s.unpin_adapter(k1);
    ready(&mut s, 4);
    assert_eq!(s.resident_adapters(), vec![3, 4]);
}

#[test]
fn a_reload_serves_running_requests_on_the_old_weights() {
    let mut s = scheduler(2, 3);
    let old = ready(&mut s, 1);
    submit(&s, 1, Some(old));
    assert_eq!(s.schedule().seqs.len(), 1);
    let request = LoRARequest::new("a1", 1, "/a/1").unwrap();
    let (new, was_pinned) = s.reload_adapter(&request).unwrap();
    assert!(new != old && !was_pinned);
    assert!(s.adapters().is_live(old)); // still running
    s.postprocess(&[1], &[]);
    assert!(!s.adapters().is_live(old));
    assert_eq!(s.adapter_key(1), Some(new));
}
