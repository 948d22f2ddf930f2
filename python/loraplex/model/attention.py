"""Attention over a flat batch that mixes prefill chunks and decode tokens, with keys and
values in a paged cache whose block tables come from the Rust scheduler.

Sequences are attended in groups (decode tokens together, prefill chunks together), each
group one padded ``scaled_dot_product_attention`` call, so decode-only steps never pad to a
prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended in one call. B sequences, Lq query and Lk key positions."""

    rows: torch.Tensor  # [N] flat-batch rows of the valid queries, in (seq, position) order
    query_index: torch.Tensor  # [B, Lq] flat-batch row per query (T for padding: a zero row)
    valid: torch.Tensor  # [B, Lq] bool
    gather_slots: torch.Tensor  # [B, Lk] cache slot per key (0 for padding)
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool, True = attend
    # the keys each sequence's last query attends: key_start..key_end of gather_slots
    key_start: torch.Tensor  # [B]
    key_end: torch.Tensor  # [B]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    groups: list[AttentionGroup]
    num_tokens: int
    # the backend's kernel for a decode-only group (None: the torch path), called as
    # (q, k_cache, v_cache, slots, rows, key_start, key_end, out)
    decode_attention: Callable[..., None] | None = None


def build_metadata(
    plan: Any,
    starts: list[int],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
    decode_attention: Callable[..., None] | None = None,
) -> AttentionMetadata:
    """Masks and key gathers for one step. ``plan`` is the core's step plan (its per-sequence
    lists in batch order, its flat positions and slot mapping); ``starts`` each sequence's
    first row in the flat batch."""
    num_new = plan.num_new_tokens
    total = plan.num_batched_tokens
    decode = [i for i, n in enumerate(num_new) if n == 1]
    prefill = [i for i, n in enumerate(num_new) if n > 1]
    groups = []
    for members in (decode, prefill):
        if members:
            groups.append(_group(members, starts, plan, block_size, sliding_window, total))
    to = lambda t: t.to(device)  # noqa: E731
    groups = [AttentionGroup(*(to(getattr(g, f)) for f in g.__dataclass_fields__)) for g in groups]
    positions = torch.tensor(plan.positions, dtype=torch.long)
    slot_mapping = torch.tensor(plan.slot_mapping, dtype=torch.long)
    return AttentionMetadata(to(positions), to(slot_mapping), groups, total, decode_attention)


def _group(members, starts, plan, block_size, window, total) -> AttentionGroup:
    block_tables = plan.block_tables
    start = torch.tensor([starts[i] for i in members])
    n = torch.tensor([plan.num_new_tokens[i] for i in members])
    c = torch.tensor([plan.num_computed_tokens[i] for i in members])
    max_blocks = max(len(block_tables[i]) for i in members)
    tables = torch.tensor(  # one tensor, rows padded with block 0 (masked out below)
        [block_tables[i] + [0] * (max_blocks - len(block_tables[i])) for i in members],
        dtype=torch.long,
    )
    lq, lk = int(n.max()), int((c + n).max())
    q_off = torch.arange(lq)[None, :]
    valid = q_off < n[:, None]
    q_pos = c[:, None] + q_off
    key_pos = torch.arange(lk)[None, :].expand(len(members), lk)
    key_valid = key_pos < (c + n)[:, None]
    gather = _slots(tables, key_pos, block_size) * key_valid
    mask = (key_pos[:, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
    if window is not None:
        mask &= key_pos[:, None, :] > q_pos[:, :, None] - window
    mask[:, :, 0] |= ~valid  # padding queries attend one key: no NaN rows
    query_index = torch.where(valid, start[:, None] + q_off, total)
    rows = query_index[valid]
    key_end = c + n
    key_start = (key_end - window).clamp(min=0) if window is not None else torch.zeros_like(c)
    return AttentionGroup(rows, query_index, valid, gather, mask[:, None], key_start, key_end)


def _slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    blocks = torch.gather(tables, 1, (pos // block_size).clamp(max=tables.shape[1] - 1))
    return blocks * block_size + pos % block_size


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Writes this step's k, v into the cache, then attends.

    q: [T, H, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks * block_size, Hkv, D],
    written in place. Returns [T, H, D].
    """
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    groups = meta.groups
    if meta.decode_attention is not None and groups[0].query_index.shape[1] == 1:
        g = groups[0]  # the decode group comes first
        meta.decode_attention(
            q, k_cache, v_cache, g.gather_slots, g.rows, g.key_start, g.key_end, out
        )
        groups = groups[1:]
    if not groups:
        return out
    q_ext = torch.cat([q, q.new_zeros(1, *q.shape[1:])])
    for g in groups:
        o = F.scaled_dot_product_attention(
            q_ext[g.query_index].transpose(1, 2),
            k_cache[g.gather_slots].transpose(1, 2),
            v_cache[g.gather_slots].transpose(1, 2),
            attn_mask=g.mask,
            enable_gqa=True,
        )
        out[g.rows] = o.transpose(1, 2)[g.valid]
    return out
