"""Chat templates rendered as Hugging Face renders them: jinja2's sandbox with
``trim_blocks`` / ``lstrip_blocks``, loop controls, a ``{% generation %}`` tag, their
``tojson`` (no HTML escaping), ``raise_exception`` and ``strftime_now``; the special tokens
and any ``chat_template_kwargs`` visible to the template."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
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
    **variables: Any,
) -> str:
    """The conversation as text. With ``continue_final_message`` the text ends right after
    the last message's content, so the model continues it."""
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
    text = _compile(template).render(
        messages=messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **variables,
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
