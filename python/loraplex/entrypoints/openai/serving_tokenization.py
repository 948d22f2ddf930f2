"""vLLM's ``/tokenize`` (a prompt, or chat messages through the template) and
``/detokenize``; the work runs on the input pool."""

from __future__ import annotations

from loraplex.entrypoints.openai.errors import APIError
from loraplex.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from loraplex.entrypoints.openai.serving_chat import render_request
from loraplex.entrypoints.openai.serving_engine import ServingContext
from loraplex.entrypoints.openai.serving_models import adapter_for, warn_ignored


def _tokenize(ctx: ServingContext, body: TokenizeRequest) -> dict:
    tokenizer = ctx.tokenizer
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = tokenizer.encode(body.prompt, add_special_tokens=special)
    else:
        text = render_request(ctx, body, tokenize=False)
        tokens = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
    strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return dict(
        count=len(tokens), max_model_len=ctx.frontend.max_model_len, tokens=tokens, token_strs=strs
    )


async def tokenize(ctx: ServingContext, body: TokenizeRequest) -> dict:
    """The ids a prompt (or a chat) becomes, their count and the context length; the model
    must be one this server serves (404 otherwise)."""
    warn_ignored(body, "tokenize")
    body.check_supported()
    await adapter_for(ctx, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    return await ctx.off_loop(_tokenize, ctx, body)


def _detokenize(ctx: ServingContext, tokens: list[int]) -> dict:
    size = len(ctx.tokenizer)
    bad = [t for t in tokens if not 0 <= t < size]
    if bad:
        raise APIError(
            400, f"tokens: ids {bad[:8]} are outside the vocabulary (size {size})", "tokens"
        )
    return {"prompt": ctx.tokenizer.decode(tokens)}


async def detokenize(ctx: ServingContext, body: DetokenizeRequest) -> dict:
    """The text of ``tokens``, special tokens kept."""
    warn_ignored(body, "detokenize")
    await adapter_for(ctx, body.model)
    return await ctx.off_loop(_detokenize, ctx, body.tokens)
