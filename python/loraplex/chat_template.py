"""Chat templates rendered as Hugging Face renders them: jinja2's sandbox with
``trim_blocks`` / ``lstrip_blocks``, loop controls, a ``{% generation %}`` tag, their
``tojson`` (no HTML escaping), ``raise_exception`` and ``strftime_now``; the special tokens
and any ``chat_template_kwargs`` visible to the template.

Rendering is bounded, since a template (a request's own, where the server allows one) or
the messages it loops over may be hostile: ``range`` yields at most ``MAX_RANGE_ITEMS`` in
one render, ``*`` and ``**`` may not build huge values, the text may not outgrow
``max_chars``, and with ``deadline_s`` the render stops (``TemplateLimitError``) once it has
run that long, however it loops."""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE_ITEMS = 200_000  # over all of one render's ``range`` calls
MAX_VALUE_CHARS = 1 << 22  # a string or list that ``*`` or ``**`` may build
_budget = threading.local()


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A render ran past one of its bounds."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Hugging Face's sandbox, with ``*`` and ``**`` bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * times > MAX_VALUE_CHARS:
                        raise TemplateLimitError(
                            f"the chat template builds a value of {len(seq) * times} items"
                        )
        elif operator == "**" and isinstance(right, int) and isinstance(left, int):
            if right > 64 and abs(left) > 1:
                raise TemplateLimitError(f"the chat template computes {left} ** {right}")
        return super().call_binop(context, operator, left, right)


def _range(*args):
    """``range``, drawing on the render's budget of items."""
    items = range(*args)
    left = getattr(_budget, "left", MAX_RANGE_ITEMS) - len(items)
    if left < 0:
        raise TemplateLimitError(
            f"the chat template's loops run past {MAX_RANGE_ITEMS} range items"
        )
    _budget.left = left
    return items


# marks the end of the final message, so the render can be cut there to continue it
# (its trailing space tells whether the template kept the message's spacing)
_TAIL = "LORAPLEX_CONTINUE_FINAL_MESSAGE "


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (the assistant-mask
    tracking transformers attaches to it changes nothing in the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    env.globals["range"] = _range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    template: str,
    conversation: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    deadline_s: float | None = None,
    max_chars: int | None = None,
    **variables: Any,
) -> str:
    """The conversation as text. With ``continue_final_message`` the text ends right after
    the last message's content, so the model continues it. ``deadline_s`` and
    ``max_chars`` bound the render (``TemplateLimitError``)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible: use "
            "continue_final_message to continue the final message, add_generation_prompt to "
            "start a new assistant message"
        )
    messages = copy.deepcopy(list(conversation))
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
    if continue_final_message:
        if not messages or not isinstance(messages[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with text content")
        messages[-1]["content"] += _TAIL
    text = _bounded_render(
        _compile(template),
        dict(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        ),
        deadline_s,
        max_chars,
    )
    if continue_final_message:
        if _TAIL.strip() not in text:
            raise ValueError(
                "continue_final_message is set but the chat template drops the final message"
            )
        cut = text.rindex(_TAIL.strip())
        kept_spacing = text[cut : cut + len(_TAIL)] == _TAIL
        text = text[:cut] if kept_spacing else text[:cut].rstrip()
    return text


def _bounded_render(
    compiled: jinja2.Template,
    context: dict[str, Any],
    deadline_s: float | None,
    max_chars: int | None,
) -> str:
    _budget.left = MAX_RANGE_ITEMS
    tracer = _deadline_tracer(time.monotonic() + deadline_s) if deadline_s else None
    previous = sys.gettrace()
    if tracer is not None:
        sys.settrace(tracer)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise TemplateLimitError(f"the rendered chat is longer than {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        if tracer is not None:
            sys.settrace(previous)


def _deadline_tracer(deadline: float):
    """A trace function that stops the render once ``deadline`` has passed (looked at
    every 256 events: the overhead stays small)."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        count += 1
        if not count & 255 and time.monotonic() > deadline:
            raise TemplateLimitError("the chat template ran past its time limit")
        return trace

    return trace
