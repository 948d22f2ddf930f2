"""Tool calls in chat: the request's ``tools`` and ``tool_choice`` checked as vLLM checks
them, the schema that enforces ``required`` and a named function, and the parsers that find
calls in a model's free text under ``tool_choice='auto'`` (``--tool-call-parser``): ``hermes``
(``<tool_call>{...}</tool_call>``, Qwen and Hermes models), ``llama3_json`` (a JSON object
or several joined by ``;``, after an optional ``<|python_tag|>``), ``mistral``
(``[TOOL_CALLS]`` then a JSON list, or ``name[ARGS]{...}`` as newer Mistral tokenizers write
it) and ``pythonic`` (``[f(a=1), g(b="x")]``, Llama 3.2 / 4).

``ToolCallStream`` turns a choice's generated text, piece by piece, into what the response
carries: content deltas, held back only while they might begin a tool call, and tool calls
(each one whole: its id, name and arguments) once the output ends. A parse that fails leaves
the text as content, as vLLM does; it never fails the request."""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

from loraplex.entrypoints.openai.errors import APIError


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call(name: Any, arguments: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if arguments is None:
        arguments = {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text)


class ToolParser:
    """Finds tool calls in a finished output: ``(content, calls)``; no calls leaves the
    whole text as content. This base finds none (the ``required`` and named modes, whose
    calls come from their schema, use it for their ids); each format overrides ``parse``."""

    name = ""
    markers: tuple[str, ...] = ()  # where calls begin, anywhere in the text
    leading: tuple[str, ...] = ()  # where calls begin, only at the output's start

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return text, []

    def call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _json_values(text: str) -> list[Any]:
    """The JSON values written one after another in ``text`` (separated by whitespace or
    ``;``); an empty list when anything else is there."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        out.append(value)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            values = _json_values(body.strip())
            if len(values) != 1 or not isinstance(values[0], dict):
                return text, []
            call = _call(values[0].get("name"), values[0].get("arguments"))
            if call is None:
                return text, []
            calls.append(call)
        return (text[:start] or None), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    leading = ("<|python_tag|>", "{")

    def parse(self, text):
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>") :]
        if not body.lstrip().startswith("{"):
            return text, []
        values = _json_values(body)
        calls = []
        for v in values:
            if not isinstance(v, dict):
                return text, []
            call = _call(v.get("name"), v.get("parameters", v.get("arguments")))
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _alnum = string.ascii_letters + string.digits

    def call_id(self) -> str:  # Mistral's templates take 9 letters and digits
        return "".join(secrets.choice(self._alnum) for _ in range(9))

    def parse(self, text):
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        body = text[start + len("[TOOL_CALLS]") :].strip()
        calls: list[ToolCall] = []
        if body.startswith("["):  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            values = _json_values(body)
            if len(values) != 1 or not isinstance(values[0], list):
                return text, []
            for v in values[0]:
                call = _call(v.get("name"), v.get("arguments")) if isinstance(v, dict) else None
                if call is None:
                    return text, []
                calls.append(call)
        else:  # name[ARGS]{...}[TOOL_CALLS]name2[ARGS]{...}
            for part in body.split("[TOOL_CALLS]"):
                name, sep, args = part.partition("[ARGS]")
                values = _json_values(args) if sep else []
                call = _call(name.strip(), values[0]) if len(values) == 1 else None
                if call is None:
                    return text, []
                calls.append(call)
        return (text[:start] or None), calls


class PythonicParser(ToolParser):
    name = "pythonic"
    leading = ("[",)

    def parse(self, text):
        body = text.strip()
        if body.startswith("<|python_start|>"):
            body = body[len("<|python_start|>") :].removesuffix("<|python_end|>").strip()
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List):
                return text, []
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                    return text, []
                if node.args:  # keyword arguments only, as the format has them
                    return text, []
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                if None in args:  # **kwargs
                    return text, []
                calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return text, []
        return (None, calls) if calls else (text, [])


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)
}


# -- the request's tools and tool_choice -------------------------------------------------


def function_of(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(400, f"{where}.function needs a non-empty string 'name'", where)
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise APIError(400, f"{where}.function.parameters must be a JSON schema object", where)
    return fn


def tool_mode(body, auto_enabled: bool) -> tuple[str, str | None]:
    """``(mode, name)``: ``none``, ``auto``, ``required`` or ``named`` (with the function's
    name), checked as vLLM checks them; a 400 naming the field otherwise."""
    tools, choice = body.tools, body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools must be a list of functions", "tools")
    functions = [function_of(t, i) for i, t in enumerate(tools or [])]
    if choice == "none":
        return "none", None
    if not tools:
        raise APIError(400, "When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice == "auto":
        if not auto_enabled:
            raise APIError(
                400,
                '"auto" tool choice requires --enable-auto-tool-choice and '
                "--tool-call-parser to be set",
                "tool_choice",
            )
        return "auto", None
    if choice == "required":
        return "required", None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(
                400,
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        if name not in {f["name"] for f in functions}:
            raise APIError(
                400, f"Tool '{name:.200}' has not been passed in `tools`.", "tool_choice"
            )
        return "named", name
    raise APIError(
        400,
        f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r:.100}",
        "tool_choice",
    )


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def named_schema(tools: list[dict], name: str) -> dict[str, Any]:
    """The arguments of the named function: its parameters' schema."""
    fn = next(f for i, t in enumerate(tools) if (f := function_of(t, i))["name"] == name)
    return _parameters(fn)


def required_schema(tools: list[dict], parallel: bool) -> dict[str, Any]:
    """One or more calls (one unless ``parallel``): a JSON list of
    ``{"name": ..., "parameters": {...}}``, each name one of the tools' (vLLM's form)."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"enum": [fn["name"]]}, "parameters": _parameters(fn)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for fn in (function_of(t, i) for i, t in enumerate(tools))
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolCallStream:
    """One choice's text turned into content and tool calls, as it is generated.

    ``feed(text)`` returns the content that can be sent now; ``finish()`` the rest of the
    content and the calls. ``named`` streams the arguments as they come (``arguments()``)."""

    def __init__(self, mode: str, parser: ToolParser | None, name: str | None = None):
        self.mode, self.parser, self.name = mode, parser, name
        self.text = ""  # everything generated
        self.sent = 0  # characters of it sent as content
        self.holding = False  # a call may have begun: hold the rest till the end

    def feed(self, text: str) -> str:
        self.text += text
        if self.mode == "none":
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        if self.mode != "auto" or self.holding:
            return ""
        p = self.parser
        assert p is not None
        stripped = self.text.lstrip()
        if any(stripped.startswith(m) or m.startswith(stripped) for m in p.leading):
            if stripped and any(stripped.startswith(m) for m in p.leading):
                self.holding = True
            return ""  # the output may open with a call
        cut = len(self.text)
        for m in p.markers:
            at = self.text.find(m, self.sent)
            if at >= 0:
                self.holding = True
                cut = min(cut, at)
                continue
            for k in range(min(len(m) - 1, len(self.text)), 0, -1):  # a marker's beginning
                if self.text.endswith(m[:k]):
                    cut = min(cut, len(self.text) - k)
                    break
        out, self.sent = self.text[self.sent : cut], max(self.sent, cut)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not yet sent, and the calls (each with its id)."""
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        calls: list[ToolCall] = []
        if self.mode == "auto":
            assert self.parser is not None
            content, calls = self.parser.parse(self.text)
            if calls:
                before = content or ""
                rest = before[min(len(before), len(self.text) - len(rest)) :]
        elif self.mode == "required":
            calls = _required_calls(self.text)
            rest = "" if calls else rest
        elif self.mode == "named":
            calls = [ToolCall(self.name or "", self.text)]
            rest = ""
        make_id = self.parser.call_id if self.parser is not None else ToolParser().call_id
        for call in calls:
            call.id = make_id()
        return rest, calls


def _required_calls(text: str) -> list[ToolCall]:
    try:
        values = json.loads(text)
    except ValueError:
        return []
    if not isinstance(values, list):
        return []
    calls = []
    for v in values:
        call = _call(v.get("name"), v.get("parameters")) if isinstance(v, dict) else None
        if call is None:
            return []
        calls.append(call)
    return calls
