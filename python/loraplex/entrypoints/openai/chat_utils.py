"""Chat messages as vLLM reads them, rendered through the chat template within bounds.

Content may be a string or a list of parts: text parts (``text``, and ``input_text``,
``output_text``, ``refusal`` as OpenAI's newer APIs name them) are joined with ``"\\n"``
(``--chat-template-content-format string``, the default) or kept as a list of text parts
(``openai``); any other part (an image, audio, a file) is a 400 naming it, since loraplex
serves text-only models. Runs on a worker thread, never on the event loop."""

from __future__ import annotations

import json
from typing import Any

from loraplex.entrypoints.openai.errors import APIError

TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
RENDER_SECONDS = 5.0  # a render that runs longer is refused (a looping template)


def parse_messages(messages: list[Any], content_format: str = "string") -> list[dict]:
    """The messages with their content parts read (a 400 naming the first bad one)."""
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a string 'role'", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            texts = [_part_text(i, j, part) for j, part in enumerate(content)]
            if content_format == "openai":
                content = [{"type": "text", "text": t} for t in texts]
            else:
                content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise APIError(
                400,
                f"messages[{i}].content must be a string or a list of parts, got "
                f"{type(content).__name__}",
                f"messages[{i}].content",
            )
        entry = {**message, "content": content}
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and isinstance(calls, list):
            entry["tool_calls"] = [_template_call(i, j, call) for j, call in enumerate(calls)]
        parsed.append(entry)
    return parsed


def _template_call(i: int, j: int, call: Any) -> Any:
    """An assistant's tool call as chat templates read it (vLLM's and transformers' rule):
    its ``function.arguments`` JSON text parsed to an object ({} when empty)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return call
    arguments = fn.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            where = f"messages[{i}].tool_calls[{j}].function.arguments"
            raise APIError(400, f"{where} is not JSON ({e})", where) from None
    elif not arguments:
        arguments = {}
    return {**call, "function": {**fn, "arguments": arguments}}


def _part_text(i: int, j: int, part: Any) -> str:
    where = f"messages[{i}].content[{j}]"
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise APIError(400, f"{where} must be a content part object", where)
    kind = part.get("type", "text" if "text" in part else None)
    key = TEXT_PARTS.get(kind)
    if key is None:
        raise APIError(
            400,
            f"{where}: content parts of type {kind!r} are not supported (loraplex serves "
            "text-only models; text parts are)",
            f"{where}.type",
        )
    text = part.get(key)
    if not isinstance(text, str):
        raise APIError(400, f"{where}.{key} must be a string", f"{where}.{key}")
    return text


def render_chat(
    tokenizer,
    messages: list[dict],
    *,
    template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict] | None,
    documents: list[dict] | None,
    template_kwargs: dict[str, Any],
    max_chars: int,
    tokenize: bool,
) -> str | list[int]:
    """The conversation as text, or its ids (no special tokens added); a 400 naming
    ``messages`` if it cannot render, or runs past its bounds."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            tokenize=False,
            deadline_s=RENDER_SECONDS,
            max_chars=max_chars,
            **template_kwargs,
        )
    except Exception as e:  # a template error is the request's: jinja2, TypeError, limits
        raise APIError(
            400, f"messages: cannot render the chat template ({e})", "messages"
        ) from None
    return tokenizer.encode(text, add_special_tokens=False) if tokenize else text
