"""The ``loraplex`` command."""

from __future__ import annotations

import argparse
import sys

from loraplex import AdapterConflictError, AdapterRegistry, LoRARequest, Scheduler


def demo() -> int:
    """Serves a mixed workload through the Rust core and shows what each step batches.

    The model and adapters arrive with the engine issues; this shows the core's decisions:
    adapter identity, per-step batches grouped by adapter slot, slot loads and evictions.
    """
    registry = AdapterRegistry()
    adapters = [
        LoRARequest(name, i, f"/adapters/{name}")
        for i, name in enumerate(["sql", "code", "chat"], start=1)
    ]
    for a in adapters:
        registry.register(a)
    print(f"registered: {', '.join(repr(a) for a in adapters)}")
    try:
        registry.register(LoRARequest("sql-v2", 1, "/adapters/sql-v2"))
    except AdapterConflictError as e:
        print(f"refused:    {e}")

    sched = Scheduler(
        max_loras=2,
        max_cpu_loras=3,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        block_size=4,
        num_blocks=32,
        max_model_len=32,
    )
    names = {a.lora_int_id: a.lora_name for a in adapters}
    workload = [(6, 3, 1), (3, 2, None), (9, 2, 2), (4, 3, 3), (5, 2, 1), (2, 2, 3)]
    for rid, (prompt, _, lora) in enumerate(workload):
        sched.add_request(rid, prompt, lora_int_id=lora)
    print(
        f"\n{len(workload)} requests over {len(adapters)} adapters and the base model; "
        f"max_loras=2, 16 tokens per step\n"
    )
    generated = dict.fromkeys(range(len(workload)), 0)
    step = 0
    while sched.has_unfinished_requests():
        step += 1
        out = sched.schedule()
        traffic = [f"load {names[a]}->slot {s}" for s, a, _, _ in out.loads]
        traffic += [f"evict {names[a]}" for _, a in out.evictions]
        groups = []
        for start, length, slot in out.segments:
            members = [
                f"r{r}({'prefill' if n > 1 or not smp else 'decode'} {n})"
                for r, n, s, smp in zip(out.request_ids, out.num_new_tokens, out.slots, out.samples)
                if s == slot
            ]
            label = "base" if slot < 0 else names[out.lora_int_ids[out.slots.index(slot)] or 0]
            groups.append(f"[{label} @{start}+{length}: {' '.join(members)}]")
        print(
            f"step {step:2}: {' '.join(groups)}" + (f"  ({'; '.join(traffic)})" if traffic else "")
        )
        finished = []
        for rid, smp in zip(out.request_ids, out.samples):
            if smp:
                generated[rid] += 1
                if generated[rid] == workload[rid][1]:
                    finished.append(rid)
        sched.postprocess(finished)
    print(
        f"\nall {len(workload)} requests finished in {step} steps; "
        f"{sched.num_free_blocks}/{sched.num_blocks} KV blocks free"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="serve a mixed-adapter workload and show each step's batch")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
