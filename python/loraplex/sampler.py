"""Next-token selection for a batch of rows, each with its own ``SamplingParams``: the
structured output's grammar mask (first: what follows sees allowed tokens only), logit bias,
allowed tokens, bad words, penalties, ``min_tokens``, greedy or temperature / top-k / top-p /
min-p sampling, and logprobs (of the raw logits, as vLLM's default ``raw_logprobs``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    blocked_ids: list[int]  # EOS / stop ids masked while output is shorter than min_tokens
    bad_word_ids: list[list[int]] = field(default_factory=list)  # token sequences to avoid
    banned: torch.Tensor | None = None  # bool [V]: what its grammar forbids this step


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[float | None]  # the sampled token's logprob, where requested
    ranks: list[int | None]
    top: list[list[tuple[int, float]] | None]  # top-k (id, logprob), where requested
    # rows whose constraints left no token (their token_ids entry means nothing)
    no_token: set[int] = field(default_factory=set)


class Sampler:
    def __init__(self, seed: int | None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # a random seed, as vLLM's seed=None
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> Sampled:
        """logits: [S, V] float32, raw from the model (not modified)."""
        raw = logits
        edited = [i for i, row in enumerate(rows) if _edits_logits(row)]
        if edited:  # a copy only when a row's logits change (greedy plain rows read raw)
            logits = logits.clone()
        for i in edited:
            row = rows[i]
            if row.banned is not None:  # the grammar first: the rest see allowed tokens only
                logits[i].masked_fill_(row.banned, -float("inf"))
            _apply_constraints(logits[i], row)
            _apply_penalties(logits[i], row)
            if len(row.output_ids) < row.params.min_tokens and row.blocked_ids:
                logits[i, row.blocked_ids] = -float("inf")
        best, token_ids = logits.max(dim=-1)  # argmax (first of ties); 2x faster on CPU
        no_token = set()
        if edited:
            empty = best[edited] == -float("inf")
            if empty.any():  # nothing to sample: the row's token is discarded, its NaNs too
                no_token = {edited[j] for j in empty.nonzero().flatten().tolist()}
                for i in no_token:
                    logits[i] = raw[i]
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if random_rows:
            token_ids[random_rows] = self._sample(
                logits[random_rows], [rows[i] for i in random_rows]
            )
        out = self._logprobs(raw, token_ids, rows)
        out.no_token = no_token
        return out

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature for r in rows]).unsqueeze(1)
        logits = logits / temperature
        top_k = torch.tensor([r.params.top_k for r in rows])
        top_p = torch.tensor([r.params.top_p for r in rows])
        min_p = torch.tensor([r.params.min_p for r in rows])
        if (top_k > 0).any() or (top_p < 1).any():
            ordered, order = logits.sort(dim=-1, descending=True)
            rank = torch.arange(logits.shape[1]).expand_as(ordered)
            cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
            probs = ordered.softmax(dim=-1)
            cut |= probs.cumsum(dim=-1) - probs > top_p[:, None]  # keeps at least the first
            ordered = ordered.masked_fill(cut, -float("inf"))
            logits = torch.empty_like(logits).scatter_(1, order, ordered)
        probs = logits.softmax(dim=-1)
        if (min_p > 0).any():
            floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        # exponential race: argmax(p / E), E ~ Exp(1), draws index i with probability p_i
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=row.generator or self.generator)
        return (probs / noise).argmax(dim=-1)

    def _logprobs(
        self, raw: torch.Tensor, token_ids: torch.Tensor, rows: list[SampleRow]
    ) -> Sampled:
        ids = token_ids.tolist()
        out = Sampled(ids, [None] * len(rows), [None] * len(rows), [None] * len(rows))
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return out
        logp = raw[wanted].log_softmax(dim=-1)
        for j, i in enumerate(wanted):
            chosen = logp[j, ids[i]]
            out.logprobs[i] = float(chosen)
            out.ranks[i] = int((logp[j] > chosen).sum()) + 1
            k = rows[i].params.logprobs or 0
            if k == -1:
                k = logp.shape[-1]
            if k:
                values, top_ids = logp[j].topk(k)
                out.top[i] = list(zip(top_ids.tolist(), values.tolist()))
            else:
                out.top[i] = []
        return out


def _edits_logits(row: SampleRow) -> bool:
    """Whether constraints, penalties or ``min_tokens`` change ``row``'s logits this step."""
    p = row.params
    return bool(
        row.banned is not None
        or p.logit_bias
        or p.allowed_token_ids is not None
        or row.bad_word_ids
        or p.repetition_penalty != 1.0
        or ((p.presence_penalty or p.frequency_penalty) and row.output_ids)
        or (len(row.output_ids) < p.min_tokens and row.blocked_ids)
    )


def _apply_constraints(logits: torch.Tensor, row: SampleRow) -> None:
    """``logit_bias`` added; tokens outside ``allowed_token_ids`` and the last token of a
    bad word whose other tokens end the output so far, masked (vLLM's semantics)."""
    p = row.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
    if p.allowed_token_ids is not None:
        keep = logits[p.allowed_token_ids].clone()
        logits.fill_(-float("inf"))
        logits[p.allowed_token_ids] = keep
    out = row.output_ids
    for word in row.bad_word_ids:
        prefix = word[:-1]
        if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix):
            logits[word[-1]] = -float("inf")


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> None:
    """vLLM's semantics: repetition over prompt and output tokens; presence and frequency
    over output tokens only."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids), minlength=logits.shape[0]).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
