"""After the model ran: append sampled tokens, detokenize, decide who finished and why."""

from __future__ import annotations

import torch

from loraplex.engine.sequence import Request, Sequence
from loraplex.logprobs import Logprob
from loraplex.sampler import Sampled
from loraplex.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def append(self, seqs: list[Sequence], sampled: Sampled) -> None:
        """Adds one token to each sequence and finishes those that stop."""
        for i, seq in enumerate(seqs):
            if i in sampled.no_token:
                self._dead_end(seq, "its constraints left no token to sample")
                continue
            token = sampled.token_ids[i]
            if seq.matcher is not None and not seq.matcher.accept(token):
                self._dead_end(seq, f"its grammar refused token {token}: {seq.matcher.error}")
                continue
            seq.output_ids.append(token)
            if sampled.logprobs[i] is not None:
                self._record_logprobs(seq, token, sampled, i)
            new_text = seq.detokenizer.step(token)
            self._check_stop(seq, token, new_text)
            if seq.matcher is not None and seq.matcher.is_stopped:
                seq.finish("stop")  # the grammar's end: nothing may follow

    @staticmethod
    def _dead_end(seq: Sequence, why: str) -> None:
        """Ends ``seq`` alone, with ``finish_reason='abort'`` and the error on its request."""
        request = seq.request
        so = request.params.structured_outputs
        what = f"structured_outputs ({so.kind})" if so is not None else "sampling"
        error = f"request {request.request_id!r}: {what} reached a dead end: {why}"
        request.error = request.error or error
        seq.finish("abort")

    def _record_logprobs(self, seq: Sequence, token: int, sampled: Sampled, i: int) -> None:
        chosen = sampled.logprobs[i]
        assert chosen is not None
        seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + chosen
        decode = self.tokenizer.decode
        entry = {token: Logprob(chosen, sampled.ranks[i], decode([token], False))}
        for rank, (tid, lp) in enumerate(sampled.top[i] or [], start=1):
            entry.setdefault(tid, Logprob(lp, rank, decode([tid], False)))
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(entry)

    def _check_stop(self, seq: Sequence, token: int, new_text: str) -> None:
        """vLLM's order: EOS (stop_reason None), then stop token ids (stop_reason = the id),
        whose text is left out unless include_stop_str_in_output; then stop strings, the
        earliest in the text winning; then max_tokens ('length')."""
        p = seq.request.params
        num_out = len(seq.output_ids)
        if num_out >= p.min_tokens:
            keep = new_text if p.include_stop_str_in_output else ""
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                seq.text += keep
                return seq.finish("stop")
            if token in (p.stop_token_ids or ()):
                seq.text += keep
                return seq.finish("stop", token)
            if p.stop_strings and self._stop_string(seq, new_text):
                return None
        seq.text += new_text
        if p.max_tokens is not None and num_out >= p.max_tokens:
            seq.finish("length")
        return None

    def record_prompt_logprobs(self, request: Request, start: int, logits: torch.Tensor) -> None:
        """Prompt logprobs from one prefill chunk: ``logits`` row j (position ``start + j``)
        scores prompt token ``start + j + 1``. Positions already recorded (a preempted
        request computes its prompt again) are skipped."""
        entries = request.prompt_logprobs
        assert entries is not None
        prompt = request.prompt_token_ids
        k = request.params.prompt_logprobs or 0
        logp = logits.float().log_softmax(dim=-1)
        if k == -1:
            k = logp.shape[-1]
        decode = self.tokenizer.decode
        for j in range(logp.shape[0]):
            pos = start + j + 1
            if pos >= len(prompt) or pos < len(entries):
                continue
            token = prompt[pos]
            chosen = logp[j, token]
            entry = {token: Logprob(float(chosen), int((logp[j] > chosen).sum()) + 1)}
            if k:
                values, ids = logp[j].topk(k)
                for rank, (tid, lp) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                    entry.setdefault(tid, Logprob(lp, rank))
            for tid, lp in entry.items():
                lp.decoded_token = decode([tid], False)
            entries.append(entry)

    @staticmethod
    def _stop_string(seq: Sequence, new_text: str) -> bool:
        """Looks for a stop string that ends in the new text; truncates the text there."""
        p = seq.request.params
        longest = max(len(s) for s in p.stop_strings)
        head = len(seq.text) - max(0, longest - 1)
        window_start = max(0, head)
        text = seq.text + new_text
        found = [
            (idx, s)
            for s in p.stop_strings
            if (idx := text.find(s, window_start)) != -1 and idx + len(s) > len(seq.text)
        ]
        if not found:
            return False
        idx, stop = min(found)
        seq.text = text[: idx + len(stop)] if p.include_stop_str_in_output else text[:idx]
        seq.finish("stop", stop)
        return True
