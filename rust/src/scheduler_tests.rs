//! Batch formation's unit tests (chunked prefill, preemption).

use super::*;

fn submit(s: &Scheduler, id: RequestId, tokens: usize) {
    let req = NewRequest {
        id,
        num_prompt_tokens: tokens,
        ..Default::default()
    };
    s.submitter().add(req).unwrap();
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_of_the_budget() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_batched_tokens: 8,
        max_num_seqs: 4,
        ..SchedulerConfig::default()
    })
    .unwrap();
    submit(&s, 1, 20);
    let chunks: Vec<(usize, usize)> = (0..3)
        .map(|_| {
            let out = s.schedule();
            let seq = &out.seqs[0];
            s.postprocess(&[], &[]);
            (seq.num_computed_tokens, seq.num_new_tokens)
        })
        .collect();
    assert_eq!(chunks, [(0, 8), (8, 8), (16, 4)]);
}

#[test]
fn the_newest_running_request_is_preempted_when_blocks_run_out() {
    let mut s = Scheduler::new(SchedulerConfig {
        block_size: 4,
        num_blocks: 4,
        max_model_len: 16,
        ..SchedulerConfig::default()
    })
    .unwrap();
    submit(&s, 1, 8);
    submit(&s, 2, 8);
    let out = s.schedule(); // both prefill: all four blocks
    assert_eq!(out.seqs.len(), 2);
    s.postprocess(&[], &[]);
    let out = s.schedule(); // each needs a fifth block to decode: 2 gives way
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(
        out.seqs.iter().map(|q| q.request_id).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(s.num_waiting(), 1);
}
